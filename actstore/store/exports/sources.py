"""Where exported rows come from: streams of kept rows of an activation array or a feature table."""

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS
from actstore.store.activations import ActivationArray
from actstore.store.exports.columns import FEATURE_BATCH_ROWS, Piece, first_line

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class TokenRows:
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
                raise UserError(f"filter {self.predicate} fails on the token table: {first_line(error)}") from None
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


def activation_pieces(
    array: ActivationArray, start: int, stop: int, tokens: TokenRows | None, act_dtype: str, with_values: bool
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


def feature_pieces(
    parts: list[Path],
    wanted: np.ndarray | None,
    rows: tuple[int, int | None],
    tokens: TokenRows | None,
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


def count_rows(pieces: Iterator[Piece]) -> int:
    return sum(len(piece["tok"]) for piece in pieces)
