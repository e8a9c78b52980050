"""The shard reader against brute force: every kept row exactly once per epoch over ranks x workers, rows equal to
direct Zarr reads, filters equal to numpy masks of the token table, seeded order, exact resume from JSON, and
batches that mix documents far more than a sequential read."""

import gc
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import zarr

from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.store.files import write_manifest
from actstore.store.root import Store
from actstore.store.shards import ShardReader, TokBatch, _ChunkFiles, make_loader, round_robin_position
from tests.helpers import write_text_corpus
from tests.shard_data import SyntheticStore, write_synthetic_harvest, write_synthetic_store
from tests.tiny_models import build_tiny_model

CTX = 64
CHUNK = 256
N_SEQS = 128  # 8192 rows, 32 chunks
A, B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, SyntheticStore]:
    root = tmp_path_factory.mktemp("shards")
    made = write_synthetic_store(
        root, N_SEQS, CTX, CHUNK, [{A: (8, "float32"), B: (6, "bfloat16")}, {A: (5, "float16")}]
    )
    return Store(root), made


def sources(made: SyntheticStore) -> list[tuple[str, str]]:
    """Three arrays of three stored dtypes in two harvests."""
    return [(made.harvest_ids[0], A), (made.harvest_ids[0], B), (made.harvest_ids[1], A)]


def reference_rows(store: Store, srcs: list[tuple[str, str]]) -> np.ndarray:
    """All rows of the sources side by side in float32, read with zarr directly (bf16 widened from its bits)."""
    columns = []
    for harvest_id, site in srcs:
        raw = zarr.open_array(store.harvest_dir(harvest_id) / f"{site}.zarr", mode="r")[:]
        if raw.dtype == np.uint16:
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        columns.append(raw.astype(np.float32))
    return np.concatenate(columns, axis=1)


def token_table(store: Store, made: SyntheticStore) -> pl.DataFrame:
    return pl.read_parquet(store.corpus_dir(made.corpus_id) / "*.parquet").sort("tok")


def brute_mask(table: pl.DataFrame, split: str | None, drop: set[int], rows: tuple[int, int] | None) -> np.ndarray:
    keep = np.ones(table.height, dtype=bool)
    if split is not None:
        keep &= np.asarray(table["split"].cast(pl.String).to_list()) == split
    if drop:
        keep &= ~np.isin(table["pos"].to_numpy(), list(drop))
    if rows is not None:
        index = np.arange(table.height)
        keep &= (index >= rows[0]) & (index < rows[1])
    return keep


def epoch_batches(loader: Any) -> list[TokBatch]:
    return list(loader)


def toks_of(batches: list[TokBatch]) -> np.ndarray:
    return torch.cat([b.tok for b in batches]).numpy()


FILTERS = [
    {},
    {"split": "train", "drop_positions": {0}},
    {"split": "holdout", "rows": (1000, 7000), "drop_positions": {0, 1, 63}},
]


@pytest.mark.parametrize("filters", FILTERS, ids=["all", "train-nobos", "holdout-range"])
def test_every_kept_row_once_over_ranks_and_workers(
    synth: tuple[Store, SyntheticStore], filters: dict[str, Any]
) -> None:
    store, made = synth
    srcs = sources(made)
    expected = np.flatnonzero(
        brute_mask(
            token_table(store, made), filters.get("split"), filters.get("drop_positions", set()), filters.get("rows")
        )
    )
    reference = reference_rows(store, srcs)
    seen, sizes = [], []
    for rank in range(2):
        reader = ShardReader(
            store, srcs, batch_size=96, seed=3, buffer_tokens=1024, with_tok=True, rank=rank, world_size=2, **filters
        )
        assert reader.n_rows == len(expected)
        batches = epoch_batches(make_loader(reader, num_workers=2))
        for batch in batches:
            assert batch.acts.dtype == torch.float32 and batch.acts.shape[1] == 8 + 6 + 5
            np.testing.assert_array_equal(batch.acts.numpy(), reference[batch.tok.numpy()])
        seen.append(toks_of(batches))
        sizes += [len(b.tok) for b in batches]
    everything = np.concatenate(seen)
    assert len(everything) == len(expected)  # no row twice ...
    np.testing.assert_array_equal(np.sort(everything), expected)  # ... and every kept row once
    assert not set(seen[0]) & set(seen[1])
    assert sum(size != 96 for size in sizes) <= 4  # only each (rank, worker) stream's last batch is short


