"""What an export holds: its columns, the pieces of kept rows, and the shard and Arrow helpers every
format shares."""

import json
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from actstore.schemas.manifest import Manifest
from actstore.schemas.tables import SPLITS

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

ARRAY_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
"""Exported dtype of activations in formats without bfloat16."""
SAFETENSORS_DTYPES = {
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


class Writer(Protocol):
    """What each format implements (one module per format): shards opened, filled block by block, closed."""

    def open_shard(self, index: int, rows: int | None) -> None: ...
    def write(self, block: Piece, offset: int) -> None: ...
    def close_shard(self) -> list[str]: ...
    def finish(self, shards: list["Shard"]) -> list["Shard"]: ...


class Shard(NamedTuple):
    """One written shard: its rows [start, stop) of the export and the files holding them."""

    start: int
    stop: int
    files: list[str]


def arrow_schema(columns: list[Column], metadata: dict[str, str]) -> pa.Schema:
    def arrow_type(column: Column) -> pa.DataType:
        scalar = pa.string() if column.dtype == "string" else pa.from_numpy_dtype(np.dtype(column.dtype))
        return scalar if column.width is None else pa.list_(scalar, column.width)

    return pa.schema(
        [pa.field(c.name, arrow_type(c), nullable=False) for c in columns],
        metadata={"actstore": json.dumps(metadata, sort_keys=True)},
    )


def arrow_table(block: Piece, schema: pa.Schema) -> pa.Table:
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


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
