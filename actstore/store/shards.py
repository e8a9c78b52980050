"""Shuffled, resumable reading of activation arrays for trainers, disjoint across workers and ranks.

    reader = ShardReader(store, [(harvest_id, "blocks.6.hook_resid_post")], batch_size=4096, seed=0)
    loader = make_loader(reader, num_workers=2)
    for batch in loader:                  # float32 [4096, d]; one pass over the loader is one epoch
        ...
    saved = json.dumps(loader.state_dict())   # later: loader.load_state_dict(json.loads(saved))

The order of rows is a function of the seed, the epoch and the settings, never of timing, so a saved position
names the exact next batch:
1. blocks: the arrays are cut into blocks of `chunk_tokens` rows (the Zarr chunk, the largest of the sources'
   when they differ); blocks the filters leave empty are dropped, and epoch `e` permutes the rest with the
   seed `(seed, e)`;
2. shards: rank `r` takes permuted blocks `r, r + world_size, ...` and deals them into one stream per
   DataLoader worker (stream `s` of `W` takes every `W`-th), so ranks and workers read disjoint rows and
   together every row once;
3. groups: a shard's blocks are cut, in order, into groups of at most `buffer_tokens` rows (the shuffle
   buffer); each group's rows are served in a permutation seeded by `(seed, epoch, rank, world_size, stream,
   group)`, so every batch mixes rows of all the group's blocks;
4. batches: each shard's stream is its groups one after another, cut into `batch_size` rows (a batch may span
   two groups); the loader interleaves the streams round-robin, which is what DataLoader does with its
   workers' batches (a resumed loader hands worker 0 the stream whose turn is next).

Reading: arrays stored plain (uncompressed, unsharded: how HarvestArrays writes them) are memory-mapped chunk
by chunk, so the shuffle buffer is the page cache and a batch copies each row once, straight out of it (other
layouts are decoded by Zarr, a group at a time). A background thread makes the batches, `PREFETCH_BATCHES`
ahead of the consumer, and asks the kernel to read the next group's chunk files while it serves this one; the
trainer's thread only takes finished batches. Memory per stream (one per worker process, one without workers):
the queued batches and one group's row indices, besides the page cache. Every batch is a new tensor (in shared
memory in a worker process) that the trainer may keep. Copies are made with numpy, leaving torch's thread pool
to the trainer.
"""

import contextlib
import mmap
import multiprocessing
import multiprocessing.context
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from zarr.codecs import BytesCodec
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS
from actstore.store.activations import ActivationArray
from actstore.store.root import Store

STATE_FORMAT = "actstore.shard_reader/1"
"""`format` of a saved reader state; a state of another format is refused rather than misread."""

PREFETCH_BATCHES = 2
"""Batches made ahead of the consumer, per stream."""

