"""Dataset exports: one activation array or feature table (or a subset of it) as Parquet, Hugging Face datasets,
NumPy or safetensors shards, with a manifest, published atomically.

    export_activations(store, harvest_id, "blocks.6.hook_resid_post", "out/l6", "parquet", split="train")
    export_features(table_dir, "out/f17", "safetensors", features=[17])
    verify_export("out/l6")                                   # re-read every shard; checksums too

An export directory (file names depend only on the request, so a re-run writes the same names):

    parquet      part-00000.parquet ...      columns tok, act (FixedSizeList<float>[d]) [+ token columns]
    datasets     data-00000-of-0000N.arrow, state.json, dataset_info.json: `datasets.load_from_disk(dir)`
    npy          act-00000.npy, tok-00000.npy ...  one file per column per shard, `np.load(f, mmap_mode="r")`
    safetensors  shard-00000.safetensors ...  tensors tok, act [+ token columns], `safetensors.safe_open`
    manifest.json  kind `export`: the request (source ids, site, subset, format), row count, dtypes, and every
                   shard with its row range, files, bytes and sha256; written last

Feature tables export the columns feature, tok, value instead of tok, act. Every shard but the last holds
exactly `shard_rows` rows (default: about DEFAULT_SHARD_BYTES); rows keep the source order (`tok` order for
activations, the chosen copy's order for feature tables).

dtypes. Values keep their stored bits: float32 and float16 stay as they are. bfloat16 stays bfloat16 in
safetensors, which has the type; Arrow, Parquet, datasets and NumPy have none, so there it is widened to float32,
which is exact (`x.to(torch.bfloat16)` gives the stored bits back) and readable by every consumer without a
convention about uint16 bit patterns. The logical dtype is kept in the manifest (`extra.logical_dtype`), the
Parquet/Arrow key-value metadata (`actstore`) and the safetensors `__metadata__`. Token columns are doc, seq, pos,
token_id (TOKEN_SCHEMA types) and split: a string in Parquet/datasets, int8 codes into SPLITS in npy/safetensors.

Subsets: `rows=(start, stop)` keeps toks in [start, stop); `split` keeps `train` or `holdout` tokens; `where` is a
polars expression (or SQL string, `"pos > 0 AND doc < 100"`) on the token table, evaluated on a window of token
rows at a time, so it must be row-wise (comparisons, `is_in`, arithmetic), not an aggregation; `features` keeps
those latents of a feature table.

Memory: the stream is read one chunk at a time (`chunk_tokens` rows of an array, one Parquet batch of a feature
table) and written chunk by chunk (table formats gather up to BLOCK_BYTES per row group); array formats are
pre-sized, which needs the kept row count first, so a filtered npy/safetensors export reads the filter inputs
twice (the token table, or a feature table's feature and tok columns).
The datasets format stages Arrow files and lets `Dataset.save_to_disk` (which reads them memory-mapped) write
the final shards, so its data is written twice.

Exactly once: the export is built in a staged sibling directory, verified by reading every shard back (rows,
columns, dtypes, shapes), checksummed, given its manifest and renamed into place. Running the same export again
finds the manifest, checks the shards' headers and returns without writing; a directory holding something else
is refused.
"""

import hashlib
import json
import os
import shutil
import struct
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import UserError
from actstore.schemas.features import BY_FEATURE_DIR, BY_TOKEN_DIR
from actstore.schemas.ids import content_hash, make_id, slug
from actstore.schemas.manifest import Manifest
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.activations import ActivationArray
from actstore.store.files import explain_os_error, read_manifest, staged_directory, write_manifest
from actstore.store.objects import code_version, utc_now
from actstore.store.root import Store

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")
TOKEN_COLUMNS: tuple[str, ...] = ("doc", "seq", "pos", "token_id", "split")
"""Token-table columns an export can carry beside `tok`."""
EXPORT_FORMAT_TAG = "actstore.export/1"
"""Key-value metadata tag: which writer made a shard, so a reader knows the conventions above."""
DEFAULT_SHARD_BYTES = 256 << 20
"""Default shard size: big enough that per-file overhead vanishes, small enough to copy and check one at a time."""
BLOCK_BYTES = 32 << 20
"""Rows gathered into one Parquet row group or Arrow batch (at most this many bytes), so a filter that keeps a few
rows per chunk does not make tiny row groups; array formats write each chunk in place instead."""
FEATURE_BATCH_ROWS = 1 << 17
"""Triples read from a feature table at once (1.8 MB at float16)."""

