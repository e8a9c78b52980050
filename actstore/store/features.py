"""Writing the sparse-feature store: bounded memory for any corpus size, and exactly once under kills.

Layout of `store/features/<sae_id>/<harvest_id>/`, plain Parquet that `pl.scan_parquet` reads directly:

    by_feature/part-000000.parquet  triples (feature int32, tok int64, value float16|float32) sorted by
                                    (feature asc, value desc, tok asc); part i holds the features
                                    [start, stop) recorded in index.json, so parts are globally ordered
    by_token/part-000000.parquet    the same triples sorted by (tok, feature); part j holds toks [start, stop)
    summary.parquet                 one row per feature 0..d_sae-1, dead ones included (schemas.features)
    index.json                      config, counts and part ranges; written last, so present = complete
    _spill/                         only while writing: one sorted run per chunk

How. `add_chunk` sorts one chunk's triples by (feature, value desc, tok) and publishes them as a run: one
`.npy` of 14-byte records, whose presence under its final name marks the chunk done. `finish` is an external
sort of those runs:
  1. per-feature totals come from the runs' feature fields (memory-mapped, `np.bincount`);
  2. features are packed greedily into buckets of whole features holding at most `bucket_rows` triples;
  3. a bucket's slice of each run is contiguous (bisection on the sorted feature column); the slices are
     gathered in chunk order and stable-sorted on one uint64 key (feature, value desc): chunks arrive in tok
     order, so ties on value come out in tok order without a third key;
  4. a feature with more than `bucket_rows` triples gets a bucket of its own, cut by ranges of its value bits
     (a two-level radix histogram) into pieces of at most `bucket_rows`; one value repeated more often than
     that (all ties) is already in tok order across runs and streams through unsorted;
  5. each bucket is written as one by_feature part and folded into the summary (mean, max, quantiles, top-k
     by rank in the sorted stream, so they are exact without holding a feature in memory);
  6. by_token parts are the runs re-sorted by (tok, feature) one chunk at a time, in chunk order.

Memory bound, whatever the corpus size: `add_chunk` holds a few copies of one chunk; `finish` holds about
56 bytes x `bucket_rows` (gathered triples, sort keys, permutation, sorted copy, summary ranks; measured with
tracemalloc on a 2M-row bucket), so ~225 MiB at the default 4M, plus one row group being written, one chunk,
8 bytes x d_sae of totals and top_k rows per feature of the bucket being summarized.
Disk: the spill is a second copy of the triples (14 bytes per triple at float16) until `finish` deletes it.

Exactly once: every file is written under a temp name, fsynced and renamed into place; a chunk counts only
once its run exists, and a chunk that has one is skipped when handed again. A chunk's run is a pure function of the
chunk, and `finish` a pure function of all runs and the config, so a writer killed at any point and resumed
with the same config and the same chunks ends with byte-identical Parquet files.
"""

import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from actstore.schemas.attribution import ATTRIBUTION_DIR
from actstore.schemas.errors import UserError
from actstore.schemas.features import (
    BY_FEATURE_DIR,
    BY_TOKEN_DIR,
    DEFAULT_QUANTILES,
    DEFAULT_TOP_K,
    INDEX_NAME,
    SUMMARY_NAME,
    FeatureIndex,
    FeatureTableConfig,
    PartRange,
    ValueDtype,
    summary_schema,
    triples_schema,
)
from actstore.store.files import TMP_MARK, atomic_write_bytes, atomic_write_json, fsync_path, object_lock

SPILL_DIR = "_spill"
SHARD_LOCKS = "_shards"
SETTINGS_NAME = "settings.json"
BY_FEATURE_SORTING = (("feature", False), ("value", True), ("tok", False))
BY_TOKEN_SORTING = (("tok", False), ("feature", False))
RADIX_BITS = 16
"""Bits of the value key resolved per histogram level: two levels resolve any float32 exactly."""


class Triples(NamedTuple):
    """Parallel arrays of sparse activations (a chunk, a run, or a sorted block)."""

    feature: np.ndarray
    """int32 latent indices."""
    tok: np.ndarray
    """int64 global token indices."""
    value: np.ndarray
    """Values in the store's value dtype."""


