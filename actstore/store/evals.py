"""Evaluation and transfer results on disk: Parquet tables written into a staged directory, read with polars.

Results are small next to activations except the per-token tables, which are appended a batch at a time so an
evaluation of any number of tokens never holds them in memory."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.manifest import MANIFEST_NAME
from actstore.store.files import TMP_MARK, fsync_path

TABLE_COMPRESSION = "zstd"


def write_table(path: Path, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], schema: pa.Schema) -> None:
    """One Parquet file from row dicts or columns, cast to `schema` (missing nullable columns become null)."""
    if isinstance(rows, Mapping):
        columns = dict(rows)
    else:
        columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    length = len(next(iter(columns.values()))) if columns else 0
    arrays = [pa.array(columns[f.name] if f.name in columns else [None] * length, type=f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, compression=TABLE_COMPRESSION)
    fsync_path(path)


class TableAppender:
    """A Parquet file written a batch of columns at a time; `close()` makes it durable."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self._writer = pq.ParquetWriter(path, schema, compression=TABLE_COMPRESSION)
        self.rows = 0

    def append(self, columns: Mapping[str, Any]) -> None:
        length = len(next(iter(columns.values())))
        arrays = [
            pa.array(columns[f.name], type=f.type) if f.name in columns else pa.nulls(length, f.type)
            for f in self.schema
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += length

    def close(self) -> None:
        self._writer.close()
        fsync_path(self.path)

    def __enter__(self) -> "TableAppender":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def scan_results(base: Path, table: str, schema: pa.Schema) -> pl.LazyFrame:
    """One table of every published result under `base` (`evals/` or `transfers/`), as one LazyFrame.

    Only directories with a manifest are read, so a half-written result never shows; with none, an empty
    frame of the table's schema is returned so queries still compose."""
    files = sorted(
        str(p / table)
        for p in base.glob("*")
        if TMP_MARK not in p.name and (p / MANIFEST_NAME).is_file() and (p / table).is_file()
    )
    if not files:
        return pl.LazyFrame(pl.from_arrow(schema.empty_table()))
    return pl.scan_parquet(files)
