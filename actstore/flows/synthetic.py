"""Synthetic: a seeded activation set of known distribution -> a corpus and a harvest, readable as real ones.

The story: `synthetic_corpus` writes the token table the set is laid out on (windows of token id 0, a window
per document, split by the same text-hash rule as real documents), `synthetic_chunks` draws every chunk not yet
marked done into one float32 array (site `synthetic`) while a writer thread stores the previous ones, and
`publish_synthetic` writes the mixture's ground truth and then the manifest, shaped as a real harvest's, so
`Store.activations`, `ShardReader`, `train` and `encode` read it unchanged.
"""

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from actstore.flows.harvest import HarvestPlan, harvest_counts, numeric
from actstore.flows.ingest import publish_corpus
from actstore.flows.runtime import flow, run_figures, task
from actstore.flows.writer_thread import BackgroundWriter
from actstore.schemas.arrays import ActivationAttrs
from actstore.schemas.manifest import Manifest
from actstore.schemas.synthetic import SYNTHETIC_SITE, SyntheticConfig
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.activations import ArraySpec, HarvestArrays, disk_bytes
from actstore.store.files import (
    atomic_write_bytes,
    explain_os_error,
    object_lock,
    remove_temp_files,
)
from actstore.store.root import Store
from actstore.transforms.packing import document_split
from actstore.transforms.synthetic import mixture_parameters, sample_chunk

GROUND_TRUTH = "ground_truth.npz"
"""The mixture's weights, means and stds, beside the arrays of a gaussian_mixture harvest."""

TABLE_WINDOWS = 8192
"""Windows per token-table batch."""


def window_text(seq: int) -> str:
    """The text standing for window `seq` in the split hash: window `seq` of every synthetic corpus lands in the
    same split, so sets of different sizes share their holdout windows."""
    return f"synthetic-window-{seq}"


def window_batches(config: SyntheticConfig) -> Iterator[pa.RecordBatch]:
    """Token table rows of the synthetic corpus: `doc` = `seq`, token id 0 everywhere."""
    ctx = config.ctx_len
    for first in range(0, config.n_seqs, TABLE_WINDOWS):
        seqs = np.arange(first, min(first + TABLE_WINDOWS, config.n_seqs), dtype=np.int64)
        codes = np.array(
            [SPLITS.index(document_split(window_text(int(s)), config.holdout_fraction)) for s in seqs], dtype=np.int8
        )
        tok = np.arange(first * ctx, (seqs[-1] + 1) * ctx, dtype=np.int64)
        seq = tok // ctx
        split = pa.DictionaryArray.from_arrays(pa.array(np.repeat(codes, ctx)), pa.array(SPLITS, pa.string()))
        columns = [
            pa.array(tok),
            pa.array(seq),
            pa.array(seq),
            pa.array((tok % ctx).astype(np.int32)),
            pa.array(np.zeros(len(tok), np.int32)),
            split,
        ]
        yield pa.RecordBatch.from_arrays(columns, schema=TOKEN_SCHEMA)


@task(name="synthetic-corpus")
def synthetic_corpus(store_root: str, config: SyntheticConfig) -> Manifest:
    """The token table of the set's layout, published atomically; shared by every set of the same shape."""
    extra = {"ctx_len": config.ctx_len, "bos_token_id": None, "vocab_size": 1}
    return publish_corpus(store_root, config.corpus_id(), config.corpus_identity(), window_batches(config), extra)


