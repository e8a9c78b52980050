"""The token table on disk: `part-NNNNN.parquet` files of TOKEN_SCHEMA rows, sorted by `tok`, contiguous from 0.

Because `tok` is contiguous from 0 and parts are written in order, a token's row number across the parts *is*
its `tok`; `read_windows` uses that to read only the row groups holding the windows asked for, which is what
the harvest does for every batch.
"""

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA

ROW_GROUP_ROWS = 131_072
"""Rows per Parquet row group: a harvest batch decodes at most a couple of groups (~0.5 MB of token ids)."""

PART_GLOB = "part-*.parquet"

SPLIT_DTYPE = pl.Enum(list(SPLITS))
"""Polars dtype of the `split` column from `scan_tokens`: an Enum ordered as SPLITS (`train`, `holdout`)."""


def part_name(index: int) -> str:
    """File name of the `index`-th part; zero-padded so name order is `tok` order."""
    return f"part-{index:05d}.parquet"


def write_token_table(
    directory: Path, batches: Iterable[pa.RecordBatch], rows_per_part: int = 1_048_576
) -> dict[str, Any]:
    """Write `batches` (TOKEN_SCHEMA, in `tok` order from 0) as parts of `rows_per_part` rows; return counts.

    Each part is written under a temporary name and renamed, so a part file that exists is complete. Parts
    and temporaries left in `directory` by an interrupted earlier write are removed first. Counts are
    `n_tokens`, `n_seqs`, `n_docs`, `n_parts` and `tokens_by_split` (`{"train": n, "holdout": m}`).
    """
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob(PART_GLOB), *directory.glob(".part-*.tmp")]:
        stale.unlink()

    counts = _Counts()
    writer = _PartWriter(directory, rows_per_part)
    try:
        for batch in batches:
            if batch.schema != TOKEN_SCHEMA:
                raise ValueError(f"token batch schema differs from TOKEN_SCHEMA:\n{batch.schema}")
            counts.add(batch)
            writer.write(batch)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {**counts.as_dict(), "n_parts": writer.n_parts}


class _PartWriter:
    """Cuts a stream of batches into parts and row groups of fixed sizes."""

    def __init__(self, directory: Path, rows_per_part: int) -> None:
        self.directory = directory
        self.rows_per_part = rows_per_part
        self.n_parts = 0
        self.rows_in_part = 0
        self.buffered: list[pa.RecordBatch] = []
        self.n_buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.temp: Path | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            group_rows = min(self.rows_per_part - self.rows_in_part, ROW_GROUP_ROWS)
            head, batch = batch.slice(0, group_rows - self.n_buffered), batch.slice(group_rows - self.n_buffered)
            self.buffered.append(head)
            self.n_buffered += head.num_rows
            if self.n_buffered == group_rows:
                self._flush_row_group()

    def _flush_row_group(self) -> None:
        if not self.n_buffered:
            return
        if self.writer is None:
            self.temp = self.directory / f".{part_name(self.n_parts)}.tmp"
            self.writer = pq.ParquetWriter(self.temp, TOKEN_SCHEMA, compression="zstd")
        table = pa.Table.from_batches(self.buffered, schema=TOKEN_SCHEMA)
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows_in_part += table.num_rows
        self.buffered, self.n_buffered = [], 0
        if self.rows_in_part == self.rows_per_part:
            self._finish_part()

    def _finish_part(self) -> None:
        assert self.writer is not None and self.temp is not None
        self.writer.close()
        os.replace(self.temp, self.directory / part_name(self.n_parts))
        self.writer, self.temp = None, None
        self.n_parts += 1
        self.rows_in_part = 0

    def close(self) -> None:
        self._flush_row_group()
        if self.writer is not None:
            self._finish_part()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


