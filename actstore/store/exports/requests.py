"""The two public exports and the checks of what they are asked for (format, rows, split, filters)."""

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from actstore.schemas.errors import UserError
from actstore.schemas.features import BY_FEATURE_DIR, BY_TOKEN_DIR
from actstore.schemas.ids import content_hash
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.exports.columns import ARRAY_DTYPES, TOKEN_COLUMNS, Column, ExportResult, Piece, first_line
from actstore.store.exports.shards import write_export
from actstore.store.exports.sources import TokenRows, activation_pieces, count_rows, feature_pieces
from actstore.store.root import Store

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


def export_activations(
    store: Store,
    harvest_id: str,
    site: str,
    out: str | Path,
    format: str,
    *,
    rows: tuple[int, int] | None = None,
    split: str | None = None,
    where: pl.Expr | str | None = None,
    token_columns: Sequence[str] = (),
    shard_rows: int | None = None,
) -> ExportResult:
    """Export one site of a finished harvest (rows in `tok` order) to `out` in `format`; see the module doc."""
    _check_format(format)
    array = store.activations(harvest_id, site)
    attrs = array.attrs
    start, stop = _check_rows(rows, attrs.n_tokens, f"{harvest_id}/{site}")
    _check_token_options(split, token_columns)
    predicate = token_predicate(split, where)
    tokens = None
    if predicate is not None or token_columns:
        store.manifest("corpus", attrs.corpus_id)
        tokens = TokenRows(store.corpus_dir(attrs.corpus_id), predicate, token_columns)
    width = array.shape[1] if len(array.shape) == 2 else None
    act_dtype = attrs.logical_dtype if format == "safetensors" else ARRAY_DTYPES[attrs.logical_dtype]
    columns = [Column("tok", "int64"), Column("act", act_dtype, width), *_token_column_specs(token_columns, format)]
    source = {
        "kind": "activations",
        "harvest_id": harvest_id,
        "site": site,
        "corpus_id": attrs.corpus_id,
        "n_tokens": attrs.n_tokens,
        "d": attrs.d,
        "logical_dtype": attrs.logical_dtype,
    }
    subset = {"rows": [start, stop], "split": split, **_where_json(where)}

    def pieces(with_values: bool) -> Iterator[Piece]:
        return activation_pieces(array, start, stop, tokens, act_dtype, with_values)

    count = (lambda: stop - start) if tokens is None or predicate is None else lambda: count_rows(pieces(False))
    return write_export(
        Path(out), format, f"{site}-{format}", source, subset, columns, attrs.logical_dtype, pieces, count, shard_rows
    )


