"""Arguments and printing of the analysis commands: `eval`, `transfer`, `attribute`, `synthetic`, `dashboard`."""

import argparse
from typing import Any

from actstore.schemas.eval_tables import DOWNSTREAM_FIELDS, RECONSTRUCTION_FIELDS
from actstore.store.root import Store


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE id (see `actstore ls`) or checkpoint dir (SAELens, sparsify, ...)")
    p.add_argument("--harvest", required=True, help="harvest id")
    p.add_argument("--site", help="harvest site the SAE reads (default: the SAE's hook, or the only site)")
    _add_eval_options(p)


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["holdout", "train", "all"], default="holdout")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens of the split")
    p.add_argument("--keep-bos", action="store_true", help="count position 0 (BOS) in the metrics")
    p.add_argument(
        "--outlier-factor", type=float, help="also exclude tokens whose norm exceeds this multiple of the median norm"
    )
    p.add_argument(
        "--ce-tokens",
        type=int,
        default=4096,
        help="tokens of downstream loss with the SAE spliced in (0 skips the model forwards)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="evaluate an SAE trained on another model or hook (transfer experiments)",
    )
    p.add_argument("--no-progress", action="store_true")


def _runtime(a: argparse.Namespace) -> Any:
    from actstore.schemas.eval import EvalRuntime

    return EvalRuntime(device=a.device, allow_mismatch=a.allow_mismatch, progress=not a.no_progress)


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.eval import evaluate
    from actstore.flows.saes import open_sae, stored_sae_id
    from actstore.schemas.eval import EvalConfig
    from actstore.store.harvests import choose_site, harvest_model_label
    from actstore.transforms.sae import check_compatible

    store = Store(a.store)
    harvest = store.manifest("harvest", a.harvest)
    sae, known_id = open_sae(a.store, a.sae)
    site = choose_site(harvest, a.site, sae.hook_name)
    check_compatible(
        sae, store.activations(a.harvest, site).attrs.d, site, harvest_model_label(harvest), a.allow_mismatch
    )
    config = EvalConfig(
        sae_id=stored_sae_id(a.store, a.sae, sae, known_id),
        harvest_id=a.harvest,
        site=site,
        split=a.split,
        max_tokens=a.max_tokens,
        exclude_bos=not a.keep_bos,
        outlier_factor=a.outlier_factor,
        ce_tokens=a.ce_tokens,
    )
    manifest = evaluate(a.store, config, _runtime(a))
    summary = manifest.extra["summary"]
    if not a.json:
        print_numbers(f"eval {manifest.id}", summary)
        print(
            f"tables: {Store(a.store).eval_dir(manifest.id)}/{{summary,per_token,per_feature,density_histogram}}"
            ".parquet"
        )
    return {"eval_id": manifest.id, **summary}