class ChunkInfo(NamedTuple):
    """What finish needs to know about a stored chunk."""

    index: int
    rows: int
    tok_min: int | None
    """Smallest tok in the chunk; None for a chunk without non-zeros."""
    tok_max: int | None


def descending_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys that ascend as the float values descend (IEEE bits mapped to a total order).

    Sorting on one integer key is several times faster than lexsort on floats, and its top bits give the
    radix buckets used to cut a feature too large for memory.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    ascending = np.where((bits >> np.uint32(31)) == 1, ~bits, bits | np.uint32(0x80000000))
    return ~ascending


def sort_key(feature: np.ndarray, value: np.ndarray) -> np.ndarray:
    """uint64 keys in by_feature order, (feature asc, value desc), for features below 2**32."""
    return (feature.astype(np.uint64) << np.uint64(32)) | descending_key(value).astype(np.uint64)


def read_index(directory: Path) -> FeatureIndex | None:
    """The index of a finished feature store, or None while it is incomplete (or absent)."""
    path = directory / INDEX_NAME
    if not path.exists():
        return None
    return FeatureIndex.model_validate_json(path.read_text())


def stored_chunks(directory: str | Path) -> set[int]:
    """Chunks an unfinished feature store holds (each run file is renamed into place whole, so it is complete)."""
    return {int(path.name[6:14]) for path in (Path(directory) / SPILL_DIR).glob("chunk-*.npy")}


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


