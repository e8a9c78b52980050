"""The commands that run whole pipelines: `run` and `serve` a pipeline config, and the `demo`."""

import argparse
from typing import Any

from actstore.flows.cli.options import non_negative_int, positive_int


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config file (.yaml / .toml), e.g. infra/pipeline.yaml")
    p.add_argument("--store", help="store root (default: the config's `store`, relative to the config file)")
    p.add_argument("--dask", metavar="ADDRESS", help="run shard tasks on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=positive_int, help="run shard tasks on a local Dask cluster of N worker processes")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def cmd_run(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.orchestration.pipeline import run_pipeline
    from actstore.flows.orchestration.report import summary_markdown
    from actstore.schemas.pipeline import load_pipeline_config

    summary = run_pipeline(a.config, a.dask, a.workers, a.store)
    if not a.json:
        print(summary_markdown(load_pipeline_config(a.config), summary))
    return summary


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config file with a `schedule` section")
    p.add_argument("--database-url", help="Postgres URL for a server started here (default: SQLite in PREFECT_HOME)")
    p.add_argument("--port", type=positive_int, help="port of a server started here (default: a free one)")
    p.add_argument("--dask", metavar="ADDRESS", help="each run's shard tasks go to this Dask scheduler")
    p.add_argument("--workers", type=positive_int, help="each run starts a local Dask cluster of N worker processes")
    p.add_argument("--json", action="store_true")


def cmd_serve(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.orchestration.serve import serve_pipeline

    serve_pipeline(a.config, a.database_url, a.port, a.dask, a.workers)
    return {}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=positive_int, default=120_000, help="tokens to ingest and harvest")
    p.add_argument("--train-tokens", type=positive_int, default=409_600, help="SAE training tokens")
    p.add_argument("--layer", type=non_negative_int, help="block whose resid_post is harvested (default: middle)")
    p.add_argument("--device", default="auto")


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.cli.demo import run_demo

    return run_demo(a.store, tokens=a.tokens, layer=a.layer, device=a.device, train_tokens=a.train_tokens)