def test_drop_last_serves_only_full_batches(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    seen = []
    for rank in range(2):
        reader = ShardReader(
            store,
            sources(made)[:1],
            batch_size=300,
            buffer_tokens=1024,
            with_tok=True,
            rank=rank,
            world_size=2,
            split="train",
            drop_last=True,
        )
        batches = list(reader)
        assert all(len(b.tok) == 300 for b in batches)
        seen.append(toks_of(batches))
    everything = np.concatenate(seen)
    kept = np.flatnonzero(brute_mask(token_table(store, made), "train", set(), None))
    assert len(np.unique(everything)) == len(everything) and np.isin(everything, kept).all()
    assert len(kept) - 2 * 300 < len(everything) <= len(kept)  # each rank leaves out less than a batch


def test_columns_and_stored_dtype(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    reader = ShardReader(store, sources(made), batch_size=64, buffer_tokens=512, with_tok=True)
    assert reader.columns == {
        f"{made.harvest_ids[0]}/{A}": slice(0, 8),
        f"{made.harvest_ids[0]}/{B}": slice(8, 14),
        f"{made.harvest_ids[1]}/{A}": slice(14, 19),
    }
    bf16 = ShardReader(store, [(made.harvest_ids[0], B)], batch_size=64, buffer_tokens=512, with_tok=True, dtype=None)
    bits = zarr.open_array(store.harvest_dir(made.harvest_ids[0]) / f"{B}.zarr", mode="r")[:]
    batch = next(iter(bf16))
    assert batch.acts.dtype == torch.bfloat16
    np.testing.assert_array_equal(batch.acts.view(torch.uint16).numpy(), bits[batch.tok.numpy()])
    half = ShardReader(store, sources(made), batch_size=64, buffer_tokens=512, with_tok=True, dtype=torch.float16)
    batch = next(iter(half))
    reference = reference_rows(store, sources(made))[batch.tok.numpy()].astype(np.float16)
    np.testing.assert_array_equal(batch.acts.numpy(), reference)
    plain = next(iter(ShardReader(store, sources(made), batch_size=64, buffer_tokens=512)))
    assert isinstance(plain, torch.Tensor) and plain.shape == (64, 19)


def order(store: Store, made: SyntheticStore, seed: int, epochs: int = 1) -> list[np.ndarray]:
    reader = ShardReader(store, sources(made)[:1], batch_size=128, seed=seed, buffer_tokens=1024, with_tok=True)
    return [toks_of(list(reader)) for _ in range(epochs)]


def test_seeded_order(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    first, second = order(store, made, seed=0, epochs=2)
    np.testing.assert_array_equal(first, order(store, made, seed=0)[0])  # same seed, same order
    other = order(store, made, seed=1)[0]
    assert np.mean(first != other) > 0.9  # another seed: another order
    assert np.mean(first != second) > 0.9  # next epoch: another order of the same rows
    np.testing.assert_array_equal(np.sort(first), np.sort(second))
    reader = ShardReader(store, sources(made)[:1], batch_size=128, seed=0, buffer_tokens=1024, with_tok=True)
    reader.set_epoch(1)
    np.testing.assert_array_equal(toks_of(list(reader)), second)


def run_loader(
    store: Store,
    made: SyntheticStore,
    num_workers: int,
    state: str | None = None,
    stop_after: int | None = None,
    epochs: int = 2,
) -> tuple[list[TokBatch], str]:
    """Batches of `epochs` epochs (or the first `stop_after`), resuming from a JSON `state` when given."""
    reader = ShardReader(
        store,
        sources(made),
        batch_size=100,
        seed=7,
        buffer_tokens=1024,
        with_tok=True,
        split="train",
        drop_positions={0},
    )
    loader = make_loader(reader, num_workers=num_workers)
    if state is not None:
        loader.load_state_dict(json.loads(state))
    got: list[TokBatch] = []
    for _ in range(epochs):
        for batch in loader:
            got.append(TokBatch(batch.acts.clone(), batch.tok.clone()))
            if len(got) == stop_after:
                return got, json.dumps(loader.state_dict())
    return got, json.dumps(loader.state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_json_state_continues_with_the_identical_batches(
    synth: tuple[Store, SyntheticStore], num_workers: int
) -> None:
    store, made = synth
    whole, _ = run_loader(store, made, num_workers)
    per_epoch = len(whole) // 2
    for k in (1, 23, per_epoch - 1, per_epoch, per_epoch + 5):
        head, state = run_loader(store, made, num_workers, stop_after=k)
        gc.collect()
        assert not [t for t in threading.enumerate() if t.name == "shard-prefetch"]  # a stopped reader lets go
        tail, _ = run_loader(store, made, num_workers, state=state, epochs=2)
        resumed = head + tail
        assert len(resumed) >= len(whole)
        for expected, got in zip(whole, resumed, strict=False):
            torch.testing.assert_close(got.tok, expected.tok, rtol=0, atol=0)
            torch.testing.assert_close(got.acts, expected.acts, rtol=0, atol=0)


def test_round_robin_position_matches_brute_force() -> None:
    for counts in ([3, 1, 2], [0, 2, 2], [1, 1, 1, 5], [4]):
        turns = [w for r in range(max(counts)) for w, count in enumerate(counts) if r < count]  # the order
        for taken in range(len(turns)):
            share = [turns[:taken].count(w) for w in range(len(counts))]
            assert round_robin_position(counts, taken) == (share, turns[taken])
        assert round_robin_position(counts, len(turns))[0] == counts


@pytest.fixture(scope="module")
def mixing_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, SyntheticStore]:
    root = tmp_path_factory.mktemp("mixing")
    return Store(root), write_synthetic_store(root, 512, CTX, CHUNK, [{A: (4, "float32")}], seed=5)


def test_batches_mix_documents(mixing_store: tuple[Store, SyntheticStore]) -> None:
    """128-row batches from 8-chunk (2048-row) groups of 32768 rows in 128 chunks, documents of 20-200 tokens."""
    store, made = mixing_store
    n = len(made.doc)

    def docs_per_batch(seed: int) -> list[set[int]]:
        reader = ShardReader(
            store, [(made.harvest_ids[0], A)], batch_size=128, seed=seed, buffer_tokens=2048, with_tok=True
        )
        return [set(made.doc[b.tok.numpy()].tolist()) for b in reader]

    sequential = [set(made.doc[s : s + 128].tolist()) for s in range(0, n, 128)]
    seed0, seed1 = docs_per_batch(0), docs_per_batch(1)
    mean_sequential = np.mean([len(d) for d in sequential])
    mean_shuffled = np.mean([len(d) for d in seed0])
    assert mean_sequential < 3  # ~2.2: a run of 128 tokens spans one or two documents
    assert mean_shuffled > 8 * mean_sequential  # ~23: a batch draws from every document of its 8 chunks
    # The same batch index under another seed comes from other chunks: few documents in common (~0.08).
    overlap = np.mean([len(a & b) / len(a) for a, b in zip(seed0, seed1, strict=True)])
    assert overlap < 0.2


def test_real_harvest_two_sites(tmp_path: Path) -> None:
    """Through the real flows: a tiny Llama harvest of two sites, read train rows without BOS by two workers in a
    process that has run Prefect flows (forked workers would fail as they exit: see make_loader)."""
    model_dir = build_tiny_model("llama", tmp_path / "llama")
    root = tmp_path / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(tmp_path / "docs")),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=16,
            holdout_fraction=0.3,
        ),
    )
    config = HarvestConfig(corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=(A, B), batch_windows=4)
    harvested = harvest(str(root), config, HarvestRuntime(progress=False, device="cpu"))
    store = Store(root)
    reader = ShardReader(
        store,
        [(harvested.id, A), (harvested.id, B)],
        batch_size=50,
        buffer_tokens=256,
        split="train",
        drop_positions={0},
        with_tok=True,
    )
    batches = list(make_loader(reader, num_workers=2))
    tok = toks_of(batches)
    n = harvested.counts["n_tokens"]
    table = pl.read_parquet(store.corpus_dir(corpus.id) / "*.parquet").sort("tok").head(n)
    expected = table.filter((pl.col("split").cast(pl.String) == "train") & (pl.col("pos") != 0))["tok"].to_numpy()
    np.testing.assert_array_equal(np.sort(tok), expected)
    assert 0 < len(expected) < n
    acts = torch.cat([b.acts for b in batches]).numpy()
    first, second = store.activations(harvested.id, A)[:], store.activations(harvested.id, B)[:]
    np.testing.assert_array_equal(acts, np.concatenate([first[tok], second[tok]], axis=1))