_ARRAY_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
"""Exported dtype of activations in formats without bfloat16."""
_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int8": "I8",
}
_SPLIT_NAMES = np.array(SPLITS, dtype=object)


class Column(NamedTuple):
    """One exported column, as the format stores it."""

    name: str
    dtype: str
    """Stored dtype: float32, float16, bfloat16 (safetensors only), int64, int32, int8 or string."""
    width: int | None = None
    """Values per row (`d` of `act`); None for one value per row."""

    def row_bytes(self) -> int:
        size = 8 if self.dtype == "string" else 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return size * (self.width or 1)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [] if self.width is None else [self.width]}


class ExportResult(NamedTuple):
    """What an export call left on disk."""

    path: Path
    manifest: Manifest
    written: bool
    """False when the directory already held this export: the call was a no-op."""


Piece = dict[str, np.ndarray]
"""Kept rows of every column, in output order; `split` as int8 codes, bf16 (safetensors) as uint16 bits."""


# --- public API --------------------------------------------------------------------------------------------------


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
        tokens = _TokenRows(store.corpus_dir(attrs.corpus_id), predicate, token_columns)
    width = array.shape[1] if len(array.shape) == 2 else None
    act_dtype = attrs.logical_dtype if format == "safetensors" else _ARRAY_DTYPES[attrs.logical_dtype]
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
        return _activation_pieces(array, start, stop, tokens, act_dtype, with_values)

    count = (lambda: stop - start) if tokens is None or predicate is None else lambda: _count(pieces(False))
    return _export(
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
        tokens = _TokenRows(Path(token_table), predicate, token_columns)
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
        return _feature_pieces(parts, wanted, (start, stop), tokens, with_values)

    count = (lambda: _count(pieces(False))) if selective else lambda: sum(pq.read_metadata(p).num_rows for p in parts)
    return _export(
        Path(out), format, f"features-{format}", source, subset, columns, value_dtype, pieces, count, shard_rows
    )


def verify_export(out: str | Path, checksums: bool = True) -> Manifest:
    """Re-read a finished export's shards and compare them with its manifest: files, bytes, rows, columns, dtypes,
    shapes (and sha256 with `checksums`). Returns the manifest; any difference is a UserError naming the file."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.kind != "export":
        raise UserError(f"{out} is not a finished export (no export manifest.json): run the export to make it")
    fmt = manifest.extra["format"]
    columns = [
        Column(spec["name"], spec["dtype"], spec["shape"][0] if spec["shape"] else None)
        for spec in manifest.extra["columns"]
    ]
    for shard in manifest.extra["shards"]:
        _check_shard(out, fmt, columns, [f["path"] for f in shard["files"]], shard["rows"])
        for entry in shard["files"]:
            path = out / entry["path"]
            size = path.stat().st_size
            if size != entry["bytes"]:
                problem = f"has {size} bytes, its manifest says {entry['bytes']}"
            elif checksums and _sha256(path) != entry["sha256"]:
                problem = "does not match the sha256 in its manifest"
            else:
                continue
            raise UserError(
                f"export file {path} {problem}: the export was altered; delete the directory and re-run the export"
            )
    if fmt == "datasets":
        _check_loadable_dataset(out, columns, manifest.counts["rows"])
    return manifest


# --- checks of the request ---------------------------------------------------------------------------------------


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
            raise UserError(
                f"where {where!r} is not an SQL expression polars can parse: {_first_line(error)}"
            ) from None
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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- sources: streams of kept rows -------------------------------------------------------------------------------


class _TokenRows:
    """Token rows of a `tok` range and the filter's verdict on them, reading only the row groups that hold them.

    The token table is sorted by `tok` and contiguous from 0 (store/tokens.py), so row number = `tok`: a range of
    toks is a range of row groups. The last row groups read are kept, since consecutive chunks share them.
    """

    def __init__(self, directory: Path, predicate: pl.Expr | None, token_columns: Sequence[str]) -> None:
        self.dir = directory
        self.predicate, self.token_columns = predicate, list(token_columns)
        needed = set(token_columns) | set(() if predicate is None else predicate.meta.root_names())
        self.read_columns = ["tok", *sorted(needed - {"tok"})]
        self.groups: list[tuple[Path, int]] = []
        starts = [0]
        for part in sorted(directory.glob("part-*.parquet")):
            metadata = pq.read_metadata(part)
            for g in range(metadata.num_row_groups):
                self.groups.append((part, g))
                starts.append(starts[-1] + metadata.row_group(g).num_rows)
        if not self.groups:
            raise UserError(f"token table {directory} has no part-*.parquet files: run `actstore ingest` first")
        self.starts = starts
        self.cache: dict[int, pl.DataFrame] = {}

    def _group(self, index: int) -> pl.DataFrame:
        if index not in self.cache:
            part, g = self.groups[index]
            table = pq.ParquetFile(part).read_row_group(g, columns=self.read_columns)
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            if "split" in frame.columns:
                frame = frame.with_columns(pl.col("split").cast(pl.String))
            self.cache = {k: v for k, v in self.cache.items() if k >= index - 1}
            self.cache[index] = frame
        return self.cache[index]

    def rows(self, start: int, stop: int) -> pl.DataFrame:
        """Token rows `start <= tok < stop`, in `tok` order."""
        if stop > self.starts[-1]:
            raise UserError(
                f"token table {self.dir} has {self.starts[-1]} tokens but rows up to tok {stop} are "
                "exported: pass the token table of the corpus these activations came from"
            )
        first = bisect_right(self.starts, start) - 1
        frames = []
        for g in range(first, len(self.groups)):
            if self.starts[g] >= stop:
                break
            frames.append(self._group(g))
        frame = pl.concat(frames) if len(frames) > 1 else frames[0]
        frame = frame.slice(start - self.starts[first], stop - start)
        tok = frame["tok"].to_numpy()
        if tok[0] != start or tok[-1] != stop - 1:
            raise UserError(f"token table {self.dir} is not sorted by tok from 0: re-run `actstore ingest`")
        return frame

    def window(self, start: int, stop: int, with_columns: bool) -> tuple[np.ndarray | None, Piece]:
        """The keep mask of toks [start, stop) (None: all kept) and, with `with_columns`, the token columns."""
        frame = self.rows(start, stop)
        keep = None
        if self.predicate is not None:
            try:
                verdict = frame.select(self.predicate.fill_null(False).alias("keep"))["keep"]
            except pl.exceptions.PolarsError as error:
                raise UserError(f"filter {self.predicate} fails on the token table: {_first_line(error)}") from None
            if verdict.dtype != pl.Boolean or verdict.len() != frame.height:
                raise UserError(
                    f"filter {self.predicate} must give one true/false per token row (a row-wise "
                    f"boolean expression), it gave {verdict.len()} values of {verdict.dtype}"
                )
            keep = verdict.to_numpy()
        columns: Piece = {}
        if with_columns:
            for name in self.token_columns:
                series = frame[name]
                if name == "split":
                    series = series.replace_strict({s: i for i, s in enumerate(SPLITS)}, return_dtype=pl.Int8)
                columns[name] = series.to_numpy()
        return keep, columns


def _activation_pieces(
    array: ActivationArray, start: int, stop: int, tokens: _TokenRows | None, act_dtype: str, with_values: bool
) -> Iterator[Piece]:
    """Kept rows of [start, stop), one Zarr chunk at a time; chunks the filter empties are not read."""
    chunk = array.chunk_tokens
    widen = array.dtype == "bfloat16" and act_dtype == "float32"
    for first in range(start - start % chunk, stop, chunk):
        a, b = max(first, start), min(first + chunk, stop)
        keep, token_cols = tokens.window(a, b, with_values) if tokens is not None else (None, {})
        if keep is not None and not keep.any():
            continue
        piece: Piece = {"tok": np.arange(a, b, dtype=np.int64), **token_cols}
        if with_values:
            raw = array.zarr[a:b]
            piece["act"] = (raw.astype(np.uint32) << 16).view(np.float32) if widen else raw
        yield piece if keep is None else {name: values[keep] for name, values in piece.items()}


def _feature_pieces(
    parts: list[Path],
    wanted: np.ndarray | None,
    rows: tuple[int, int | None],
    tokens: _TokenRows | None,
    with_values: bool,
) -> Iterator[Piece]:
    """Kept triples, one Parquet batch at a time; row groups whose statistics rule them out are not read."""
    read = ["feature", "tok", "value"] if with_values else ["feature", "tok"]
    for part in parts:
        parquet = pq.ParquetFile(part)
        for g in range(parquet.num_row_groups):
            if not _row_group_may_match(parquet.metadata.row_group(g), wanted, rows):
                continue
            for batch in parquet.iter_batches(FEATURE_BATCH_ROWS, row_groups=[g], columns=read):
                piece: Piece = {name: batch.column(name).to_numpy() for name in batch.schema.names}
                keep = np.ones(batch.num_rows, dtype=bool)
                if wanted is not None:
                    keep &= np.isin(piece["feature"], wanted)
                if rows[1] is not None:
                    keep &= (piece["tok"] >= rows[0]) & (piece["tok"] < rows[1])
                if tokens is not None and keep.any():
                    tok = piece["tok"]
                    lo = int(tok[keep].min())
                    token_keep, token_cols = tokens.window(lo, int(tok[keep].max()) + 1, with_values)
                    local = np.where(keep, tok - lo, 0)
                    if token_keep is not None:
                        keep &= token_keep[local]
                    piece.update({name: values[local] for name, values in token_cols.items()})
                if keep.any():
                    yield {name: values[keep] for name, values in piece.items()}


def _row_group_may_match(group: pq.RowGroupMetaData, wanted: np.ndarray | None, rows: tuple[int, int | None]) -> bool:
    names = {group.column(i).path_in_schema: i for i in range(group.num_columns)}
    for name, low, high in (
        ("feature", None if wanted is None else wanted[0], None if wanted is None else wanted[-1]),
        ("tok", rows[0], None if rows[1] is None else rows[1] - 1),
    ):
        stats = group.column(names[name]).statistics
        if low is None or stats is None or not stats.has_min_max:
            continue
        if stats.max < low or (high is not None and stats.min > high):
            return False
    return True


def _count(pieces: Iterator[Piece]) -> int:
    return sum(len(piece["tok"]) for piece in pieces)


# --- writers -----------------------------------------------------------------------------------------------------


class _Writer(Protocol):
    def open_shard(self, index: int, rows: int | None) -> None: ...
    def write(self, block: Piece, offset: int) -> None: ...
    def close_shard(self) -> list[str]: ...
    def finish(self, shards: list["_Shard"]) -> list["_Shard"]: ...


class _Shard(NamedTuple):
    start: int
    stop: int
    files: list[str]


def _arrow_schema(columns: list[Column], metadata: dict[str, str]) -> pa.Schema:
    def arrow_type(column: Column) -> pa.DataType:
        scalar = pa.string() if column.dtype == "string" else pa.from_numpy_dtype(np.dtype(column.dtype))
        return scalar if column.width is None else pa.list_(scalar, column.width)

    return pa.schema(
        [pa.field(c.name, arrow_type(c), nullable=False) for c in columns],
        metadata={"actstore": json.dumps(metadata, sort_keys=True)},
    )


def _arrow_table(block: Piece, schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        values = block[field.name]
        if field.name == "split":
            arrays.append(pa.array(_SPLIT_NAMES[values], pa.string()))
        elif pa.types.is_fixed_size_list(field.type):
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=field.type))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class _ParquetWriter:
    """`part-NNNNN.parquet`: one row group per block; activations uncompressed (they compress ~5%) and without
    statistics, the rest zstd with statistics (a `tok` or `feature` filter skips row groups)."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.schema = directory, _arrow_schema(columns, metadata)
        self.compression = {c.name: "none" if c.name == "act" else "zstd" for c in columns}
        self.statistics = [c.name for c in columns if c.name != "act"]  # min/max of dense values prune nothing
        self.writer: pq.ParquetWriter | None = None
        self.name = ""

    def open_shard(self, index: int, rows: int | None) -> None:
        self.name = f"part-{index:05d}.parquet"
        self.writer = pq.ParquetWriter(
            self.dir / self.name,
            self.schema,
            compression=self.compression,
            use_dictionary=["split"],
            write_statistics=self.statistics,
        )

    def write(self, block: Piece, offset: int) -> None:
        assert self.writer is not None
        table = _arrow_table(block, self.schema)
        self.writer.write_table(table, row_group_size=table.num_rows)

    def close_shard(self) -> list[str]:
        assert self.writer is not None
        self.writer.close()
        self.writer = None
        return [self.name]

    def finish(self, shards: list[_Shard]) -> list[_Shard]:
        return shards


class _DatasetsWriter:
    """Arrow IPC files staged under `_staging/`, then `Dataset.save_to_disk` writes the final `data-*.arrow`."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.schema = directory, _arrow_schema(columns, metadata)
        self.staging = directory / "_staging"
        self.staging.mkdir()
        self.sink: pa.NativeFile | None = None
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None

    def open_shard(self, index: int, rows: int | None) -> None:
        self.sink = pa.OSFile(str(self.staging / f"part-{index:05d}.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, block: Piece, offset: int) -> None:
        assert self.writer is not None
        self.writer.write_table(_arrow_table(block, self.schema))

    def close_shard(self) -> list[str]:
        assert self.writer is not None and self.sink is not None
        self.writer.close()
        self.sink.close()
        return []

    def finish(self, shards: list[_Shard]) -> list[_Shard]:
        import datasets  # imported here: it is slow to import and only this format needs it

        staged = sorted(self.staging.glob("part-*.arrow"))
        dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in staged])
        dataset.save_to_disk(str(self.dir), num_shards=len(staged))
        del dataset
        shutil.rmtree(self.staging)
        found, start = [], 0
        for path in sorted(self.dir.glob("data-*.arrow")):
            rows = _arrow_stream_rows(path)
            found.append(_Shard(start, start + rows, [path.name]))
            start += rows
        return found


class _NpyWriter:
    """`<column>-NNNNN.npy` memmaps, pre-sized per shard and filled block by block."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.columns = directory, columns
        self.maps: dict[str, np.memmap] = {}

    def open_shard(self, index: int, rows: int | None) -> None:
        assert rows is not None
        self.maps = {
            c.name: np.lib.format.open_memmap(
                self.dir / f"{c.name}-{index:05d}.npy",
                mode="w+",
                dtype=c.dtype,
                shape=(rows,) if c.width is None else (rows, c.width),
            )
            for c in self.columns
        }

    def write(self, block: Piece, offset: int) -> None:
        for name, target in self.maps.items():
            target[offset : offset + len(block[name])] = block[name]

    def close_shard(self) -> list[str]:
        names = []
        for target in self.maps.values():
            target.flush()
            names.append(Path(str(target.filename)).name)
        self.maps = {}
        return names

    def finish(self, shards: list[_Shard]) -> list[_Shard]:
        return shards


class _SafetensorsWriter:
    """`shard-NNNNN.safetensors`, written without holding a shard in memory: the header is known from the row
    count, each tensor's bytes are contiguous, so a block lands at `tensor offset + row * row bytes`."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.metadata = directory, metadata
        # Widest items first, as safetensors' own writer does, so every tensor starts aligned to its item size.
        self.columns = sorted(columns, key=lambda c: -(c.row_bytes() // (c.width or 1)))
        self.fd = -1
        self.name = ""
        self.offsets: dict[str, int] = {}

    def open_shard(self, index: int, rows: int | None) -> None:
        assert rows is not None
        header: dict[str, Any] = {"__metadata__": self.metadata}
        at = 0
        for c in self.columns:
            size = rows * c.row_bytes()
            shape = [rows] if c.width is None else [rows, c.width]
            header[c.name] = {"dtype": _SAFETENSORS_DTYPES[c.dtype], "shape": shape, "data_offsets": [at, at + size]}
            self.offsets[c.name] = at
            at += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        prefix = struct.pack("<Q", len(raw)) + raw
        self.offsets = {name: offset + len(prefix) for name, offset in self.offsets.items()}
        self.name = f"shard-{index:05d}.safetensors"
        self.fd = os.open(self.dir / self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, len(prefix) + at)
        _pwrite_all(self.fd, prefix, 0)

    def write(self, block: Piece, offset: int) -> None:
        for c in self.columns:
            values = np.ascontiguousarray(block[c.name])
            _pwrite_all(self.fd, memoryview(values).cast("B"), self.offsets[c.name] + offset * c.row_bytes())

    def close_shard(self) -> list[str]:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return [self.name]

    def finish(self, shards: list[_Shard]) -> list[_Shard]:
        return shards


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


_WRITERS: dict[str, Callable[[Path, list[Column], dict[str, str]], _Writer]] = {
    "parquet": _ParquetWriter,
    "datasets": _DatasetsWriter,
    "npy": _NpyWriter,
    "safetensors": _SafetensorsWriter,
}


class _ShardCutter:
    """Cuts the stream of kept rows into shards of `shard_rows` rows, so shard boundaries depend on the request
    only, never on how the source was chunked. With `block_rows` (table formats, whose row groups and batches
    should not be as small as a filtered chunk) rows are gathered into blocks of that many rows before writing;
    without it (pre-sized array files) every piece is written where it belongs as it comes."""

    def __init__(self, writer: _Writer, shard_rows: int, block_rows: int | None, total: int | None) -> None:
        self.writer, self.shard_rows, self.block_rows, self.total = writer, shard_rows, block_rows, total
        self.buffer: list[Piece] = []
        self.buffered = 0
        self.in_shard = 0
        self.done_rows = 0
        self.shards: list[_Shard] = []
        self.open = False

    def add(self, piece: Piece) -> None:
        n, at = len(piece["tok"]), 0
        while at < n:
            if not self.open:
                rows = None if self.total is None else min(self.shard_rows, self.total - self.done_rows)
                if rows is not None and rows <= 0:
                    raise UserError(
                        "the export source gave more rows than its count: the store changed while "
                        "exporting; re-run the export"
                    )
                self.writer.open_shard(len(self.shards), rows)
                self.open = True
            target = self.shard_rows - self.in_shard
            if self.block_rows is not None:
                target = min(target, self.block_rows)
            take = min(target - self.buffered, n - at)
            self.buffer.append(piece if take == n else {name: values[at : at + take] for name, values in piece.items()})
            self.buffered += take
            at += take
            if self.block_rows is None or self.buffered == target:
                self._flush()

    def _flush(self) -> None:
        if self.buffered:
            block = (
                self.buffer[0]
                if len(self.buffer) == 1
                else {name: np.concatenate([p[name] for p in self.buffer]) for name in self.buffer[0]}
            )
            self.writer.write(block, self.in_shard)
            self.in_shard += self.buffered
            self.buffer, self.buffered = [], 0
        if self.in_shard == self.shard_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        files = self.writer.close_shard()
        self.shards.append(_Shard(self.done_rows, self.done_rows + self.in_shard, files))
        self.done_rows += self.in_shard
        self.in_shard, self.open = 0, False

    def close(self) -> list[_Shard]:
        self._flush()
        if self.open:
            self._close_shard()
        if self.total is not None and self.done_rows != self.total:
            raise UserError(
                f"the export source gave {self.done_rows} rows, {self.total} were counted: the store "
                "changed while exporting; re-run the export"
            )
        return self.shards


# --- the export --------------------------------------------------------------------------------------------------


def _export(
    out: Path,
    fmt: str,
    readable: str,
    source: dict[str, Any],
    subset: dict[str, Any],
    columns: list[Column],
    logical_dtype: str,
    pieces: Callable[[bool], Iterator[Piece]],
    count: Callable[[], int],
    shard_rows: int | None,
) -> ExportResult:
    """Write, verify, checksum and publish one export; a directory already holding it is returned untouched."""
    if shard_rows is not None and shard_rows < 1:
        raise UserError(f"shard_rows={shard_rows} must be a positive number of rows per shard")
    row_bytes = sum(c.row_bytes() for c in columns)
    shard_rows = shard_rows or max(1, DEFAULT_SHARD_BYTES // row_bytes)
    config = {
        "format": fmt,
        "source": source,
        "subset": subset,
        "columns": [c.name for c in columns],
        "shard_rows": shard_rows,
    }
    export_id = make_id("export", slug(readable), config)
    existing = _existing(out, export_id)
    if existing is not None:
        return ExportResult(out, existing, False)

    began = time.perf_counter()
    total = count() if fmt in ("npy", "safetensors") else None
    if total == 0:
        raise UserError(f"the filters ({_describe(subset)}) keep no rows of {_describe(source)}: loosen them")
    metadata = {"format": EXPORT_FORMAT_TAG, "export_id": export_id, "logical_dtype": logical_dtype}
    try:
        with staged_directory(out) as staged:
            writer = _WRITERS[fmt](staged, columns, metadata)
            block_rows = None if fmt in ("npy", "safetensors") else max(1, BLOCK_BYTES // row_bytes)
            cutter = _ShardCutter(writer, shard_rows, block_rows, total)
            for piece in pieces(True):
                cutter.add(piece)
            shards = cutter.close()
            if not shards:
                raise UserError(f"the filters ({_describe(subset)}) keep no rows of {_describe(source)}: loosen them")
            shards = writer.finish(shards)
            entries = []
            for shard in shards:
                _check_shard(staged, fmt, columns, shard.files, shard.stop - shard.start)
                files = [
                    {"path": f, "bytes": (staged / f).stat().st_size, "sha256": _sha256(staged / f)}
                    for f in shard.files
                ]
                entries.append(
                    {"start": shard.start, "stop": shard.stop, "rows": shard.stop - shard.start, "files": files}
                )
            rows = shards[-1].stop
            if fmt == "datasets":
                _check_loadable_dataset(staged, columns, rows)
            seconds = time.perf_counter() - began
            manifest = Manifest(
                kind="export",
                id=export_id,
                config=config,
                code_version=code_version(),
                created=utc_now(),
                counts={
                    "rows": rows,
                    "shards": len(entries),
                    "bytes": sum(f["bytes"] for e in entries for f in e["files"]),
                },
                timings={"export_s": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1)},
                extra={
                    "format": fmt,
                    "logical_dtype": logical_dtype,
                    "columns": [c.as_json() for c in columns],
                    "shards": entries,
                    **(
                        {"split_codes": list(SPLITS)}
                        if any(c.name == "split" and c.dtype == "int8" for c in columns)
                        else {}
                    ),
                },
            )
            write_manifest(staged, manifest)
    except OSError as error:
        raise explain_os_error(error, out) from None
    return ExportResult(out, read_manifest(out) or manifest, True)


def _existing(out: Path, export_id: str) -> Manifest | None:
    """The manifest of this very export already at `out`, None when `out` is free; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export directory {out} is a file: choose a directory path for the export")
    if not out.exists():
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise UserError(f"export directory {out} exists and is not an export: choose a new directory or delete it")
        return None
    if manifest.kind != "export" or manifest.id != export_id:
        raise UserError(
            f"export directory {out} already holds {manifest.kind} {manifest.id}, made with other "
            "settings: choose another directory or delete it"
        )
    return verify_export(out, checksums=False)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None and k not in ("where_hash", "parts"))