DEFAULT_BUFFER_TOKENS = 65_536
"""Rows per shuffle group: 16 chunks of 4096 rows mixed together; 150 MB per group at d=576 in float32."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PHYSICAL = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class TokBatch(NamedTuple):
    """A batch with the token each row came from (`with_tok=True`)."""

    acts: torch.Tensor
    """`[rows, width]` activations, sources side by side (`ShardReader.columns`)."""
    tok: torch.Tensor
    """`[rows]` int64 global token index of each row: joins the token table and every other array."""


class ShardReader(IterableDataset):
    """Batches of activation rows from one or more arrays, shuffled by seed and epoch, resumable exactly.

    Several sources (any harvests of the same tokens, any sites) are concatenated column-wise per row:
    a batch is `[batch_size, d1 + d2 + ...]` and `columns` says which columns hold which source. Iterating the
    reader in the main process serves one epoch from its current position and keeps `state_dict()` up to date;
    use `make_loader` for worker processes (the loader keeps the position then).

    Blocks are dealt to ranks whole, so ranks can get a few batches more or fewer than each other in an epoch:
    under DistributedDataParallel stop every rank at the shortest (e.g. an all-reduce MIN of "has a batch").
    """

    def __init__(
        self,
        store: Store,
        sources: Sequence[tuple[str, str]],
        batch_size: int,
        seed: int = 0,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        split: str | None = None,
        drop_positions: Iterable[int] = (),
        rows: tuple[int, int] | None = None,
        with_tok: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = torch.float32,
        drop_last: bool = False,
    ) -> None:
        """`sources`: `(harvest_id, site)` pairs. `split`: keep only `train` or `holdout` tokens.
        `drop_positions`: window positions to leave out (`{0}` drops the BOS row of every window).
        `rows`: keep only rows `start <= tok < stop`. `dtype`: of the batches; None keeps the stored dtype.
        `drop_last`: leave out each stream's last, short batch (then a few rows per epoch are not served)."""
        if not sources:
            raise UserError("no sources given: pass sources=[(harvest_id, site), ...]")
        self.arrays = [store.activations(harvest_id, site) for harvest_id, site in sources]
        self.names = [f"{harvest_id}/{site}" for harvest_id, site in sources]
        self.n_tokens = _check_same_tokens(self.arrays, self.names)
        self.dtype = _batch_dtype(dtype, self.arrays, self.names)
        widths = [a.shape[1] if len(a.shape) == 2 else 1 for a in self.arrays]
        edges = np.cumsum([0, *widths]).tolist()
        self.columns = {name: slice(a, b) for name, a, b in zip(self.names, edges, edges[1:], strict=False)}
        """Which columns of a batch hold which source (`harvest_id/site`)."""
        self.width = edges[-1]
        self.block_tokens = max(a.chunk_tokens for a in self.arrays)
        _check_settings(
            batch_size,
            buffer_tokens,
            self.block_tokens,
            self.names[0],
            rank,
            world_size,
            split,
            rows,
            self.n_tokens,
            drop_positions,
        )
        self.batch_size, self.seed, self.buffer_tokens = batch_size, seed, buffer_tokens
        self.split, self.drop_positions, self.rows = split, sorted(set(drop_positions)), rows
        self.with_tok, self.rank, self.world_size, self.drop_last = with_tok, rank, world_size, drop_last

        keep = _row_mask(store, self.arrays[0].attrs.corpus_id, self.n_tokens, split, self.drop_positions, rows)
        starts = np.arange(0, self.n_tokens, self.block_tokens)
        if keep is None:
            self._block_rows = np.minimum(self.block_tokens, self.n_tokens - starts)
        else:
            self._block_rows = np.add.reduceat(keep, starts, dtype=np.int64)
        self._keep_bits = None if keep is None else np.packbits(keep)
        """The row mask, a bit a row: it travels to every worker process."""
        self.n_rows = int(self._block_rows.sum())
        """Rows the filters keep: every epoch serves each of them once, over all ranks and workers."""
        if self.n_rows == 0:
            raise UserError(
                f"the filters (split={split!r}, drop_positions={self.drop_positions}, rows={rows}) keep "
                f"no row of {self.names[0]}: loosen them"
            )
        self._nonempty = np.flatnonzero(self._block_rows)
        self._epoch, self._taken, self._workers = 0, 0, 1

    # --- position -------------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (like DistributedSampler.set_epoch)."""
        self._epoch, self._taken = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position: epoch, batches already served from this rank's stream, and the settings that
        define the stream. It is per rank: save one per rank. With workers, the stream is the round-robin of the
        workers' streams, so the state holds `num_workers` and resumes only with the same number."""
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "batch": self._taken,
            "num_workers": self._workers if self._workers > 1 else 0,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the reader must have been built with the same settings."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(
                f"reader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}: "
                "pass the dict that ShardReader.state_dict() saved"
            )
        saved, mine = state.get("settings", {}), self._settings()
        for key, value in mine.items():
            if saved.get(key) != value:
                raise UserError(
                    f"reader state was saved with {key}={saved.get(key)!r} but this reader has "
                    f"{key}={value!r}: build the reader with the saved settings to resume"
                )
        self._epoch, self._taken = int(state["epoch"]), int(state["batch"])
        self._workers = max(int(state["num_workers"]), 1)

    def _settings(self) -> dict[str, Any]:
        """Everything that shapes the stream of batches, in JSON types, so a saved state can be checked."""
        return {
            "sources": self.names,
            "n_tokens": self.n_tokens,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "buffer_tokens": self.buffer_tokens,
            "block_tokens": self.block_tokens,
            "split": self.split,
            "drop_positions": self.drop_positions,
            "rows": list(self.rows) if self.rows else None,
            "rank": self.rank,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def _begin(self, workers: int) -> tuple[int, int]:
        """The (epoch, batches taken) an iteration with `workers` streams starts at; a finished epoch rolls over."""
        if self._taken and self._workers != workers:
            saved = self._workers if self._workers > 1 else 0
            raise UserError(
                f"the reader position was saved with num_workers={saved}: resume with "
                f"make_loader(reader, num_workers={saved}) or start a new epoch with set_epoch()"
            )
        self._workers = workers
        if self._taken >= sum(self._stream_batches(self._epoch, workers)):
            self._epoch, self._taken = self._epoch + 1, 0
        return self._epoch, self._taken

    def _advance(self, total: int) -> None:
        self._taken += 1
        if self._taken == total:
            self._epoch, self._taken = self._epoch + 1, 0

    # --- the plan: blocks -> shards -> groups -> batches ------------------------------------------------------

    def _shards(self, epoch: int, workers: int) -> list[np.ndarray]:
        """Block ids of each of this rank's `workers` streams in `epoch`, in reading order."""
        order = np.random.default_rng((self.seed, epoch)).permutation(self._nonempty)
        mine = order[self.rank :: self.world_size]
        return [mine[w::workers] for w in range(workers)]

    def _stream_batches(self, epoch: int, workers: int) -> list[int]:
        """Batches of each of this rank's `workers` streams in `epoch`."""
        rows = [int(self._block_rows[blocks].sum()) for blocks in self._shards(epoch, workers)]
        return [r // self.batch_size if self.drop_last else -(-r // self.batch_size) for r in rows]

    def _groups(self, blocks: np.ndarray) -> list[np.ndarray]:
        """Consecutive blocks, at most `buffer_tokens` rows a group (a block is never cut)."""
        cuts, total = [], 0
        for i, rows in enumerate(self._block_rows[blocks].tolist()):
            if total and total + rows > self.buffer_tokens:
                cuts.append(i)
                total = 0
            total += rows
        return np.split(blocks, cuts) if len(blocks) else []

    # --- iteration --------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor | TokBatch]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        epoch, taken = self._begin(workers)
        counts = self._stream_batches(epoch, workers)
        share, next_stream = round_robin_position(counts, taken)
        # DataLoader starts every iteration with worker 0: rotate the streams so that worker 0 reads the one
        # whose turn is next, and the round-robin goes on exactly as it would have without the restart.
        stream_id = (next_stream + worker) % workers
        stream = self._stream(
            epoch, stream_id, self._shards(epoch, workers)[stream_id], share[stream_id], shared=info is not None
        )
        if info is not None:
            yield from stream  # a worker's copy: the loader in the main process keeps the position
            return
        total = sum(counts)
        for batch in stream:
            self._advance(total)
            yield batch

    def _stream(
        self, epoch: int, stream: int, blocks: np.ndarray, skip: int, shared: bool
    ) -> Iterator[torch.Tensor | TokBatch]:
        """One stream's batches, starting after its first `skip` batches without reading the groups before.

        The batches are made on a background thread, a couple ahead of the consumer, so the trainer's thread
        only takes them.
        """
        groups = self._groups(blocks)
        starts = np.cumsum([0, *(int(self._block_rows[g].sum()) for g in groups)])
        first = skip * self.batch_size
        g0 = int(np.searchsorted(starts, first, side="right")) - 1
        offset = first - int(starts[g0]) if g0 < len(groups) else 0
        made = _Background(self._make_batches(epoch, stream, groups, g0, offset, shared), PREFETCH_BATCHES)
        try:
            for batch in made:
                yield batch if self.with_tok else batch.acts
        finally:
            made.close()

    def _make_batches(
        self, epoch: int, stream: int, groups: list[np.ndarray], g0: int, offset: int, shared: bool
    ) -> Iterator[TokBatch]:
        """Batches of groups `g0...`, from row `offset` of the first: each a seeded sample of its group's rows, in
        random order, copied out of the sources' chunks."""
        sources = [_ChunkFiles(array) for array in self.arrays]
        gather = _Gather(sources, list(self.columns.values()), self.batch_size)
        batch, filled = None, 0
        for g in range(g0, len(groups)):
            group = self._load_group(epoch, stream, g, groups[g], sources)
            if g + 1 < len(groups):
                self._advise(groups[g + 1], sources)  # the disk reads the next group while this one is served
            while offset < len(group.order):
                if batch is None:
                    batch = self._new_batch(shared)
                take = min(self.batch_size - filled, len(group.order) - offset)
                tok = group.tok[group.order[offset : offset + take]]
                gather(group.chunks, tok, batch.acts[filled : filled + take])
                batch.tok.numpy()[filled : filled + take] = tok
                offset, filled = offset + take, filled + take
                if filled == self.batch_size:
                    yield batch
                    batch, filled = None, 0
            offset = 0
        if batch is not None and not self.drop_last:
            yield TokBatch(batch.acts[:filled], batch.tok[:filled])

    def _new_batch(self, shared: bool) -> TokBatch:
        """Room for one batch; in shared memory in worker processes, so handing it over copies nothing more."""
        acts = torch.empty((self.batch_size, self.width), dtype=self.dtype)
        tok = torch.empty(self.batch_size, dtype=torch.int64)
        if shared:
            acts.share_memory_()
            tok.share_memory_()
        return TokBatch(acts, tok)

    def _load_group(
        self, epoch: int, stream: int, group: int, blocks: np.ndarray, sources: "list[_ChunkFiles]"
    ) -> "_Group":
        """A group's kept rows (their `tok`, in block order), the seeded order to serve them in, and every
        source's chunks that hold them, opened."""
        pieces = []
        for block, kept in zip(blocks.tolist(), self._block_rows[blocks].tolist(), strict=True):
            start = block * self.block_tokens
            stop = min(start + self.block_tokens, self.n_tokens)
            pieces.append(
                np.arange(start, stop) if kept == stop - start else start + np.flatnonzero(self._kept(start, stop))
            )
        tok = np.concatenate(pieces)
        rng = np.random.default_rng((self.seed, epoch, self.rank, self.world_size, stream, group))
        chunks = [{int(c): source.open(int(c)) for c in self._chunks_of(blocks, source)} for source in sources]
        return _Group(tok, rng.permutation(len(tok)), chunks)

    def _advise(self, blocks: np.ndarray, sources: "list[_ChunkFiles]") -> None:
        for source in sources:
            for chunk in self._chunks_of(blocks, source):
                source.advise(int(chunk))

    def _chunks_of(self, blocks: np.ndarray, source: "_ChunkFiles") -> np.ndarray:
        """The source's chunks that hold rows of `blocks` (a block spans several chunks of a finer-chunked one)."""
        first = blocks * self.block_tokens // source.chunk_tokens
        last = (np.minimum((blocks + 1) * self.block_tokens, self.n_tokens) - 1) // source.chunk_tokens
        return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last, strict=True)]))

    def _kept(self, start: int, stop: int) -> np.ndarray:
        """The filters' mask of rows `start..stop-1`."""
        assert self._keep_bits is not None
        bits = np.unpackbits(self._keep_bits[start // 8 : -(-stop // 8)])
        return bits[start % 8 : start % 8 + stop - start].astype(bool)


def round_robin_position(counts: Sequence[int], taken: int) -> tuple[list[int], int]:
    """Where the first `taken` items of a round-robin of streams of `counts` items end: how many items of each
    stream they hold, and which stream gives the next item. This is DataLoader's order of worker batches: one
    from each stream in turn, skipping streams that have run out."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    if taken >= counts_arr.sum():
        return counts_arr.tolist(), 0
    full = 0  # the most whole rounds that fit in `taken`
    high = int(counts_arr.max(initial=0))
    while full < high:
        mid = (full + high + 1) // 2
        if np.minimum(counts_arr, mid).sum() <= taken:
            full = mid
        else:
            high = mid - 1
    share = np.minimum(counts_arr, full)
    in_round = np.flatnonzero(counts_arr > full)  # streams still giving in round `full`, in turn
    rest = taken - int(share.sum())
    share[in_round[:rest]] += 1
    return share.tolist(), int(in_round[rest])


class _ChunkFiles:
    """One source's chunks as numpy arrays of its stored bits (`[chunk_tokens, d]`, bf16 as uint16).

    Arrays stored plain (uncompressed and unsharded, as HarvestArrays writes them) are memory-mapped: a batch
    then copies its rows once, straight out of the page cache, and the shuffle buffer is the page cache itself.
    Any other layout is decoded whole by Zarr, chunk by chunk.
    """

    def __init__(self, array: ActivationArray) -> None:
        self.array = array
        self.chunk_tokens = int(array.zarr.chunks[0])
        self.d = array.shape[1] if len(array.shape) == 2 else 1
        self.dtype = np.dtype(_PHYSICAL[array.dtype]).newbyteorder("<")
        codecs = array.zarr.metadata.codecs  # type: ignore[union-attr]
        self.plain = (
            isinstance(array.zarr.store, LocalStore)
            and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian in (Endian.little, None)
            and (len(array.shape) == 1 or array.zarr.chunks[1] == self.d)
        )

    def open(self, chunk: int) -> np.ndarray:
        if not self.plain:
            start = chunk * self.chunk_tokens
            return self.array.zarr[start : start + self.chunk_tokens].reshape(-1, self.d)
        path = self._path(chunk)
        size = self.chunk_tokens * self.d * self.dtype.itemsize
        try:
            with open(path, "rb") as file:
                if os.fstat(file.fileno()).st_size != size:
                    raise UserError(
                        f"chunk file {path} is not {size} bytes: the harvest was altered; delete it "
                        "and re-run the harvest"
                    )
                mapped = mmap.mmap(file.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise UserError(
                f"chunk file {path} is missing: the harvest was altered; delete it and re-run the harvest"
            ) from None
        return np.frombuffer(mapped, dtype=self.dtype).reshape(self.chunk_tokens, self.d)

    def advise(self, chunk: int) -> None:
        """Ask the kernel to start reading a chunk file into the page cache (no-op when it is cached)."""
        if self.plain and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(FileNotFoundError), open(self._path(chunk), "rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    def _path(self, chunk: int) -> Path:
        key = self.array.zarr.metadata.encode_chunk_key(  # type: ignore[union-attr]
            (chunk,) if len(self.array.shape) == 1 else (chunk, 0)
        )
        return self.array.path / key


class _Gather:
    """Copies the rows of given `tok`s of every source into a batch; one per stream (it holds staging memory)."""

    def __init__(self, sources: list[_ChunkFiles], columns: list[slice], batch_size: int) -> None:
        self.sources, self.columns = sources, columns
        self.staging = [np.empty((batch_size, s.d), dtype=s.dtype) for s in sources]

    def __call__(self, chunks: list[dict[int, np.ndarray]], tok: np.ndarray, out: torch.Tensor) -> None:
        """Rows `tok` (in this order) of every source, side by side, into `out`."""
        n = len(tok)
        for source, opened, cols, staging in zip(self.sources, chunks, self.columns, self.staging, strict=True):
            ascending = np.argsort(tok)  # chunk by chunk, each read front to back
            sorted_chunk, rows = np.divmod(tok[ascending], source.chunk_tokens)
            runs = np.flatnonzero(np.diff(sorted_chunk)) + 1
            stage = staging[:n]
            # One take per chunk ("clip" writes straight into `out`: the rows are in range), then into `tok` order
            # from memory still in cache. numpy copies on this thread, leaving torch's threads to the trainer.
            for a, b in zip([0, *runs.tolist()], [*runs.tolist(), n], strict=True):
                np.take(opened[int(sorted_chunk[a])], rows[a:b], axis=0, out=stage[a:b], mode="clip")
            back = np.empty_like(ascending)
            back[ascending] = np.arange(n)
            target = out[:, cols]
            if target.is_contiguous() and _DTYPES[source.array.dtype] == out.dtype:
                np.take(stage, back, axis=0, out=_physical_numpy(target), mode="clip")
            else:
                _convert(np.take(stage, back, axis=0), source.array.dtype, target)


def _physical_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The same memory as numpy in the dtype Zarr stores (bf16 as uint16 bits)."""
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _convert(stored: np.ndarray, logical_dtype: str, out: torch.Tensor) -> None:
    """Stored values into `out`'s dtype: in numpy, on this thread, where numpy can (bf16 widens exactly by a
    shift of its bits), by torch where it cannot (rounding to bf16)."""
    if out.dtype == torch.float32 and logical_dtype == "bfloat16":
        np.left_shift(stored, 16, out=out.numpy().view(np.uint32), dtype=np.uint32)
    elif out.dtype != torch.bfloat16 and logical_dtype != "bfloat16":
        np.copyto(out.numpy(), stored, casting="same_kind")
    else:
        source = (
            torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
            if logical_dtype == "bfloat16"
            else torch.from_numpy(stored)
        )
        out.copy_(source)


class _Group(NamedTuple):
    """A loaded group of a stream."""

    tok: np.ndarray
    """Its kept rows, in block order."""
    order: np.ndarray
    """Seeded permutation: the stream's i-th row of this group is `tok[order[i]]`."""
    chunks: list[dict[int, np.ndarray]]
    """Per source, its chunks that hold the group's rows, opened."""


_DONE = object()


class _Failed(NamedTuple):
    error: BaseException


class _Background:
    """Runs an iterator on a thread, at most `depth` items ahead of the consumer: memory stays bounded whatever
    the speed of either side, and the consumer's thread is free while the next items are made."""

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as error:
            self._put(_Failed(error))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop (after the item in progress), wait for the thread, and close the iterator."""
        self._stop.set()
        self._thread.join()
        if hasattr(self._items, "close"):
            self._items.close()


class ShardLoader:
    """A DataLoader over a ShardReader that keeps the reader's position, so `state_dict()` names the exact
    next batch with workers too (the order is DataLoader's round-robin of its workers' streams)."""

    def __init__(
        self,
        reader: ShardReader,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = "forkserver",
    ) -> None:
        if num_workers < 0:
            raise UserError(f"num_workers={num_workers} is negative: pass 0 (read in this process) or more")
        self.reader, self.num_workers, self.prefetch_factor = reader, num_workers, prefetch_factor
        self.pin_memory = pin_memory and torch.cuda.is_available()
        """Pinning needs CUDA; without it batches stay in pageable memory instead of warning on every epoch."""
        self.context = _worker_context(multiprocessing_context) if num_workers else None

    def __iter__(self) -> Iterator[torch.Tensor | TokBatch]:
        """One epoch from the reader's position (the rest of the saved epoch after `load_state_dict`)."""
        workers = max(self.num_workers, 1)
        epoch, _ = self.reader._begin(workers)
        loader = DataLoader(
            self.reader,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            multiprocessing_context=self.context,
        )
        if self.num_workers == 0:
            yield from loader  # the reader itself runs here and keeps its position
            return
        total = sum(self.reader._stream_batches(epoch, workers))
        for batch in loader:
            self.reader._advance(total)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; it must come from a loader with the same `num_workers`."""
        saved = int(state.get("num_workers", 0))
        if state.get("batch") and max(saved, 1) != max(self.num_workers, 1):
            raise UserError(
                f"the loader state was saved with num_workers={saved} but this loader has "
                f"num_workers={self.num_workers}: resume with make_loader(reader, num_workers={saved})"
            )
        self.reader.load_state_dict(state)


def make_loader(
    reader: ShardReader,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = "forkserver",
) -> ShardLoader:
    """A loader of `reader`'s batches using `num_workers` processes (0: this one); iterate it once per epoch.

    `num_workers=0` is usually the fastest: the reader already makes batches on a background thread. Worker
    processes hand each batch over through shared memory, which costs a fresh shared segment per batch (~5 ms
    for 9 MB on a 2-core host, halving a worker's rate); they pay off only where many cores are free.
    `pin_memory` puts batches in page-locked memory for fast, asynchronous copies to a CUDA device.
    Workers start from a fork server by default, not by forking this process: a fork copies the state of this
    process's threads (Prefect's services, CUDA, Zarr's event loop), and under Prefect 3.8 forked workers fail
    as they exit. The server preloads this module, so it costs one start (~2 s) per process and ~0.1 s of
    worker start per epoch; pass `multiprocessing_context="fork"` where forking is known to be safe.
    """
    return ShardLoader(reader, num_workers, pin_memory, prefetch_factor, multiprocessing_context)


def _worker_context(name: str | None) -> multiprocessing.context.BaseContext | None:
    """The start method for workers; a fork server preloads the reader's imports (torch, zarr, polars) once."""
    if name is None:
        return None
    try:
        context = multiprocessing.get_context(name)
    except ValueError:
        raise UserError(
            f"multiprocessing_context {name!r} is not a start method here: use one of "
            f"{', '.join(multiprocessing.get_all_start_methods())}"
        ) from None
    if name == "forkserver":
        context.set_forkserver_preload(["__main__", __name__])
    return context


def _check_same_tokens(arrays: list[ActivationArray], names: list[str]) -> int:
    """Rows of the sources, which must be the same tokens: rows are joined by position."""
    first = arrays[0]
    for array, name in zip(arrays[1:], names[1:], strict=True):
        if array.attrs.corpus_id != first.attrs.corpus_id:
            raise UserError(
                f"source {name} comes from corpus {array.attrs.corpus_id} but {names[0]} from "
                f"{first.attrs.corpus_id}: read together only harvests of one corpus"
            )
        if array.shape[0] != first.shape[0]:
            raise UserError(
                f"source {name} has {array.shape[0]} rows but {names[0]} has {first.shape[0]}: read "
                "together only harvests of the same tokens (same corpus and max_tokens)"
            )
    return first.shape[0]


def _batch_dtype(dtype: torch.dtype | None, arrays: list[ActivationArray], names: list[str]) -> torch.dtype:
    if dtype is None:
        stored = {array.dtype for array in arrays}
        if len(stored) > 1:
            raise UserError(
                f"sources {', '.join(names)} are stored as {' and '.join(sorted(stored))}: pass "
                "dtype=torch.float32 (or one of them) to read them together"
            )
        return _DTYPES[stored.pop()]
    if dtype not in _DTYPES.values():
        raise UserError(
            f"dtype {dtype} is not one the reader gives: use torch.float32, torch.float16, "
            "torch.bfloat16 or None (the stored dtype)"
        )
    return dtype


def _check_settings(
    batch_size: int,
    buffer_tokens: int,
    block_tokens: int,
    name: str,
    rank: int,
    world_size: int,
    split: str | None,
    rows: tuple[int, int] | None,
    n_tokens: int,
    drop_positions: Iterable[int],
) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    if buffer_tokens < block_tokens:
        raise UserError(
            f"buffer_tokens={buffer_tokens} is smaller than one chunk ({block_tokens} rows) of {name}: "
            f"pass buffer_tokens >= {block_tokens}"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank={rank} is not in range for world_size={world_size}: pass 0 <= rank < world_size")
    if split is not None and split not in SPLITS:
        raise UserError(f"split {split!r} is not a split of the token table: pass one of {', '.join(SPLITS)} or None")
    if rows is not None and not 0 <= rows[0] < rows[1] <= n_tokens:
        raise UserError(
            f"rows={tuple(rows)} is not a range of the {n_tokens} rows of {name}: pass (start, stop) "
            f"with 0 <= start < stop <= {n_tokens}"
        )
    if any(p < 0 for p in drop_positions):
        raise UserError(f"drop_positions {sorted(drop_positions)} has a negative position: pass window positions >= 0")


def _row_mask(
    store: Store,
    corpus_id: str,
    n_tokens: int,
    split: str | None,
    drop_positions: list[int],
    rows: tuple[int, int] | None,
) -> np.ndarray | None:
    """Which rows the filters keep (None: all), computed once from the token table (one byte per row)."""
    keep: np.ndarray | None = None
    if split is not None or drop_positions:
        condition = pl.lit(True)
        if split is not None:
            condition = condition & (pl.col("split").cast(pl.String) == split)
        if drop_positions:
            condition = condition & ~pl.col("pos").is_in(drop_positions)
        column = store.tokens(corpus_id).head(n_tokens).select(condition.alias("keep")).collect()["keep"]
        if len(column) < n_tokens:
            raise UserError(
                f"token table of corpus {corpus_id} has {len(column)} rows, fewer than the {n_tokens} "
                "harvested: re-ingest the corpus"
            )
        keep = column.to_numpy().copy()
    if rows is not None:
        keep = np.ones(n_tokens, dtype=bool) if keep is None else keep
        keep[: rows[0]] = False
        keep[rows[1] :] = False
    return keep