def test_compressed_arrays_are_read_through_zarr(synth: tuple[Store, SyntheticStore]) -> None:
    """An array stored with a compressor (not how harvests write them) has no plain chunk files to map: the
    reader decodes it with Zarr and serves the same rows."""
    store, made = synth
    plain = store.activations(made.harvest_ids[0], B)
    attrs = plain.attrs.model_copy(update={"harvest_id": "harvest-compressed"})
    directory = store.harvest_dir("harvest-compressed")
    compressed = zarr.create_array(
        store=directory / f"{B}.zarr",
        shape=plain.shape,
        dtype=plain.zarr.dtype,
        chunks=(CHUNK // 2, plain.shape[1]),
        compressors=zarr.codecs.ZstdCodec(level=1),
        attributes=attrs.model_dump(mode="json"),
    )
    compressed[:] = plain.zarr[:]
    manifest = store.manifest("harvest", made.harvest_ids[0]).model_copy(
        update={"id": "harvest-compressed", "extra": {"arrays": {B: {}}, "corpus_id": made.corpus_id}}
    )
    write_manifest(directory, manifest)
    assert not _ChunkFiles(store.activations("harvest-compressed", B)).plain
    srcs = [("harvest-compressed", B), (made.harvest_ids[0], A)]
    reader = ShardReader(store, srcs, batch_size=100, buffer_tokens=1024, with_tok=True, split="holdout")
    batches = list(reader)
    tok = toks_of(batches)
    np.testing.assert_array_equal(
        np.sort(tok), np.flatnonzero(brute_mask(token_table(store, made), "holdout", set(), None))
    )
    np.testing.assert_array_equal(
        torch.cat([b.acts for b in batches]).numpy(),
        reference_rows(store, [(made.harvest_ids[0], B), (made.harvest_ids[0], A)])[tok],
    )


def test_damaged_chunk_files_are_user_errors(tmp_path: Path) -> None:
    made = write_synthetic_store(tmp_path, 16, CTX, CHUNK, [{A: (4, "float32")}])
    store = Store(tmp_path)
    chunk_file = store.harvest_dir(made.harvest_ids[0]) / f"{A}.zarr" / "c" / "1" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:100])
    with pytest.raises(UserError, match="is not 4096 bytes"):
        list(ShardReader(store, [(made.harvest_ids[0], A)], batch_size=64, buffer_tokens=CHUNK))
    chunk_file.unlink()
    with pytest.raises(UserError, match="is missing"):
        list(ShardReader(store, [(made.harvest_ids[0], A)], batch_size=64, buffer_tokens=CHUNK))


