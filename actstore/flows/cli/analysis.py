"""Arguments and printing of the analysis commands: `eval`, `transfer`, `attribute`, `synthetic`, `dashboard`."""

import argparse
from typing import Any

from actstore.flows.cli.options import ConfigOptions, add_sae_on_harvest, non_negative_int, positive_int
from actstore.schemas.attribution import AttributeConfig, AttributeRuntime
from actstore.schemas.directions import DirectionConfig
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.eval_tables import DOWNSTREAM_FIELDS, RECONSTRUCTION_FIELDS
from actstore.schemas.synthetic import SyntheticConfig
from actstore.schemas.transfer import TransferConfig
from actstore.store.root import Store

EVAL = ConfigOptions(EvalConfig, exclude=("sae_id", "harvest_id", "site"), negated={"exclude_bos": "keep-bos"})
EVAL_RUNTIME = ConfigOptions(EvalRuntime, negated={"progress": "no-progress"})
TRANSFER = ConfigOptions(TransferConfig, flags={"sites": "site"}, negated={"exclude_bos": "keep-bos"})
SYNTHETIC = ConfigOptions(SyntheticConfig, flags={"n_tokens": "tokens", "holdout_fraction": "holdout"})
ATTRIBUTE = ConfigOptions(AttributeConfig, fields=("top_k", "logit_k"))
ATTRIBUTE_RUNTIME = ConfigOptions(AttributeRuntime, negated={"progress": "no-progress"})
DIRECTION = ConfigOptions(DirectionConfig, flags={"harvest_id": "harvest"})


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_sae_on_harvest(p)
    EVAL.add_to(p)
    EVAL_RUNTIME.add_to(p)


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.eval import evaluate
    from actstore.flows.saes import open_sae, stored_sae_id
    from actstore.store.harvests import choose_site, harvest_model_label
    from actstore.transforms.sae import check_compatible

    store = Store(a.store)
    harvest = store.manifest("harvest", a.harvest)
    sae, known_id = open_sae(a.store, a.sae)
    site = choose_site(harvest, a.site, sae.hook_name)
    check_compatible(
        sae, store.activations(a.harvest, site).attrs.d, site, harvest_model_label(harvest), a.allow_mismatch
    )
    config = EVAL.build(a, sae_id=stored_sae_id(a.store, a.sae, sae, known_id), harvest_id=a.harvest, site=site)
    manifest = evaluate(a.store, config, EVAL_RUNTIME.build(a))
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
    TRANSFER.add_to(p)
    EVAL_RUNTIME.add_to(p)


def cmd_transfer(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.transfer import transfer

    manifest = transfer(a.store, TRANSFER.build(a), EVAL_RUNTIME.build(a))
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
    SYNTHETIC.add_to(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def cmd_synthetic(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.synthetic import synthetic
    from actstore.schemas.synthetic import SYNTHETIC_SITE

    config = SYNTHETIC.build(a)
    manifest = synthetic(a.store, config, progress=a.progress)
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
    p.add_argument("--top-k", type=positive_int, default=20, help="top examples per feature page")
    p.add_argument("--context", type=non_negative_int, default=8, help="tokens of context on each side of an example")
    p.add_argument("--per-bucket", type=positive_int, default=5, help="examples per activation quantile bucket")
    p.add_argument("--no-logits", action="store_true", help="skip top logit tokens (no model load)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=positive_int, help="processes writing pages (default: CPU count)")
    p.add_argument("--serve", action="store_true", help="serve the site on localhost after writing it")
    p.add_argument("--port", type=non_negative_int, default=8000, help="localhost port (0: a free one)")


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
    add_sae_on_harvest(p, "harvest made with --gradients")
    ATTRIBUTE.add_to(p)
    ATTRIBUTE_RUNTIME.add_to(p)


def cmd_attribute(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.attribute import attribute, attribution_dir

    runtime = ATTRIBUTE_RUNTIME.build(a)
    manifest = attribute(a.store, a.sae, a.harvest, site=a.site, top_k=a.top_k, logit_k=a.logit_k, runtime=runtime)
    sae_id, harvest_id = manifest.id.split("/")
    path = attribution_dir(Store(a.store), sae_id, harvest_id)
    if not a.json:
        print(f"attribution of {sae_id} on {harvest_id}: {path}")
    return {"sae_id": sae_id, "harvest_id": harvest_id, "path": str(path), **manifest.counts}


def add_direction_args(p: argparse.ArgumentParser) -> None:
    DIRECTION.add_to(p)


def cmd_direction(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.directions import direction

    manifest = direction(a.store, DIRECTION.build(a))
    if not a.json:
        print(
            f"direction {manifest.id}: ||r|| = {manifest.extra['norm']:.4f} from {manifest.counts['positive']:,} "
            f"positive and {manifest.counts['negative']:,} negative tokens; harvest with "
            f"--ablate {manifest.id}@{a.site}"
        )
    return {"direction_id": manifest.id, **manifest.counts, **manifest.extra}
