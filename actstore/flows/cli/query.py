"""`actstore query`: the feature store's polars queries printed as tables, with decoded text."""

import argparse
from typing import Any

import polars as pl
from pydantic import Field

from actstore.flows.cli.options import OneLineParser, add_shared, checked, non_negative_int, positive_int, require
from actstore.store.feature_queries import FeatureQueries
from actstore.store.root import Store

fraction = checked(float, Field(ge=0, le=1))
"""`--dense 0.01`: a share of tokens."""

QUERY_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--sae",), {"help": "SAE id (see `actstore ls`); required"}),
    (("--harvest",), {"help": "harvest id; required"}),
    (("--limit",), {"type": positive_int, "default": 20, "help": "rows to print"}),
    (("--context",), {"type": non_negative_int, "default": 8, "help": "tokens of context either side"}),
]
"""Options of every query, given before or after its name (`query top 5 --sae S --harvest H`)."""


def add_query_args(p: argparse.ArgumentParser) -> None:
    what = p.add_subparsers(dest="query", required=True, parser_class=OneLineParser)
    for name, help_text in (
        ("top", "top examples of a feature"),
        ("quantiles", "examples across its range"),
        ("cooc", "features firing on the same tokens"),
    ):
        what.add_parser(name, help=help_text).add_argument("feature", type=non_negative_int)
    density = what.add_parser("density", help="per-feature density (densest first)")
    density.add_argument("--dead", action="store_true", help="only features that never fire")
    density.add_argument("--dense", type=fraction, help="only features denser than this fraction")
    what.add_parser("doc", help="features of one document").add_argument("doc", type=non_negative_int)
    rng = what.add_parser("range", help="features of a token range [start, stop)")
    rng.add_argument("start", type=non_negative_int)
    rng.add_argument("stop", type=non_negative_int)
    what.add_parser("token", help="features firing on a token (string or id)").add_argument("token")
    add_shared([p, *dict.fromkeys(what.choices.values())], QUERY_OPTIONS)


def open_queries(a: argparse.Namespace) -> FeatureQueries:
    """The feature store with the harvest model's tokenizer for decoding."""
    from actstore.schemas.model import ModelConfig
    from actstore.transforms.models import load_tokenizer

    store = Store(a.store)
    harvest = store.manifest("harvest", a.harvest)
    if harvest.extra.get("synthetic"):
        # synthetic rows stand for no text: contexts show one mark per row, the activating row in «»
        return store.features(a.sae, a.harvest, decode=lambda ids: "·" * len(ids))
    tokenizer = load_tokenizer(ModelConfig.model_validate(harvest.config["model"]))
    return store.features(
        a.sae,
        a.harvest,
        decode=lambda ids: tokenizer.decode(list(ids)),
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
    )


def cmd_query(a: argparse.Namespace) -> dict[str, Any]:
    require(a, "sae", "harvest")
    frame = run_query(a)
    if not a.json:
        print_frame(f"{a.query} · {a.sae} · {a.harvest}", frame)
    return {"rows": frame.to_dicts()}


def run_query(a: argparse.Namespace) -> pl.DataFrame:
    q = open_queries(a)
    token: int | str = int(a.token) if getattr(a, "token", "x").isdigit() else getattr(a, "token", "")
    frames: dict[str, Any] = {
        "top": lambda: q.top_examples(a.feature, k=a.limit, context=a.context).select(
            "rank", "tok", "doc", "value", "context_text"
        ),
        "quantiles": lambda: q.quantile_examples(a.feature, context=a.context).select(
            "bucket", "tok", "value", "context_text"
        ),
        "cooc": lambda: q.cooccurrence(a.feature, top=a.limit),
        "density": lambda: (
            q.dead()
            if a.dead
            else q.dense(a.dense)
            if a.dense is not None
            else q.density().sort("density", descending=True)
        ).head(a.limit),
        "doc": lambda: q.document(a.doc).head(a.limit),
        "range": lambda: q.token_range(a.start, a.stop).head(a.limit),
        "token": lambda: q.on_token(token).head(a.limit),
    }
    return frames[a.query]().collect()


def print_frame(title: str, frame: pl.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in frame.columns:
        table.add_column(column, overflow="fold")
    for row in frame.iter_rows():
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console().print(table)
