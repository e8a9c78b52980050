"""The commands that read or tidy what is stored: `ls`, `export`, `upgrade`."""

import argparse
from typing import Any

from actstore.schemas.errors import ConfigError
from actstore.store.root import Store


def row_range(text: str) -> tuple[int, int]:
    """`START:STOP` of `--rows`: two whole numbers, START < STOP."""
    start, sep, stop = text.partition(":")
    if not sep or not start.strip().isdigit() or not stop.strip().isdigit() or int(start) >= int(stop):
        raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP with 0 <= START < STOP: e.g. --rows 0:4096")
    return int(start), int(stop)


def feature_list(text: str) -> list[int]:
    """`--features 3,17,42`: feature ids >= 0."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of feature ids: e.g. 3,17,42")
    return [int(t) for t in items]


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["activations", "features"])
    p.add_argument("--harvest", required=True, help="harvest id")
    p.add_argument("--site", help="activations: the site to export")
    p.add_argument("--sae", help="features: the SAE id")
    p.add_argument("--format", required=True, choices=["parquet", "datasets", "npy", "safetensors"])
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--rows", type=row_range, help="row range START:STOP")
    p.add_argument("--split", choices=["train", "holdout"])
    p.add_argument("--where", help="row filter on the token table, SQL, e.g. 'pos > 0 AND doc < 100'")
    p.add_argument("--token-columns", default="", help="comma-separated token columns to add, e.g. doc,pos")
    p.add_argument("--order", choices=["feature", "token"], default="feature", help="features: row order")
    p.add_argument("--features", type=feature_list, help="features: comma-separated feature ids to keep")


def cmd_export(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.store.exports import export_activations, export_features

    store = Store(a.store)
    columns = [c for c in a.token_columns.split(",") if c]
    if a.what == "activations":
        if not a.site:
            raise ConfigError("export activations needs --site (see `actstore ls` and the harvest manifest)")
        result = export_activations(
            store, a.harvest, a.site, a.out, a.format, rows=a.rows, split=a.split, where=a.where, token_columns=columns
        )
    else:
        if not a.sae:
            raise ConfigError("export features needs --sae SAE_ID")
        corpus = store.manifest("harvest", a.harvest).extra["corpus_id"]
        store.features(a.sae, a.harvest)  # fails clearly when the features do not exist
        result = export_features(
            store.features_dir(a.sae, a.harvest),
            a.out,
            a.format,
            order=a.order,
            features=a.features,
            rows=a.rows,
            split=a.split,
            where=a.where,
            token_table=store.corpus_dir(corpus),
            token_columns=columns,
        )
    return {"path": str(result.path), "written": result.written, **result.manifest.counts}


def cmd_ls(a: argparse.Namespace) -> dict[str, Any]:
    entries = Store(a.store).ls()
    if not a.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"store {a.store}")
        for col in ("kind", "id", "state", "tokens", "created"):
            table.add_column(col)
        for e in entries:
            state = "complete" if e.complete else "incomplete (re-run to resume)"
            table.add_row(e.kind, e.id, state, str(e.counts.get("n_tokens", "")), e.created)
        Console().print(table)
    return {"objects": [e._asdict() for e in entries]}


def cmd_upgrade(a: argparse.Namespace) -> dict[str, Any]:
    """Metadata of harvests written by earlier versions, brought up to date (no stored row changes)."""
    from actstore.store.activations import upgrade_harvest

    store = Store(a.store)
    if store.remote is not None:
        raise ConfigError(f"upgrade rewrites files in place: run it on a local store, not {store.location}")
    upgraded = [
        e.id for e in store.ls() if e.kind == "harvest" and e.complete and upgrade_harvest(store.harvest_dir(e.id))
    ]
    if not a.json:
        print(
            f"upgraded {len(upgraded)} harvest(s) to Zarr groups with dimension names"
            + "".join(f"\n  {h}" for h in upgraded)
        )
    return {"upgraded": upgraded}