class FeatureWriter:
    """Writes one feature store from chunks of sparse triples handed over in tok order.

    `add_chunk` may be called in any order and more than once per chunk (later calls are no-ops); `finish`
    builds the tables from complete chunks. Use it as a context manager, or call `close`, to release the
    directory lock that keeps two writers out of one store.
    """

    def __init__(
        self,
        directory: str | Path,
        d_sae: int,
        n_tokens: int,
        value_dtype: ValueDtype = "float16",
        *,
        top_k: int = DEFAULT_TOP_K,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        bucket_rows: int = 4_000_000,
        row_group_rows: int = 131_072,
        token_part_rows: int = 32_000_000,
        shard: str | None = None,
    ) -> None:
        """`shard` names a writer of some chunks only: it locks just its shard, so writers of disjoint shards
        (tasks on a Dask cluster) add chunks at once; `finish` still needs the whole-store lock."""
        try:
            self.config = FeatureTableConfig(
                d_sae=d_sae,
                n_tokens=n_tokens,
                value_dtype=value_dtype,
                top_k=top_k,
                quantiles=tuple(quantiles),
                bucket_rows=bucket_rows,
                row_group_rows=row_group_rows,
                token_part_rows=token_part_rows,
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"])) or "settings"
            raise UserError(f"feature store setting {field}: {error['msg']}; pass a valid value") from None
        if n_tokens * d_sae >= 2**63:
            raise UserError(f"n_tokens x d_sae = {n_tokens} x {d_sae} overflows int64 (tok, feature) pair keys")
        self.dir = Path(directory)
        self.spill = self.dir / SPILL_DIR
        value = "<f2" if self.config.value_dtype == "float16" else "<f4"
        self._run_dtype = np.dtype([("feature", "<i4"), ("tok", "<i8"), ("value", value)])
        self._locks = contextlib.ExitStack()
        self._closed = True
        self.index = read_index(self.dir)
        if self.index is not None:
            self._check_same_config(self.index.config, self.dir / INDEX_NAME)
            shutil.rmtree(self.spill, ignore_errors=True)  # a run killed after publishing the index
            return
        self._locks.enter_context(object_lock(self.spill if shard is None else self.spill / SHARD_LOCKS / shard))
        self._closed = False
        settings = self.spill / SETTINGS_NAME
        try:
            if settings.exists():
                self._check_same_config(FeatureTableConfig.model_validate_json(settings.read_text()), settings)
            else:
                atomic_write_json(settings, self.config.model_dump(mode="json"))
        except BaseException:
            self.close()
            raise

    def _check_same_config(self, stored: FeatureTableConfig, where: Path) -> None:
        if stored != self.config:
            old, new = stored.model_dump(), self.config.model_dump()
            diff = ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" for k in old if old[k] != new[k])
            raise UserError(
                f"feature store {self.dir} was started with {diff} ({where.name}): "
                "pass the same settings to resume, or delete the directory to start over"
            )

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory lock; the writer can be re-opened later to resume."""
        self._locks.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed and not self.finished:
            raise ValueError(f"the feature writer of {self.dir} is closed: open a new one to resume")

    @property
    def finished(self) -> bool:
        return self.index is not None

    # -- chunks ---------------------------------------------------------------------------------------------

    def _run_path(self, chunk_index: int) -> Path:
        return self.spill / f"chunk-{chunk_index:08d}.npy"

    def has_chunk(self, chunk_index: int) -> bool:
        """Whether a chunk is already stored (a resumed encode skips its compute)."""
        return self.finished or self._run_path(chunk_index).exists()

    def add_chunk(self, chunk_index: int, features: np.ndarray, toks: np.ndarray, values: np.ndarray) -> bool:
        """Store one chunk's non-zeros; False (and nothing written) when the chunk is already stored.

        Chunks must partition the tokens in chunk order: every tok of chunk i is below every tok of chunk
        i + 1 (checked by `finish`). A (feature, tok) pair may occur once.
        """
        self._check_open()
        if self.finished or self._run_path(chunk_index).exists():
            return False
        chunk = self._validated(chunk_index, features, toks, values)
        by_tok = np.argsort(chunk.tok, kind="stable")  # linear time on the usual tok-ordered input
        order = by_tok[np.argsort(sort_key(chunk.feature[by_tok], chunk.value[by_tok]), kind="stable")]
        run = np.empty(len(order), self._run_dtype)
        for name, column in zip(Triples._fields, chunk, strict=True):
            run[name] = column[order]
        buffer = io.BytesIO()
        np.save(buffer, run, allow_pickle=False)
        atomic_write_bytes(self._run_path(chunk_index), buffer.getvalue())
        return True

    def _validated(self, chunk_index: int, features: np.ndarray, toks: np.ndarray, values: np.ndarray) -> Triples:
        features, toks, values = np.asarray(features), np.asarray(toks), np.asarray(values)
        where = f"feature chunk {chunk_index}"
        if chunk_index < 0:
            raise ValueError(f"{where}: chunk indices start at 0")
        if not (features.ndim == toks.ndim == values.ndim == 1 and len(features) == len(toks) == len(values)):
            raise ValueError(
                f"{where}: features, toks, values must be 1-D and of one length, got "
                f"{features.shape}, {toks.shape}, {values.shape}"
            )
        for name, array in (("features", features), ("toks", toks)):
            if len(array) and not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{where}: {name} must be integers, got {array.dtype}")
        if len(features) and (features.min() < 0 or features.max() >= self.config.d_sae):
            raise ValueError(
                f"{where}: features span {features.min()}..{features.max()}, "
                f"outside 0..{self.config.d_sae - 1} (d_sae={self.config.d_sae})"
            )
        if len(toks) and (toks.min() < 0 or toks.max() >= self.config.n_tokens):
            raise ValueError(
                f"{where}: toks span {toks.min()}..{toks.max()}, "
                f"outside 0..{self.config.n_tokens - 1} (n_tokens={self.config.n_tokens})"
            )
        if not np.isfinite(values).all():
            raise UserError(
                f"{where} holds NaN or infinite activations: check the SAE checkpoint and the activations it encodes"
            )
        with np.errstate(over="ignore"):
            stored = values.astype(self.config.value_dtype) + np.zeros((), self.config.value_dtype)  # -0 -> 0
        if not np.isfinite(stored).all():
            big = float(np.abs(values[~np.isfinite(stored)]).max())
            raise UserError(
                f"{where} holds activation {big:.4g}, beyond float16's range (65504): "
                "pass value_dtype='float32' for this SAE"
            )
        chunk = Triples(features.astype(np.int32), toks.astype(np.int64), stored)
        pairs = np.sort(self._pair_key(chunk))
        repeated = np.flatnonzero(pairs[1:] == pairs[:-1])
        if len(repeated):
            tok, feature = divmod(int(pairs[repeated[0]]), self.config.d_sae)
            raise ValueError(f"{where}: feature {feature} appears twice for tok {tok}")
        return chunk

    def _pair_key(self, triples: Triples) -> np.ndarray:
        """tok * d_sae + feature: one int64 whose order is the by_token order (tok, feature)."""
        return triples.tok * self.config.d_sae + triples.feature

    def _load_run(self, chunk: ChunkInfo, mmap: bool = True) -> Triples:
        run = np.load(self._run_path(chunk.index), mmap_mode="r" if mmap else None, allow_pickle=False)
        return Triples(*(run[name] for name in Triples._fields))

    def _complete_chunks(self, n_chunks: int | None) -> tuple[list[ChunkInfo], np.ndarray]:
        """The chunks to build from, checked complete and in tok order, and the per-feature totals."""
        found = stored_chunks(self.dir)
        expected = n_chunks if n_chunks is not None else (max(found) + 1 if found else 0)
        missing = sorted(set(range(expected)) - set(found))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise UserError(
                f"feature store {self.dir} lacks chunks {shown} of {expected}: re-run the encode to resume and add them"
            )
        extra = sorted(set(found) - set(range(expected)))
        if extra:
            raise ValueError(f"feature store {self.dir} holds chunk {extra[0]} beyond n_chunks={expected}")
        chunks, totals = [], np.zeros(self.config.d_sae, dtype=np.int64)
        for index in range(expected):
            run = self._load_run(ChunkInfo(index, 0, None, None))
            totals += np.bincount(run.feature, minlength=self.config.d_sae)
            rows = len(run.tok)
            chunks.append(
                ChunkInfo(index, rows, int(run.tok.min()) if rows else None, int(run.tok.max()) if rows else None)
            )
        last_tok, last_chunk = -1, -1
        for chunk in chunks:
            if chunk.tok_min is None or chunk.tok_max is None:
                continue
            if chunk.tok_min <= last_tok:
                raise ValueError(
                    f"feature chunk {chunk.index} has tok {chunk.tok_min}, not after chunk "
                    f"{last_chunk}'s last tok {last_tok}: chunks must follow tok order"
                )
            last_tok, last_chunk = chunk.tok_max, chunk.index
        return chunks, totals

    # -- finish ---------------------------------------------------------------------------------------------

    def finish(self, n_chunks: int | None = None) -> dict[str, int]:
        """Build by_feature, by_token and the summary from chunks 0..n_chunks-1, then publish `index.json`.

        `n_chunks` defaults to one past the highest chunk added; a missing chunk is an error. Returns counts
        for the manifest. Calling it on a finished store just returns the counts.
        """
        self._check_open()
        if self.index is None:
            chunks, totals = self._complete_chunks(n_chunks)
            for stale in self.dir.rglob(f"*{TMP_MARK}*"):
                # only this writer's leftovers: the attribution tables live in their own staged sub-directory
                if stale.is_file() and not stale.relative_to(self.dir).parts[0].startswith(ATTRIBUTION_DIR):
                    stale.unlink(missing_ok=True)
            by_feature = self._write_by_feature(chunks, totals)
            by_token = self._write_by_token(chunks)
            for sub, parts in ((BY_FEATURE_DIR, by_feature), (BY_TOKEN_DIR, by_token)):
                keep = {part.file for part in parts}
                for path in (self.dir / sub).glob("part-*.parquet"):
                    if f"{sub}/{path.name}" not in keep:
                        path.unlink()
            index = FeatureIndex(
                config=self.config,
                n_chunks=len(chunks),
                nnz=int(totals.sum()),
                alive=int((totals > 0).sum()),
                by_feature=by_feature,
                by_token=by_token,
            )
            atomic_write_json(self.dir / INDEX_NAME, index.model_dump(mode="json"))
            self.index = index
            self.close()
            shutil.rmtree(self.spill, ignore_errors=True)
        return {
            "chunks": self.index.n_chunks,
            "nnz": self.index.nnz,
            "features_alive": self.index.alive,
            "features_dead": self.index.config.d_sae - self.index.alive,
            "by_feature_parts": len(self.index.by_feature),
            "by_token_parts": len(self.index.by_token),
        }

    def _write_by_feature(self, chunks: list[ChunkInfo], totals: np.ndarray) -> list[PartRange]:
        config = self.config
        schema = triples_schema(config.value_dtype)
        parts: list[PartRange] = []
        buckets = plan_buckets(totals, config.bucket_rows)
        chunks = [chunk for chunk in chunks if chunk.rows]
        # Where each bucket starts in each run, found in one pass: bisecting a memory-mapped record field
        # makes numpy copy the field, so it is done once per run rather than once per run and bucket.
        edges = [start for start, _ in buckets] + [config.d_sae]
        spans = np.array([np.searchsorted(self._load_run(chunk).feature, edges) for chunk in chunks]).reshape(
            len(chunks), len(edges)
        )
        with _ParquetFile(self.dir / SUMMARY_NAME, summary_schema(config.quantiles), (), None) as summary_file:
            for number, (start, stop) in enumerate(buckets):
                summary = _SummaryBuilder(start, totals[start:stop], config)
                path = self.dir / BY_FEATURE_DIR / part_name(number)
                rows = int(totals[start:stop].sum())
                with _ParquetFile(path, schema, BY_FEATURE_SORTING, config.row_group_rows) as part:
                    for block in self._sorted_blocks(chunks, spans[:, number : number + 2], rows, start, stop):
                        part.write(block)
                        summary.add(block)
                summary_file.write_table(summary.table())
                parts.append(PartRange(file=f"{BY_FEATURE_DIR}/{path.name}", start=start, stop=stop, rows=rows))
        return parts

    def _sorted_blocks(
        self, chunks: list[ChunkInfo], spans: np.ndarray, rows: int, start: int, stop: int
    ) -> Iterator[Triples]:
        """The `rows` triples of features [start, stop), rows spans[i] of run i, in by_feature order, in blocks
        of at most bucket_rows (or one chunk's worth, for a single value repeated more often than that)."""
        if rows == 0:
            return
        runs = [self._load_run(chunk) for chunk in chunks]
        if rows <= self.config.bucket_rows:
            yield _gather_sorted(runs, spans, rows, start)
            return
        if stop - start != 1:
            raise RuntimeError(f"bucket [{start}, {stop}) holds {rows} triples, over bucket_rows")

        def run_keys() -> Iterator[np.ndarray]:  # one run at a time: never the whole feature in memory
            for run, (lo, hi) in zip(runs, spans, strict=True):
                yield descending_key(run.value[lo:hi]).astype(np.int64)

        bounds = self._key_bounds(run_keys)
        offsets = np.array(
            [lo + np.searchsorted(keys, bounds) for keys, (lo, _) in zip(run_keys(), spans, strict=True)]
        )
        for piece in range(len(bounds) - 1):
            piece_spans = offsets[:, piece : piece + 2]
            piece_rows = int((piece_spans[:, 1] - piece_spans[:, 0]).sum())
            if piece_rows <= self.config.bucket_rows:
                if piece_rows:
                    yield _gather_sorted(runs, piece_spans, piece_rows, start)
                continue
            for run, (lo, hi) in zip(runs, piece_spans, strict=True):  # one value: ties already in tok order
                if hi > lo:
                    yield Triples(*(np.array(column[lo:hi]) for column in run))

    def _key_bounds(self, run_keys: Callable[[], Iterator[np.ndarray]]) -> np.ndarray:
        """Ascending cut points in value-key space: each range between two holds at most bucket_rows triples,
        or a single key value.

        Level one histograms the top 16 bits of the 32-bit keys; a bin over budget is histogrammed again on
        its low 16 bits, which resolves single values. Each level is one pass over the runs.
        """
        budget, width = self.config.bucket_rows, 1 << RADIX_BITS
        top = sum(np.bincount(keys >> RADIX_BITS, minlength=width) for keys in run_keys())
        bounds: list[int] = []
        for high, rows in pack_bins(np.asarray(top), budget):
            if rows <= budget:
                bounds.append(high << RADIX_BITS)
                continue
            low = sum(
                np.bincount(keys[(keys >> RADIX_BITS) == high] & (width - 1), minlength=width) for keys in run_keys()
            )
            bounds.extend((high << RADIX_BITS) + first for first, _ in pack_bins(np.asarray(low), budget))
        bounds.append(1 << 32)
        return np.array(bounds, dtype=np.int64)

    def _write_by_token(self, chunks: list[ChunkInfo]) -> list[PartRange]:
        groups: list[list[ChunkInfo]] = [[]]
        starts, rows = [0], 0
        for chunk in chunks:
            if rows >= self.config.token_part_rows and chunk.tok_min is not None:
                groups.append([])
                starts.append(chunk.tok_min)
                rows = 0
            groups[-1].append(chunk)
            rows += chunk.rows
        stops = [*starts[1:], self.config.n_tokens]
        parts: list[PartRange] = []
        schema = triples_schema(self.config.value_dtype)
        for number, group in enumerate(groups):
            path = self.dir / BY_TOKEN_DIR / part_name(number)
            with _ParquetFile(path, schema, BY_TOKEN_SORTING, self.config.row_group_rows) as part:
                for chunk in group:
                    run = self._load_run(chunk, mmap=False)
                    order = np.argsort(self._pair_key(run))
                    part.write(Triples(*(column[order] for column in run)))
            parts.append(
                PartRange(
                    file=f"{BY_TOKEN_DIR}/{path.name}",
                    start=starts[number],
                    stop=stops[number],
                    rows=sum(chunk.rows for chunk in group),
                )
            )
        return parts


def plan_buckets(totals: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive feature ranges covering 0..len(totals), each with at most `budget` triples, except a
    single feature over budget, which gets a range of its own."""
    cumulative = np.concatenate([[0], np.cumsum(totals)])
    buckets, start = [], 0
    while start < len(totals):
        stop = int(np.searchsorted(cumulative, cumulative[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), len(totals))
        buckets.append((start, stop))
        start = stop
    return buckets


def pack_bins(counts: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Greedy groups of consecutive non-empty histogram bins: (first bin, rows), rows <= budget unless the
    group is one bin alone. Each group runs up to the next one's first bin."""
    groups: list[tuple[int, int]] = []
    for b in np.flatnonzero(counts):
        rows = int(counts[b])
        if groups and groups[-1][1] + rows <= budget:
            groups[-1] = (groups[-1][0], groups[-1][1] + rows)
        else:
            groups.append((int(b), rows))
    return groups


def _gather_sorted(runs: list[Triples], spans: Sequence[Sequence[int]], rows: int, first_feature: int) -> Triples:
    """Concatenate the runs' slices (in chunk order) and stable-sort them by (feature, value desc)."""
    gathered = Triples(np.empty(rows, np.int32), np.empty(rows, np.int64), np.empty(rows, runs[0].value.dtype))
    at = 0
    for run, (lo, hi) in zip(runs, spans, strict=True):
        for out, column in zip(gathered, run, strict=True):
            out[at : at + hi - lo] = column[lo:hi]
        at += hi - lo
    order = np.argsort(sort_key(gathered.feature - first_feature, gathered.value), kind="stable")
    return Triples(*(column[order] for column in gathered))


class _SummaryBuilder:
    """Summary rows of features [start, start + len(counts)) from their triples in by_feature order.

    Blocks may cut a feature anywhere: statistics are picked by rank within the feature (the rank of a row is
    how many rows of its feature came before it), so a feature never has to be in memory whole.
    """

    def __init__(self, start: int, counts: np.ndarray, config: FeatureTableConfig) -> None:
        self.start, self.counts, self.config = start, counts, config
        self.sum = np.zeros(len(counts))
        self.seen = np.zeros(len(counts), dtype=np.int64)
        # Ascending rank h = (n - 1) q lies between order statistics floor(h) and floor(h) + 1 (numpy's linear
        # method); in the descending stream, ascending rank r is at position n - 1 - r.
        h = np.outer(config.quantiles, np.maximum(counts - 1, 0))
        low = np.floor(h).astype(np.int64)
        self.fraction = h - low
        self.want = np.concatenate(
            [
                [np.zeros(len(counts), np.int64)],
                counts - 1 - low,
                counts - 1 - np.minimum(low + 1, np.maximum(counts - 1, 0)),
            ]
        )
        self.picked = np.full(self.want.shape, np.nan)
        self.top: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, block: Triples) -> None:
        if not len(block.feature):
            return
        local = block.feature - self.start
        firsts = np.flatnonzero(np.concatenate([[True], local[1:] != local[:-1]]))
        lengths = np.diff(np.append(firsts, len(local)))
        owners = local[firsts]
        rank = np.arange(len(local)) - np.repeat(firsts - self.seen[owners], lengths)
        values = block.value.astype(np.float64)
        self.sum[owners] += np.add.reduceat(values, firsts)
        for row, want in enumerate(self.want):
            hit = rank == want[local]
            self.picked[row, local[hit]] = values[hit]
        keep = rank < self.config.top_k
        self.top.append((local[keep], block.tok[keep], block.value[keep].astype(np.float32)))
        self.seen[owners] += lengths

    def table(self) -> pa.Table:
        if not np.array_equal(self.seen, self.counts):
            raise RuntimeError("summary saw a different number of triples than the totals: spill files changed")
        n_q = len(self.config.quantiles)
        alive = self.counts > 0
        low, high = self.picked[1 : 1 + n_q], self.picked[1 + n_q :]
        stats = {
            "mean": np.divide(self.sum, self.counts, out=np.zeros_like(self.sum), where=alive),
            "max": self.picked[0],
            **{f"q{i}": low[i] + self.fraction[i] * (high[i] - low[i]) for i in range(n_q)},
        }
        owner, tok, value = (
            (np.concatenate(parts) for parts in zip(*self.top, strict=True))
            if self.top
            else (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        )
        offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(self.counts)))]).astype(np.int32)
        schema = summary_schema(self.config.quantiles)
        n_tokens = max(self.config.n_tokens, 1)
        columns = [
            pa.array(np.arange(self.start, self.start + len(self.counts), dtype=np.int32)),
            pa.array(self.counts),
            pa.array(self.counts / n_tokens),
            *(pa.array(column.astype(np.float32), mask=~alive) for column in stats.values()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(tok, pa.int64()), type=schema.field("top_tok").type),
            pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(value, pa.float32()), type=schema.field("top_value").type
            ),
        ]
        return pa.Table.from_arrays(columns, schema=schema)