class _Counts:
    """Running counts over the batches, checking that `tok` is contiguous from 0 on the way."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_seqs = 0
        self.n_docs = 0
        self.last_doc = -1
        self.by_split = dict.fromkeys(SPLITS, 0)

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        tok = batch.column("tok").to_numpy()
        if tok[0] != self.n_tokens or tok[-1] != self.n_tokens + batch.num_rows - 1:
            raise ValueError(f"token batch starts at tok {tok[0]}, expected {self.n_tokens}: batches must be in order")
        docs = batch.column("doc").to_numpy()
        self.n_docs += int(np.count_nonzero(np.diff(docs, prepend=self.last_doc)))
        self.last_doc = int(docs[-1])
        self.n_seqs = int(batch.column("seq")[-1].as_py()) + 1
        split = batch.column("split")
        codes = np.bincount(split.indices.to_numpy(), minlength=len(split.dictionary))
        for name, count in zip(split.dictionary.to_pylist(), codes.tolist(), strict=True):
            self.by_split[name] += count
        self.n_tokens += batch.num_rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "n_seqs": self.n_seqs,
            "n_docs": self.n_docs,
            "tokens_by_split": dict(self.by_split),
        }


def _parts(directory: Path) -> list[Path]:
    parts = sorted(Path(directory).glob(PART_GLOB))
    if not parts:
        raise UserError(f"token table '{directory}' has no {PART_GLOB} files: run `actstore ingest` first")
    return parts


def scan_tokens(directory: Path) -> pl.LazyFrame:
    """The token table as a polars LazyFrame (`split` as `SPLIT_DTYPE`, an Enum of `train`/`holdout`)."""
    frame = pl.scan_parquet(_parts(directory), hive_partitioning=False)
    return frame.with_columns(pl.col("split").cast(pl.String).cast(SPLIT_DTYPE))


def read_windows(directory: Path, seq_start: int, seq_stop: int, ctx_len: int) -> np.ndarray:
    """Token ids of windows `seq_start..seq_stop-1` as int32 `(seq_stop - seq_start, ctx_len)`.

    Reads only the row groups that hold those windows (located from the parts' footers, which are cached
    per file), never the whole table.
    """
    if not 0 <= seq_start <= seq_stop:
        raise ValueError(f"window range [{seq_start}, {seq_stop}) is not a range of window indices")
    first, stop = seq_start * ctx_len, seq_stop * ctx_len
    pieces: list[pa.Table] = []
    offset = 0
    for part in _parts(directory):
        stat = part.stat()
        group_rows = _row_groups(part, stat.st_size, stat.st_mtime_ns)
        part_rows = sum(group_rows)
        if offset < stop and first < offset + part_rows:
            pieces.append(_read_rows(part, group_rows, first - offset, stop - offset))
        offset += part_rows
        if offset >= stop:
            break
    table = pa.concat_tables(pieces) if pieces else TOKEN_SCHEMA.empty_table().select(["seq", "token_id"])
    if table.num_rows != stop - first:
        raise ValueError(f"token table '{directory}' has {offset // ctx_len} windows, asked for up to {seq_stop}")
    seq = table.column("seq")
    if table.num_rows and (seq[0].as_py() != seq_start or seq[-1].as_py() != seq_stop - 1):
        raise ValueError(f"token table '{directory}' was not packed with ctx_len={ctx_len}")
    ids = table.column("token_id").to_numpy()
    return ids.astype(np.int32, copy=False).reshape(seq_stop - seq_start, ctx_len)


@functools.lru_cache(maxsize=4096)
def _row_groups(part: Path, size: int, mtime_ns: int) -> tuple[int, ...]:
    """Rows per row group of a part; keyed on size and mtime so a rewritten part is read afresh."""
    metadata = pq.read_metadata(part)
    return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))


def _read_rows(part: Path, group_rows: tuple[int, ...], start: int, stop: int) -> pa.Table:
    """Rows `start..stop-1` of a part (clipped to it), reading only the row groups that overlap them."""
    start, stop = max(start, 0), min(stop, sum(group_rows))
    bounds = np.cumsum((0, *group_rows))
    groups = [i for i in range(len(group_rows)) if bounds[i] < stop and start < bounds[i + 1]]
    with pq.ParquetFile(part) as parquet:
        table = parquet.read_row_groups(groups, columns=["seq", "token_id"])
    skip = start - int(bounds[groups[0]])
    return table.slice(skip, stop - start)