def print_numbers(title: str, row: dict[str, Any]) -> None:
    """The headline numbers of one evaluation, in the order of the result table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in RECONSTRUCTION_FIELDS + DOWNSTREAM_FIELDS:
        value = row.get(name)
        if value is not None:
            table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    Console().print(table)


def add_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harvest-a", required=True, help="harvest of model A (e.g. the base model)")
    p.add_argument("--harvest-b", required=True, help="harvest of model B on the same corpus and sites")
    p.add_argument("--site", action="append", default=[], help="site to compare (repeatable; default: all shared)")
    p.add_argument("--sae-a", help="SAE trained on model A: evaluated on A and on B")
    p.add_argument("--sae-b", help="SAE trained on model B: evaluated on B and on A")
    _add_eval_options(p)


def cmd_transfer(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.transfer import transfer
    from actstore.schemas.transfer import TransferConfig

    config = TransferConfig(
        harvest_a=a.harvest_a,
        harvest_b=a.harvest_b,
        sites=tuple(a.site),
        sae_a=a.sae_a,
        sae_b=a.sae_b,
        split=a.split,
        max_tokens=a.max_tokens,
        exclude_bos=not a.keep_bos,
        ce_tokens=a.ce_tokens,
    )
    manifest = transfer(a.store, config, _runtime(a))
    if not a.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"transfer {manifest.id}")
        for column in ("site", "tokens", "cos_mean", "euclid_mean"):
            table.add_column(column, justify="right")
        for row in manifest.extra["summary"]:
            table.add_row(row["site"], f"{row['tokens']:,}", f"{row['cos_mean']:.4f}", f"{row['euclid_mean']:.3f}")
        Console().print(table)
        saes = Table(title="SAE transfer")
        for column in ("direction", "explained_variance", "ce_recovered_zero", "ce_delta", "log_density_corr"):
            saes.add_column(column, justify="right")
        for row in manifest.extra["sae_transfer"]:
            saes.add_row(
                *(
                    f"{v:.4f}" if isinstance(v, float) else str(v)
                    for v in (
                        row["direction"],
                        row["explained_variance"],
                        row["ce_recovered_zero"],
                        row["ce_delta"],
                        row["log_density_corr"],
                    )
                )
            )
        if manifest.extra["sae_transfer"]:
            Console().print(saes)
        print(f"tables: {Store(a.store).transfer_dir(manifest.id)}")
    return {
        "transfer_id": manifest.id,
        "sites": manifest.extra["summary"],
        "sae_transfer": manifest.extra["sae_transfer"],
    }


def add_synthetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["gaussian_mixture", "uniform_cube"], default="gaussian_mixture")
    p.add_argument("--tokens", type=int, required=True, help="rows of activations to generate")
    p.add_argument("--d", type=int, required=True, help="width of each row (e.g. the d_model it stands in for)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=int, default=16, help="gaussian_mixture: number of components")
    p.add_argument("--spread", type=float, default=4.0, help="gaussian_mixture: std of the component means")
    p.add_argument("--scale", type=float, default=1.0, help="component std / half the cube's side")
    p.add_argument("--anisotropy", type=float, default=1.0, help="gaussian_mixture: ratio of largest to smallest std")
    p.add_argument("--ctx-len", type=int, default=128, help="rows per window of the synthetic token table")
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of windows in the holdout split")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true")


def cmd_synthetic(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.synthetic import synthetic
    from actstore.schemas.synthetic import SYNTHETIC_SITE, SyntheticConfig

    config = SyntheticConfig(
        kind=a.kind,
        n_tokens=a.tokens,
        d=a.d,
        seed=a.seed,
        components=a.components,
        spread=a.spread,
        scale=a.scale,
        anisotropy=a.anisotropy,
        ctx_len=a.ctx_len,
        holdout_fraction=a.holdout,
        chunk_tokens=a.chunk_tokens,
    )
    manifest = synthetic(a.store, config, progress=not a.no_progress)
    return {
        "harvest_id": manifest.id,
        "corpus_id": manifest.extra["corpus_id"],
        "site": SYNTHETIC_SITE,
        "n_tokens": manifest.counts["n_tokens"],
        "d": config.d,
        "tokens_per_s": manifest.timings.get("tokens_per_s"),
    }


def add_dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE id")
    p.add_argument("--harvest", required=True, help="harvest id the SAE was encoded on (actstore encode)")
    p.add_argument("--out", help="site directory (default: <store>/dashboards/<sae>/<harvest>)")
    p.add_argument("--top-k", type=int, default=20, help="top examples per feature page")
    p.add_argument("--context", type=int, default=8, help="tokens of context on each side of an example")
    p.add_argument("--per-bucket", type=int, default=5, help="examples per activation quantile bucket")
    p.add_argument("--no-logits", action="store_true", help="skip top logit tokens (no model load)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="processes writing pages (default: CPU count)")
    p.add_argument("--serve", action="store_true", help="serve the site on localhost after writing it")
    p.add_argument("--port", type=int, default=8000)


def cmd_dashboard(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.dashboard.flow import DashboardOptions, dashboard, dashboard_server

    options = DashboardOptions(top_k=a.top_k, context=a.context, per_bucket=a.per_bucket)
    site = dashboard(
        a.store,
        a.sae,
        a.harvest,
        out=a.out,
        logits=not a.no_logits,
        device=a.device,
        options=options,
        workers=a.workers,
    )
    index = site / "index.html"
    if not a.json:
        print(f"dashboard: {index}")
    if a.serve:
        server = dashboard_server(site, a.port)
        print(f"serving http://127.0.0.1:{server.server_address[1]}/index.html (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return {"path": str(index)}


def add_attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE id or checkpoint dir")
    p.add_argument("--harvest", required=True, help="harvest made with --gradients")
    p.add_argument("--site", help="site of the harvest (default: the SAE's hook, or the only site)")
    p.add_argument("--top-k", type=int, default=32, help="top tokens by |attribution| kept per feature")
    p.add_argument("--logit-k", type=int, default=10, help="top promoted / suppressed tokens per feature")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument(
        "--allow-mismatch", action="store_true", help="an SAE trained on another model or hook (transfer experiments)"
    )
    p.add_argument("--no-progress", action="store_true")


def cmd_attribute(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.attribute import attribute, attribution_dir
    from actstore.schemas.attribution import AttributeRuntime

    runtime = AttributeRuntime(
        device=a.device, batch_tokens=a.batch_tokens, allow_mismatch=a.allow_mismatch, progress=not a.no_progress
    )
    manifest = attribute(a.store, a.sae, a.harvest, site=a.site, top_k=a.top_k, logit_k=a.logit_k, runtime=runtime)
    sae_id, harvest_id = manifest.id.split("/")
    path = attribution_dir(Store(a.store), sae_id, harvest_id)
    if not a.json:
        print(f"attribution of {sae_id} on {harvest_id}: {path}")
    return {"sae_id": sae_id, "harvest_id": harvest_id, "path": str(path), **manifest.counts}


def add_direction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harvest", required=True, help="harvest id")
    p.add_argument("--site", required=True, help="site of the harvest")
    p.add_argument("--positive", required=True, help="SQL filter on the token table for the positive set")
    p.add_argument("--negative", required=True, help="SQL filter on the token table for the negative set")
    p.add_argument("--split", choices=["train", "holdout", "all"], default="train")


def cmd_direction(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.directions import direction
    from actstore.schemas.directions import DirectionConfig

    manifest = direction(
        a.store,
        DirectionConfig(harvest_id=a.harvest, site=a.site, positive=a.positive, negative=a.negative, split=a.split),
    )
    if not a.json:
        print(
            f"direction {manifest.id}: ||r|| = {manifest.extra['norm']:.4f} from {manifest.counts['positive']:,} "
            f"positive and {manifest.counts['negative']:,} negative tokens; harvest with "
            f"--ablate {manifest.id}@{a.site}"
        )
    return {"direction_id": manifest.id, **manifest.counts, **manifest.extra}
