"""The `actstore` command: one table of sub-commands, each with its options, and the one-line error contract.

Errors users can fix (a `UserError`, a bad flag) end in one line `error: ...` and exit 2. Terminal output is
ours: progress bars and summaries; Prefect's per-run log lines go to its server (when one is configured) and
reach the terminal only with `--verbose`. A step command run with no Prefect server configured runs its flow
as plain calls instead of starting a temporary server (`tracking.allow_untracked_runs`).
"""

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
from actstore.flows.cli.options import OneLineParser, add_shared
from actstore.flows.cli.pipelines import add_demo_args, add_run_args, add_serve_args, cmd_demo, cmd_run, cmd_serve
from actstore.flows.cli.query import add_query_args, cmd_query
from actstore.flows.cli.steps import (
    add_encode_args,
    add_harvest_args,
    add_ingest_args,
    add_train_args,
    cmd_encode,
    cmd_harvest,
    cmd_ingest,
    cmd_train,
)
from actstore.flows.cli.stored import add_export_args, cmd_export, cmd_ls, cmd_upgrade
from actstore.schemas.errors import UserError
from actstore.store.root import DEFAULT_ROOT


class Command(NamedTuple):
    """One sub-command of `actstore`."""

    run: Callable[[argparse.Namespace], dict[str, Any]]
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    store: bool = True
    """Takes `--store` (run and serve take the store from their config file)."""
    step: bool = True
    """Runs flows: with no Prefect server configured they run as plain calls (run / serve keep a server)."""


COMMANDS: dict[str, Command] = {
    "ingest": Command(cmd_ingest, "tokenize a corpus into the store's token table", add_ingest_args),
    "harvest": Command(cmd_harvest, "run a model over a corpus and store activations (resumable)", add_harvest_args),
    "train": Command(cmd_train, "train an SAE on a harvest's activations (resumable)", add_train_args),
    "encode": Command(
        cmd_encode, "encode a harvest with an SAE into the sparse-feature store (resumable)", add_encode_args
    ),
    "query": Command(
        cmd_query,
        "query the sparse-feature store: top examples, density, documents, tokens",
        add_query_args,
        step=False,
    ),
    "export": Command(
        cmd_export,
        "export activations or features to parquet / datasets / npy / safetensors",
        add_export_args,
        step=False,
    ),
    "eval": Command(cmd_eval, "evaluate an SAE on a harvest: reconstruction, latents, spliced CE loss", add_eval_args),
    "transfer": Command(
        cmd_transfer, "compare two models' activations on the same tokens and transfer their SAEs", add_transfer_args
    ),
    "direction": Command(
        cmd_direction, "difference-in-means direction between two token sets of a harvest site", add_direction_args
    ),
    "attribute": Command(
        cmd_attribute, "attribution patching of SAE features from a harvest's stored gradients", add_attribute_args
    ),
    "forecast": Command(
        cmd_forecast, "fit scaling laws to the store's losses and SAE evaluations, and forecast", add_forecast_args
    ),
    "dashboard": Command(
        cmd_dashboard, "render a static HTML feature dashboard for an SAE on a harvest", add_dashboard_args
    ),
    "synthetic": Command(
        cmd_synthetic,
        "write a synthetic activation set (Gaussian mixture, uniform cube) as a harvest",
        add_synthetic_args,
    ),
    "run": Command(
        cmd_run,
        "run a pipeline config: ingest, harvest, train, encode, eval, dashboard (resumable)",
        add_run_args,
        store=False,
        step=False,
    ),
    "serve": Command(
        cmd_serve, "serve a pipeline config as a scheduled Prefect deployment", add_serve_args, store=False, step=False
    ),
    "ls": Command(cmd_ls, "list what the store holds", lambda p: None, step=False),
    "upgrade": Command(
        cmd_upgrade, "bring the metadata of harvests written by earlier versions up to date", lambda p: None, step=False
    ),
    "demo": Command(
        cmd_demo,
        "the main job on the embedded default: ingest, harvest, train an SAE, encode, "
        "eval, attribute, forecast, dashboard",
        add_demo_args,
    ),
}

CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"

STORE_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--store",),
        {
            "default": os.environ.get("ACTSTORE_ROOT", DEFAULT_ROOT),
            "help": "store root directory or URL (default: $ACTSTORE_ROOT or ./actstore-data)",
        },
    ),
    (("--json",), {"action": "store_true", "help": "print a JSON summary on stdout"}),
    (("--verbose",), {"action": "store_true", "help": "also print Prefect's per-run log lines"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="actstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_args(p)
        subcommands = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        options = STORE_OPTIONS if command.store else STORE_OPTIONS[2:]
        add_shared([p, *(c for s in subcommands for c in dict.fromkeys(s.choices.values()))], options)
        p.set_defaults(fn=command.run, step=command.step)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Prefect's own setting: its console shows warnings only, its server still gets every line
    if args.verbose:
        os.environ.pop(CONSOLE_LEVEL, None)
    else:
        os.environ.setdefault(CONSOLE_LEVEL, "WARNING")
    try:
        if args.step:
            from actstore.flows.tracking import allow_untracked_runs

            allow_untracked_runs()
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