# --- reading back ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _arrow_stream_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def _arrow_columns(schema: pa.Schema) -> dict[str, Column]:
    def dtype(t: pa.DataType) -> str:
        return "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else np.dtype(t.to_pandas_dtype()).name

    return {
        f.name: Column(f.name, dtype(f.type.value_type), f.type.list_size)
        if pa.types.is_fixed_size_list(f.type)
        else Column(f.name, dtype(f.type))
        for f in schema
    }


def _shard_contents(directory: Path, fmt: str, files: list[str]) -> tuple[dict[str, Column], set[int]]:
    """The columns a shard's files hold and the row counts they claim, read from headers and footers."""
    if fmt == "parquet":
        metadata = pq.read_metadata(directory / files[0])
        return _arrow_columns(metadata.schema.to_arrow_schema()), {metadata.num_rows}
    if fmt == "datasets":
        with pa.memory_map(str(directory / files[0])) as source:
            table = pa.ipc.open_stream(source).read_all()
        return _arrow_columns(table.schema), {table.num_rows}
    if fmt == "npy":
        found, rows = {}, set()
        for name in files:
            values = np.load(directory / name, mmap_mode="r")
            column = name.rsplit("-", 1)[0]
            found[column] = Column(column, values.dtype.name, values.shape[1] if values.ndim == 2 else None)
            rows.add(values.shape[0])
        return found, rows
    from safetensors import safe_open

    names = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    found, rows = {}, set()
    with safe_open(str(directory / files[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_slice(key)
            shape = tensor.get_shape()
            found[key] = Column(
                key, names.get(tensor.get_dtype(), tensor.get_dtype()), shape[1] if len(shape) == 2 else None
            )
            rows.add(shape[0])
    return found, rows


def _check_shard(directory: Path, fmt: str, columns: list[Column], files: list[str], rows: int) -> None:
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UserError(f"export file {directory / missing[0]} is missing: delete the export directory and re-run")
    try:
        found, counts = _shard_contents(directory, fmt, files)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise UserError(
            f"export shard {directory / files[0]} cannot be read back ({_first_line(error)}): delete "
            "the export directory and re-run"
        ) from None
    expected = {c.name: c for c in columns}
    if found != expected or counts != {rows}:
        raise UserError(
            f"export shard {directory / files[0]} holds {sorted(counts)} rows of {list(found.values())}, "
            f"expected {rows} rows of {columns}: delete the export directory and re-run"
        )


def _check_loadable_dataset(directory: Path, columns: list[Column], rows: int) -> None:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(directory))
    except (OSError, ValueError) as error:
        raise UserError(
            f"{directory} does not load with datasets.load_from_disk ({_first_line(error)}): delete "
            "it and re-run the export"
        ) from None
    names = [c.name for c in columns]
    if not isinstance(dataset, datasets.Dataset) or dataset.num_rows != rows or list(dataset.features) != names:
        found = (
            f"{dataset.num_rows} rows of {list(dataset.features)}"
            if isinstance(dataset, datasets.Dataset)
            else type(dataset).__name__
        )
        raise UserError(
            f"{directory} loads as {found}, expected {rows} rows of {names}: delete it and re-run the export"
        )