def plan_synthetic(config: SyntheticConfig) -> HarvestPlan:
    """The harvest shape of the set: a chunk is `chunk_tokens` rows, or the whole set when smaller."""
    batch_windows = min(config.chunk_tokens // config.ctx_len, config.n_seqs)
    return HarvestPlan(config.harvest_id(), config.corpus_id(), config.ctx_len, config.n_seqs, batch_windows)


def array_spec(config: SyntheticConfig, plan: HarvestPlan) -> ArraySpec:
    return ArraySpec(
        ActivationAttrs(
            harvest_id=plan.harvest_id,
            corpus_id=plan.corpus_id,
            site=SYNTHETIC_SITE,
            module=SYNTHETIC_SITE,
            model=config.model_name,
            logical_dtype="float32",
            n_tokens=plan.n_tokens,
            d=config.d,
            ctx_len=plan.ctx_len,
            chunk_tokens=plan.chunk_tokens,
        )
    )


@task(name="synthetic-chunks")
def synthetic_chunks(
    store_root: str, config: SyntheticConfig, plan: HarvestPlan, progress: bool = True
) -> dict[str, Any]:
    """Draw and store every chunk not yet done; returns this run's timing figures."""
    directory = Store(store_root).harvest_dir(plan.harvest_id)
    params = mixture_parameters(config) if config.kind == "gaussian_mixture" else None
    start = time.perf_counter()
    draw_seconds = 0.0
    try:
        with object_lock(directory):
            arrays = HarvestArrays(directory, [array_spec(config, plan)], plan.n_tokens, plan.chunk_tokens)
            remove_temp_files(directory)
            todo = [c for c in range(plan.n_chunks) if c not in arrays.done_chunks()]
            spans = [arrays.chunk_rows(c) for c in todo]
            tokens = sum(r.stop - r.start for r in spans)
            bar = tqdm(
                total=plan.n_tokens,
                initial=plan.n_tokens - tokens,
                unit="tok",
                unit_scale=True,
                desc=plan.harvest_id,
                disable=not progress,
            )

            def write(item: tuple[int, np.ndarray]) -> None:
                arrays.write_chunk(item[0], {SYNTHETIC_SITE: item[1]})

            with BackgroundWriter(write, max_pending=2) as writer:
                for chunk, rows in zip(todo, spans, strict=True):
                    tick = time.perf_counter()
                    x = sample_chunk(config, chunk, rows.stop - rows.start, params).x
                    draw_seconds += time.perf_counter() - tick
                    writer.submit((chunk, x))
                    bar.update(rows.stop - rows.start)
            bar.close()
    except OSError as exc:
        raise explain_os_error(exc, directory) from exc
    seconds = time.perf_counter() - start
    return {
        "draw_seconds": round(draw_seconds, 3),
        **run_figures(tokens, seconds),
        "writer_busy_seconds": round(writer.busy_seconds, 3),
    }


@task(name="publish-synthetic")
def publish_synthetic(store_root: str, config: SyntheticConfig, plan: HarvestPlan, stats: dict[str, Any]) -> Manifest:
    """Write the ground truth, then the manifest once every chunk is durable: from then on the set is readable."""
    with Store(store_root).object("harvest", plan.harvest_id).publish(config.identity(), staged=False) as pub:
        pub.counts = harvest_counts(plan, pub.directory)
        truth: dict[str, Any] = {"kind": config.kind}
        if config.kind == "gaussian_mixture":
            buffer = io.BytesIO()
            np.savez(buffer, **mixture_parameters(config)._asdict())
            atomic_write_bytes(pub.directory / GROUND_TRUTH, buffer.getvalue())
            truth["ground_truth"] = GROUND_TRUTH
            pub.counts["bytes"] = disk_bytes(pub.directory)
        else:
            truth["bounds"] = [-config.scale, config.scale]
        pub.timings = numeric(stats)
        pub.extra = {
            "arrays": {SYNTHETIC_SITE: {"d": config.d, "dtype": "float32", "module": SYNTHETIC_SITE}},
            "corpus_id": plan.corpus_id,
            "ctx_len": plan.ctx_len,
            "device": "cpu",
            "synthetic": truth,
        }
    return pub.manifest


@flow(name="synthetic")
def synthetic(store_root: str, config: SyntheticConfig, progress: bool = True) -> Manifest:
    """Synthetic config -> corpus + harvest of known distribution; re-running resumes and never duplicates."""
    existing = Store(store_root).published("harvest", config.harvest_id())
    if existing is not None:
        return existing
    synthetic_corpus(store_root, config)
    plan = plan_synthetic(config)
    stats = synthetic_chunks(store_root, config, plan, progress)
    return publish_synthetic(store_root, config, plan, stats)