def test_pin_memory_without_cuda_gives_the_same_batches(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    reader = ShardReader(store, sources(made), batch_size=128, buffer_tokens=1024, with_tok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned = toks_of(list(make_loader(reader, pin_memory=True)))
    reader.set_epoch(0)
    np.testing.assert_array_equal(pinned, toks_of(list(make_loader(reader))))


BAD_SETTINGS = [
    ({"batch_size": 0}, "batch_size=0"),
    ({"buffer_tokens": 100}, "buffer_tokens=100 is smaller than one chunk"),
    ({"rank": 2, "world_size": 2}, "rank=2 is not in range"),
    ({"split": "test"}, "split 'test'"),
    ({"rows": (5, 5)}, r"rows=\(5, 5\)"),
    ({"rows": (0, 10**6)}, "rows="),
    ({"drop_positions": {-1}}, "negative position"),
    ({"dtype": torch.int32}, "dtype torch.int32"),
    ({"rows": (0, 64), "drop_positions": set(range(CTX))}, "keep no row"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_settings_are_user_errors(
    synth: tuple[Store, SyntheticStore], settings: dict[str, Any], message: str
) -> None:
    store, made = synth
    kwargs: dict[str, Any] = {"batch_size": 64, **settings}
    with pytest.raises(UserError, match=message):
        ShardReader(store, sources(made)[:1], **kwargs)


def test_bad_sources_are_user_errors(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    with pytest.raises(UserError, match="no sources"):
        ShardReader(store, [], batch_size=8)
    with pytest.raises(UserError, match="has no site"):
        ShardReader(store, [(made.harvest_ids[0], "blocks.9.hook_resid_post")], batch_size=8)
    with pytest.raises(UserError, match="stored as bfloat16 and float16 and float32"):
        ShardReader(store, sources(made), batch_size=8, dtype=None)
    other = write_synthetic_store(store.root, N_SEQS, CTX, CHUNK, [{A: (3, "float32")}], seed=9)
    with pytest.raises(UserError, match="from corpus"):
        ShardReader(store, [(made.harvest_ids[0], A), (other.harvest_ids[0], A)], batch_size=8)
    shorter = write_synthetic_harvest(
        store, made.corpus_id, "harvest-shorter", {A: (3, "float32")}, CTX * 10, CTX, CHUNK, np.random.default_rng(0)
    )  # the same corpus, fewer tokens
    with pytest.raises(UserError, match="has 8192 rows but harvest-shorter"):
        ShardReader(store, [(shorter, A), (made.harvest_ids[0], A)], batch_size=8)


def test_mismatched_states_are_user_errors(synth: tuple[Store, SyntheticStore]) -> None:
    store, made = synth
    reader = ShardReader(store, sources(made)[:1], batch_size=64, buffer_tokens=512)
    loader = make_loader(reader, num_workers=2)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    state = loader.state_dict()
    assert state["batch"] == 3 and state["num_workers"] == 2
    with pytest.raises(UserError, match="num_workers=2"):
        make_loader(ShardReader(store, sources(made)[:1], batch_size=64, buffer_tokens=512)).load_state_dict(state)
    fresh = ShardReader(store, sources(made)[:1], batch_size=64, buffer_tokens=512)
    fresh.load_state_dict(state)
    with pytest.raises(UserError, match="num_workers=2"):
        next(iter(fresh))  # read in this process, as if with num_workers=0
    with pytest.raises(UserError, match="batch_size=64 but this reader has batch_size=32"):
        ShardReader(store, sources(made)[:1], batch_size=32, buffer_tokens=512).load_state_dict(state)
    with pytest.raises(UserError, match="format"):
        fresh.load_state_dict({"epoch": 0})
    with pytest.raises(UserError, match="multiprocessing_context 'threads'"):
        make_loader(fresh, num_workers=2, multiprocessing_context="threads")
    with pytest.raises(UserError, match="num_workers=-1"):
        make_loader(fresh, num_workers=-1)
