"""The `actstore` command: run and serve a pipeline config; ingest, harvest, train, encode, query, eval,
transfer, attribute, direction, forecast, dashboard, synthetic, export, ls, demo.

Errors users can fix end in one line and exit 2."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actstore.flows.cli.analysis import (
    add_attribute_args,
    add_dashboard_args,
    add_direction_args,
    add_eval_args,
    add_synthetic_args,
    add_transfer_args,
    cmd_attribute,
    cmd_dashboard,
    cmd_direction,
    cmd_eval,
    cmd_synthetic,
    cmd_transfer,
)
from actstore.flows.cli.forecast import add_forecast_args, cmd_forecast
from actstore.flows.cli.query import add_query_args
from actstore.schemas.errors import UserError
from actstore.store.root import DEFAULT_ROOT, Store


class _OneLineUserErrors(logging.Filter):
    """Prefect logs task failures with tracebacks; for a UserError the message alone is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_prefect_tracebacks() -> None:
    """Set Prefect's logging up now (it would on the first run) and filter every handler it installs."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(_OneLineUserErrors())


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("ACTSTORE_ROOT", DEFAULT_ROOT),
        help="store root directory (default: $ACTSTORE_ROOT or ./actstore-data)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["pydocs", "text", "jsonl", "parquet", "hf"], default="pydocs")
    p.add_argument("--path", action="append", default=[], help="input file, directory or glob (repeatable)")
    p.add_argument("--hf-name", help="Hugging Face dataset name or local dataset directory (--source hf)")
    p.add_argument("--hf-config", help="dataset configuration (--source hf)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-field", default="text", help="JSON field / column with the text")
    p.add_argument("--split-paragraphs", action="store_true", help="text files: one document per paragraph")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer: hub id, local dir, .gguf, smollm2-135m")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per window")
    p.add_argument("--no-bos", action="store_true", help="do not start windows with BOS")
    p.add_argument("--separator", choices=["eos", "bos", "none"], default="eos")
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of documents in the holdout split")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens")
    p.add_argument("--max-docs", type=int, help="stop after this many documents")


def _corpus_config(a: argparse.Namespace) -> Any:
    from actstore.schemas.corpus import CorpusConfig
    from actstore.schemas.model import ModelConfig

    return CorpusConfig(
        source=a.source,
        paths=tuple(a.path),
        hf_name=a.hf_name,
        hf_config=a.hf_config,
        hf_split=a.hf_split,
        text_field=a.text_field,
        split_paragraphs=a.split_paragraphs,
        tokenizer=ModelConfig(name=a.model),
        ctx_len=a.ctx_len,
        add_bos=not a.no_bos,
        separator=a.separator,
        holdout_fraction=a.holdout,
        max_tokens=a.max_tokens,
        max_docs=a.max_docs,
    )


def cmd_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.ingest import ingest

    manifest = ingest(a.store, _corpus_config(a))
    return {"corpus_id": manifest.id, **manifest.counts}


def _add_harvest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="corpus id (see `actstore ls`)")
    p.add_argument("--model", help="hub id, local dir, .gguf or smollm2-135m (default: the corpus tokenizer's)")
    p.add_argument("--model-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.add_argument(
        "--control",
        choices=["reinit", "permute", "perturb"],
        help="harvest a control copy of the model: weights re-initialised, permuted or perturbed (seeded)",
    )
    p.add_argument("--control-seed", type=int, default=0)
    p.add_argument("--control-scale", type=float, help="perturb: noise std relative to each weight tensor's std")
    p.add_argument(
        "--control-keep-embeddings", action="store_true", help="leave the token embedding and unembedding as trained"
    )
    p.add_argument("--site", action="append", required=True, help="blocks.L.hook_resid_post etc. (repeatable)")
    p.add_argument("--loss", action="store_true", help="also store per-token next-token loss (full forward)")
    p.add_argument(
        "--gradients",
        choices=["loss", "logit_diff"],
        help="also store d(metric summed over each window)/d(activation) at every site (for attribute)",
    )
    p.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="DIRECTION_ID@SITE[,SITE]",
        help="ablate a direction (actstore direction) at sites during the forward (repeatable)",
    )
    p.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="DIRECTION_ID@SITE[,SITE]:ALPHA",
        help="add alpha x a direction at sites during the forward (repeatable)",
    )
    p.add_argument(
        "--logit-diff",
        nargs=2,
        type=int,
        metavar=("A", "B"),
        help="--gradients logit_diff: the metric is logit[A] - logit[B] at every position",
    )
    p.add_argument("--store-dtype", choices=["model", "float32", "float16", "bfloat16"], default="model")
    p.add_argument("--batch-windows", type=int, help="windows per forward batch (default ~4096 tokens)")
    p.add_argument("--max-tokens", type=int, help="harvest only the first tokens of the corpus")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _harvest_config(a: argparse.Namespace, store_root: str) -> Any:
    from actstore.schemas.harvest import HarvestConfig
    from actstore.schemas.model import ModelConfig, ModelControl
    from actstore.store.root import Store

    if a.control is None and (a.control_scale is not None or a.control_keep_embeddings):
        raise UserError("--control-scale and --control-keep-embeddings need --control reinit|permute|perturb")
    control = (
        None
        if a.control is None
        else ModelControl(
            kind=a.control, seed=a.control_seed, scale=a.control_scale, keep_embeddings=a.control_keep_embeddings
        )
    )
    if a.model:
        model = ModelConfig(name=a.model, dtype=a.model_dtype, control=control)
    else:
        corpus = Store(store_root).manifest("corpus", a.corpus)
        model = ModelConfig.model_validate({**corpus.config["tokenizer"], "dtype": a.model_dtype, "control": control})
    return HarvestConfig(
        corpus_id=a.corpus,
        model=model,
        sites=tuple(a.site),
        loss=a.loss,
        store_dtype=a.store_dtype,
        batch_windows=a.batch_windows,
        max_tokens=a.max_tokens,
        gradient_metric=a.gradients,
        logit_diff_tokens=tuple(a.logit_diff) if a.logit_diff else None,
        interventions=tuple(
            parse_intervention(kind, text) for kind, texts in (("ablate", a.ablate), ("add", a.add)) for text in texts
        ),
    )


def parse_intervention(kind: str, text: str) -> Any:
    """`DIRECTION_ID@SITE[,SITE]` (ablate) or `DIRECTION_ID@SITE[,SITE]:ALPHA` (add)."""
    from actstore.schemas.directions import Intervention

    form = "DIRECTION_ID@SITE[,SITE]" + (":ALPHA" if kind == "add" else "")
    head, _, alpha = text.rpartition(":") if kind == "add" else (text, "", "")
    direction_id, _, sites = head.partition("@")
    try:
        value = float(alpha) if kind == "add" else 1.0
    except ValueError:
        value = None
    if not direction_id or not sites or value is None:
        raise UserError(
            f"--{kind} {text!r} is not {form}: e.g. --{kind} direction-L6-1a2b3c4d@blocks.6.hook_resid_post"
            + (":4.0" if kind == "add" else "")
        )
    return Intervention(kind=kind, direction_id=direction_id, sites=tuple(sites.split(",")), alpha=value)


def cmd_harvest(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.harvest import harvest
    from actstore.schemas.harvest import HarvestRuntime

    runtime = HarvestRuntime(device=a.device, threads=a.threads, progress=not a.no_progress)
    manifest = harvest(a.store, _harvest_config(a, a.store), runtime)
    return {
        "harvest_id": manifest.id,
        "n_tokens": manifest.counts["n_tokens"],
        "sites": list(manifest.extra["arrays"]),
        "tokens_per_s": manifest.timings.get("tokens_per_s"),
        "device": manifest.extra.get("device"),
    }


def _add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE checkpoint dir/file (SAELens, sparsify, Gemma Scope) or SAE id")
    p.add_argument("--harvest", required=True, help="harvest id (see `actstore ls`)")
    p.add_argument("--site", help="harvest site to encode (default: the SAE's hook, or the only site)")
    p.add_argument("--value-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="encode even if the SAE was trained on another model or hook (transfer experiments)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true")


def cmd_encode(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.encode import encode
    from actstore.schemas.encode import EncodeRuntime

    runtime = EncodeRuntime(
        device=a.device, batch_tokens=a.batch_tokens, allow_mismatch=a.allow_mismatch, progress=not a.no_progress
    )
    manifest = encode(a.store, a.sae, a.harvest, a.site, a.value_dtype, runtime)
    sae_id, harvest_id = manifest.id.split("/")
    return {
        "sae_id": sae_id,
        "harvest_id": harvest_id,
        "site": manifest.extra["site"],
        **manifest.counts,
        "path": str(Store(a.store).features_dir(sae_id, harvest_id)),
    }


def cmd_query(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.cli.query import print_frame, run_query

    frame = run_query(a)
    if not a.json:
        print_frame(f"{a.query} · {a.sae} · {a.harvest}", frame)
    return {"rows": frame.to_dicts()}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harvest", required=True, help="harvest id")
    p.add_argument("--site", required=True, help="site of the harvest to train on")
    p.add_argument("--architecture", choices=["topk", "batchtopk", "jumprelu", "standard"], default="topk")
    p.add_argument("--d-sae", type=int, help="latents (default: 4 x d_in)")
    p.add_argument("--k", type=float, default=32, help="topk/batchtopk: latents per token")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--l1", type=float, default=5.0, help="standard: L1 coefficient")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: L0 coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def train_run_from_args(a: argparse.Namespace) -> Any:
    from actstore.schemas.train import TrainConfig
    from actstore.schemas.train_run import TrainRun

    k = None if a.architecture in ("jumprelu", "standard") else (int(a.k) if a.architecture == "topk" else a.k)
    train = TrainConfig(
        architecture=a.architecture,
        d_sae=a.d_sae,
        expansion_factor=None if a.d_sae else 4,
        k=k,
        total_tokens=a.tokens,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        l1_coefficient=a.l1,
        l0_coefficient=a.l0,
        seed=a.seed,
        device=a.device,
    )
    return TrainRun(harvest_id=a.harvest, site=a.site, train=train, checkpoint_every=a.checkpoint_every)


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.train import train

    manifest = train(a.store, train_run_from_args(a), progress=not a.no_progress)
    return {
        "sae_id": manifest.id,
        **manifest.counts,
        **manifest.extra["eval_holdout"],
        "path": str(Store(a.store).sae_dir(manifest.id)),
    }


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["activations", "features"])
    p.add_argument("--harvest", required=True, help="harvest id")
    p.add_argument("--site", help="activations: the site to export")
    p.add_argument("--sae", help="features: the SAE id")
    p.add_argument("--format", required=True, choices=["parquet", "datasets", "npy", "safetensors"])
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--rows", help="row range START:STOP")
    p.add_argument("--split", choices=["train", "holdout"])
    p.add_argument("--where", help="row filter on the token table, SQL, e.g. 'pos > 0 AND doc < 100'")
    p.add_argument("--token-columns", default="", help="comma-separated token columns to add, e.g. doc,pos")
    p.add_argument("--order", choices=["feature", "token"], default="feature", help="features: row order")
    p.add_argument("--features", help="features: comma-separated feature ids to keep")


def cmd_export(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.store.exports import export_activations, export_features

    store = Store(a.store)
    rows = tuple(int(x) for x in a.rows.split(":")) if a.rows else None
    columns = [c for c in a.token_columns.split(",") if c]
    if a.what == "activations":
        if not a.site:
            raise UserError("export activations needs --site (see `actstore ls` and the harvest manifest)")
        result = export_activations(
            store,
            a.harvest,
            a.site,
            a.out,
            a.format,
            rows=rows,
            split=a.split,  # type: ignore[arg-type]
            where=a.where,
            token_columns=columns,
        )
    else:
        if not a.sae:
            raise UserError("export features needs --sae SAE_ID")
        corpus = store.manifest("harvest", a.harvest).extra["corpus_id"]
        store.features(a.sae, a.harvest)  # fails clearly when the features do not exist
        result = export_features(
            store.features_dir(a.sae, a.harvest),
            a.out,
            a.format,
            order=a.order,
            features=[int(f) for f in a.features.split(",")] if a.features else None,
            rows=rows,
            split=a.split,
            where=a.where,  # type: ignore[arg-type]
            token_table=store.corpus_dir(corpus),
            token_columns=columns,
        )
    return {"path": str(result.path), "written": result.written, **result.manifest.counts}


def cmd_ls(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.store.root import Store

    entries = Store(a.store).ls()
    if not a.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"store {a.store}")
        for col in ("kind", "id", "state", "tokens", "created"):
            table.add_column(col)
        for e in entries:
            table.add_row(
                e.kind,
                e.id,
                "complete" if e.complete else "incomplete (re-run to resume)",
                str(e.counts.get("n_tokens", "")),
                e.created,
            )
        Console().print(table)
    return {"objects": [e._asdict() for e in entries]}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config file (.yaml / .toml), e.g. infra/pipeline.yaml")
    p.add_argument("--store", help="store root (default: the config's `store`, relative to the config file)")
    p.add_argument("--dask", metavar="ADDRESS", help="run shard tasks on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, help="run shard tasks on a local Dask cluster of N worker processes")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def cmd_run(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.orchestration.pipeline import run_pipeline
    from actstore.flows.orchestration.report import summary_markdown
    from actstore.schemas.pipeline import load_pipeline_config

    summary = run_pipeline(a.config, a.dask, a.workers, a.store)
    if not a.json:
        print(summary_markdown(load_pipeline_config(a.config), summary))
    return summary


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config file with a `schedule` section")
    p.add_argument("--database-url", help="Postgres URL for a server started here (default: SQLite in PREFECT_HOME)")
    p.add_argument("--port", type=int, help="port of a server started here (default: a free one)")
    p.add_argument("--dask", metavar="ADDRESS", help="each run's shard tasks go to this Dask scheduler")
    p.add_argument("--workers", type=int, help="each run starts a local Dask cluster of N worker processes")
    p.add_argument("--json", action="store_true")


def cmd_serve(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.orchestration.serve import serve_pipeline

    serve_pipeline(a.config, a.database_url, a.port, a.dask, a.workers)
    return {}


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.cli.demo import run_demo

    return run_demo(a.store, tokens=a.tokens, layer=a.layer, device=a.device, train_tokens=a.train_tokens)


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=120_000, help="tokens to ingest and harvest")
    p.add_argument("--train-tokens", type=int, default=409_600, help="SAE training tokens")
    p.add_argument("--layer", type=int, help="block whose resid_post is harvested (default: middle)")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[
        str, tuple[Callable[[argparse.Namespace], dict[str, Any]], str, Callable[[argparse.ArgumentParser], None]]
    ] = {
        "ingest": (cmd_ingest, "tokenize a corpus into the store's token table", _add_corpus_args),
        "harvest": (cmd_harvest, "run a model over a corpus and store activations (resumable)", _add_harvest_args),
        "encode": (
            cmd_encode,
            "encode a harvest with an SAE into the sparse-feature store (resumable)",
            _add_encode_args,
        ),
        "query": (
            cmd_query,
            "query the sparse-feature store: top examples, density, documents, tokens",
            add_query_args,
        ),
        "train": (cmd_train, "train an SAE on a harvest's activations (resumable)", _add_train_args),
        "export": (
            cmd_export,
            "export activations or features to parquet / datasets / npy / safetensors",
            _add_export_args,
        ),
        "eval": (cmd_eval, "evaluate an SAE on a harvest: reconstruction, latents, spliced CE loss", add_eval_args),
        "transfer": (
            cmd_transfer,
            "compare two models' activations on the same tokens and transfer their SAEs",
            add_transfer_args,
        ),
        "direction": (
            cmd_direction,
            "difference-in-means direction between two token sets of a harvest site",
            add_direction_args,
        ),
        "attribute": (
            cmd_attribute,
            "attribution patching of SAE features from a harvest's stored gradients",
            add_attribute_args,
        ),
        "forecast": (
            cmd_forecast,
            "fit scaling laws to the store's losses and SAE evaluations, and forecast",
            add_forecast_args,
        ),
        "dashboard": (
            cmd_dashboard,
            "render a static HTML feature dashboard for an SAE on a harvest",
            add_dashboard_args,
        ),
        "synthetic": (
            cmd_synthetic,
            "write a synthetic activation set (Gaussian mixture, uniform cube) as a harvest",
            add_synthetic_args,
        ),
        "run": (
            cmd_run,
            "run a pipeline config: ingest, harvest, train, encode, eval, dashboard (resumable)",
            _add_run_args,
        ),
        "serve": (cmd_serve, "serve a pipeline config as a scheduled Prefect deployment", _add_serve_args),
        "ls": (cmd_ls, "list what the store holds", lambda p: None),
        "demo": (
            cmd_demo,
            "ingest, harvest, train an SAE, encode: the embedded default model on pydocs",
            _add_demo_args,
        ),
    }
    for name, (fn, help_text, add_args) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name not in ("run", "serve"):  # they take the store from the config file
            _add_store(p)
        p.set_defaults(fn=fn)
        add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in ("ls", "query", "export"):
            _quiet_prefect_tracebacks()
        summary = args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