def export_features(
    table_dir: str | Path,
    out: str | Path,
    format: str,
    *,
    order: Literal["feature", "token"] = "feature",
    features: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
    split: str | None = None,
    where: pl.Expr | str | None = None,
    token_table: str | Path | None = None,
    token_columns: Sequence[str] = (),
    shard_rows: int | None = None,
) -> ExportResult:
    """Export a feature table's triples (feature, tok, value) to `out` in `format`; see the module doc.

    `table_dir` holds `by_feature/part-*.parquet` and `by_token/part-*.parquet`; `order` picks the copy, and so
    the row order. `rows=(start, stop)` keeps toks in [start, stop). Token filters and columns (`split`, `where`,
    `token_columns`) need `token_table` (the corpus directory, `<store>/corpora/<corpus_id>`) and `order="token"`:
    only the token-sorted copy meets the token table a window at a time.
    """
    _check_format(format)
    table_dir = Path(table_dir)
    if order not in ("feature", "token"):
        raise UserError(f"order {order!r} is not a feature table copy: use 'feature' or 'token'")
    parts = sorted((table_dir / (BY_FEATURE_DIR if order == "feature" else BY_TOKEN_DIR)).glob("part-*.parquet"))
    if not parts:
        raise UserError(
            f"no feature table at {table_dir}: expected {BY_FEATURE_DIR}/ and {BY_TOKEN_DIR}/ part "
            "files; run the encode first or pass the table's directory"
        )
    value_dtype = _feature_value_dtype(parts[0])
    start, stop = _check_rows(rows, None, str(table_dir)) if rows is not None else (0, None)
    _check_token_options(split, token_columns)
    predicate = token_predicate(split, where)
    tokens = None
    if predicate is not None or token_columns:
        if order != "token":
            raise UserError(
                "token filters and token columns of a feature table need order='token' (the token-sorted "
                "copy): pass order='token' or drop split/where/token_columns"
            )
        if token_table is None:
            raise UserError(
                "split/where/token_columns need the token table: pass token_table=<store>/corpora/"
                "<corpus_id> (the corpus the features were encoded from)"
            )
        tokens = TokenRows(Path(token_table), predicate, token_columns)
    wanted = None if features is None else np.unique(np.asarray(list(features), dtype=np.int64))
    if wanted is not None and (len(wanted) == 0 or wanted[0] < 0 or wanted[-1] > np.iinfo(np.int32).max):
        raise UserError(f"features {list(features or [])[:8]} must be a non-empty set of latent indices >= 0")
    columns = [
        Column("feature", "int32"),
        Column("tok", "int64"),
        Column("value", value_dtype),
        *_token_column_specs(token_columns, format),
    ]
    source = {
        "kind": "features",
        "table": f"{table_dir.parent.name}/{table_dir.name}",
        "order": order,
        "value_dtype": value_dtype,
        "parts": content_hash([[p.name, p.stat().st_size] for p in parts], chars=16),
    }
    subset = {
        "rows": None if rows is None else [start, stop],
        "split": split,
        "features": None if wanted is None else wanted.tolist(),
        **_where_json(where),
    }
    selective = wanted is not None or rows is not None or predicate is not None

    def pieces(with_values: bool) -> Iterator[Piece]:
        return feature_pieces(parts, wanted, (start, stop), tokens, with_values)

    count = (
        (lambda: count_rows(pieces(False))) if selective else lambda: sum(pq.read_metadata(p).num_rows for p in parts)
    )
    return write_export(
        Path(out), format, f"features-{format}", source, subset, columns, value_dtype, pieces, count, shard_rows
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")


def _check_rows(rows: tuple[int, int] | None, n_tokens: int | None, what: str) -> tuple[int, int]:
    if rows is None:
        assert n_tokens is not None
        return 0, n_tokens
    start, stop = (int(r) for r in rows)
    if not 0 <= start < stop or (n_tokens is not None and stop > n_tokens):
        limit = f" <= {n_tokens}" if n_tokens is not None else ""
        raise UserError(f"row range {list(rows)} is not a range of {what}: pass 0 <= start < stop{limit}")
    return start, stop


def _check_token_options(split: str | None, token_columns: Sequence[str]) -> None:
    if split is not None and split not in SPLITS:
        raise UserError(f"split {split!r} is not a split: use one of {', '.join(SPLITS)}")
    unknown = [c for c in token_columns if c not in TOKEN_COLUMNS]
    if unknown or len(set(token_columns)) != len(token_columns):
        raise UserError(f"token columns {list(token_columns)} must be distinct names from {', '.join(TOKEN_COLUMNS)}")


def token_predicate(split: str | None, where: pl.Expr | str | None) -> pl.Expr | None:
    """The row filter on the token table: split and where together (None keeps every row)."""
    if isinstance(where, str):
        try:
            where = pl.sql_expr(where)
        except pl.exceptions.PolarsError as error:
            raise UserError(f"where {where!r} is not an SQL expression polars can parse: {first_line(error)}") from None
    parts = [e for e in (None if split is None else pl.col("split") == split, where) if e is not None]
    if not parts:
        return None
    predicate = parts[0] if len(parts) == 1 else parts[0] & parts[1]
    unknown = set(predicate.meta.root_names()) - set(TOKEN_SCHEMA.names)
    if unknown:
        raise UserError(
            f"where {where} names columns {sorted(unknown)} that the token table lacks: use "
            f"{', '.join(TOKEN_SCHEMA.names)}"
        )
    return predicate


def _where_json(where: pl.Expr | str | None) -> dict[str, Any]:
    """The filter as the manifest keeps it: readable text, and a hash of polars' full serialization (the text of
    a long expression may be abbreviated; the hash tells any two filters apart)."""
    if where is None:
        return {"where": None, "where_hash": None}
    expr = pl.sql_expr(where) if isinstance(where, str) else where
    return {
        "where": where if isinstance(where, str) else str(where),
        "where_hash": hashlib.sha256(expr.meta.serialize(format="json").encode()).hexdigest()[:16],
    }


def _token_column_specs(names: Sequence[str], fmt: str) -> list[Column]:
    types = {field.name: field.type for field in TOKEN_SCHEMA}
    table_format = fmt in ("parquet", "datasets")
    split_dtype = "string" if table_format else "int8"
    return [Column(n, split_dtype if n == "split" else np.dtype(types[n].to_pandas_dtype()).name) for n in names]


def _feature_value_dtype(part: Path) -> str:
    schema = pq.read_schema(part)
    found = {name: str(schema.field(name).type) for name in schema.names}
    if (
        found.get("feature") != "int32"
        or found.get("tok") != "int64"
        or found.get("value") not in ("halffloat", "float")
    ):
        raise UserError(
            f"{part} is not a feature table part (feature int32, tok int64, value float16|float32); "
            f"it has {found}: pass a feature table directory"
        )
    return "float16" if found["value"] == "halffloat" else "float32"