class _ParquetFile:
    """A Parquet file written in fixed-size row groups and published atomically when the block exits cleanly.

    Row groups hold exactly `row_group_rows` rows (the last one fewer), whatever the block sizes, so the bytes
    depend only on the rows; zstd level 1 because scans are decode-bound and higher levels barely shrink
    sorted integer columns. Of the triples only `feature` is dictionary-encoded: on 4M sorted triples that
    wrote 3x faster and 34% smaller than pyarrow's default (dictionaries for tok and value, which then
    overflow and fall back), and read faster.
    """

    def __init__(
        self, path: Path, schema: pa.Schema, sorting: Sequence[tuple[str, bool]], row_group_rows: int | None
    ) -> None:
        self.path, self.schema, self.row_group_rows = path, schema, row_group_rows
        self.tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
        self.sorting = [pq.SortingColumn(schema.get_field_index(name), descending=desc) for name, desc in sorting]
        self.dictionary = ["feature"] if row_group_rows else True
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def __enter__(self) -> "_ParquetFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(
            self.tmp,
            self.schema,
            compression="zstd",
            compression_level=1,
            use_dictionary=self.dictionary,
            sorting_columns=self.sorting or None,
        )
        return self

    def write(self, block: Triples) -> None:
        """Append rows (in file order); they reach disk in whole row groups."""
        table = pa.Table.from_arrays([pa.array(column) for column in block], schema=self.schema)
        self.pending.append(table)
        self.pending_rows += len(table)
        self._flush(final=False)

    def write_table(self, table: pa.Table) -> None:
        """Append a table as one row group (the summary: one row group per bucket of features)."""
        self.writer.write_table(table, row_group_size=max(len(table), 1))

    def _flush(self, final: bool) -> None:
        size = self.row_group_rows
        if size is None or (self.pending_rows < size and not final) or not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        at = 0
        while len(table) - at >= size or (final and at < len(table)):
            group = table.slice(at, size).combine_chunks()
            self.writer.write_table(group, row_group_size=size)
            at += len(group)
        self.pending = [table.slice(at)]
        self.pending_rows = len(table) - at

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self._flush(final=True)
            self.writer.close()
            if exc_type is None:
                fsync_path(self.tmp)
                os.replace(self.tmp, self.path)
                fsync_path(self.path.parent)
        finally:
            self.tmp.unlink(missing_ok=True)
