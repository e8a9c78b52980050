"""Harvest: token windows -> model -> one Zarr array per site (+ loss, gradients), resumable exactly-once.

The story: `plan_harvest` sizes the job from the corpus manifest (no model needed), `harvest_chunks` runs the
model over every chunk not yet marked done while a writer thread stores the previous batches, and
`publish_harvest` writes the manifest once every chunk is durable.
"""

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.flows.directions import intervention_replacements
from actstore.flows.runtime import MODEL_LOCK, cached_model, flow, model_loads, run_figures, task
from actstore.flows.writer_thread import BackgroundWriter
from actstore.schemas.arrays import ActivationAttrs
from actstore.schemas.errors import UserError
from actstore.schemas.harvest import (
    DEFAULT_CHUNK_TOKENS,
    HarvestConfig,
    HarvestRuntime,
    gradient_array,
)
from actstore.schemas.manifest import Manifest
from actstore.store.activations import LOSS_SITE, SHARD_LOCKS, ArraySpec, HarvestArrays, disk_bytes, done_chunks
from actstore.store.files import explain_os_error, object_lock, remove_temp_files
from actstore.store.root import Store
from actstore.store.tokens import read_windows
from actstore.transforms.capture import Capture, CaptureResult, first_nonfinite
from actstore.transforms.gradients import GradientCapture, GradientResult, check_logit_diff_tokens
from actstore.transforms.models import max_context, model_dtype_name, pick_device
from actstore.transforms.sites import SiteSpec, resolve_sites
from actstore.transforms.splice import Splice


class HarvestPlan(NamedTuple):
    """The shape of a harvest, known before any model is loaded."""

    harvest_id: str
    corpus_id: str
    ctx_len: int
    n_seqs: int
    """Windows harvested."""
    batch_windows: int
    """Windows per forward batch = per chunk."""

    @property
    def n_tokens(self) -> int:
        return self.n_seqs * self.ctx_len

    @property
    def chunk_tokens(self) -> int:
        return self.batch_windows * self.ctx_len

    @property
    def n_chunks(self) -> int:
        return -(-self.n_seqs // self.batch_windows)


@task(name="plan-harvest")
def plan_harvest(store_root: str, config: HarvestConfig) -> HarvestPlan:
    """Size the harvest from the corpus manifest; fails fast on a missing or empty corpus."""
    corpus = Store(store_root).manifest("corpus", config.corpus_id)
    ctx_len = int(corpus.extra["ctx_len"])
    n_seqs = int(corpus.counts["n_seqs"])
    if config.max_tokens is not None:
        n_seqs = min(n_seqs, config.max_tokens // ctx_len)
    if n_seqs == 0:
        raise UserError(
            f"corpus {config.corpus_id} gives no full window of {ctx_len} tokens to harvest: "
            "raise --max-tokens or ingest more text"
        )
    batch_windows = config.batch_windows or max(1, DEFAULT_CHUNK_TOKENS // ctx_len)
    return HarvestPlan(config.harvest_id(), config.corpus_id, ctx_len, n_seqs, min(batch_windows, n_seqs))


def check_model_fits(model: torch.nn.Module, plan: HarvestPlan, vocab_needed: int, config: HarvestConfig) -> None:
    """Refuse windows longer than the model's context or token ids beyond its vocabulary."""
    limit = max_context(model)
    if limit is not None and plan.ctx_len > limit:
        raise UserError(
            f"ctx_len {plan.ctx_len} of corpus {plan.corpus_id} exceeds the {limit} positions of model "
            f"{config.model.name}: ingest with --ctx-len {limit} or less"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if vocab_needed > vocab:
        raise UserError(
            f"corpus {plan.corpus_id} has token ids up to {vocab_needed - 1} but model {config.model.name} has "
            f"{vocab} embeddings: ingest the corpus with this model's tokenizer (--model {config.model.name})"
        )
    if config.logit_diff_tokens is not None:
        check_logit_diff_tokens(model, config.logit_diff_tokens)


def array_specs(plan: HarvestPlan, config: HarvestConfig, sites: list[SiteSpec], model_dtype: str) -> list[ArraySpec]:
    logical = model_dtype if config.store_dtype == "model" else config.store_dtype
    common = {
        "harvest_id": plan.harvest_id,
        "corpus_id": plan.corpus_id,
        "model": config.model.label(),
        "n_tokens": plan.n_tokens,
        "ctx_len": plan.ctx_len,
        "chunk_tokens": plan.chunk_tokens,
    }
    specs = [
        ArraySpec(ActivationAttrs(site=s.name, module=s.module, logical_dtype=logical, d=s.d, **common)) for s in sites
    ]
    if config.loss:
        loss_attrs = ActivationAttrs(site=LOSS_SITE, module="lm_head", logical_dtype="float32", d=1, **common)
        specs.append(ArraySpec(loss_attrs, squeeze=True))
    if config.gradient_metric is not None:  # float32 whatever the store dtype: float16 flushes small gradients
        specs += [
            ArraySpec(
                ActivationAttrs(site=gradient_array(s.name), module=s.module, logical_dtype="float32", d=s.d, **common)
            )
            for s in sites
        ]
    return specs


class HarvestSetup(NamedTuple):
    """What every harvest task needs before it touches a chunk: the checked model, its sites and arrays."""

    model: torch.nn.Module
    sites: list[SiteSpec]
    specs: list[ArraySpec]
    targets: list[SiteSpec]
    """Sites an intervention replaces."""
    replacements: dict[str, Any]
    device: torch.device
    load_seconds: float


def setup_harvest(store: Store, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan) -> HarvestSetup:
    """Load (or reuse) the model and check it against the corpus before anything is written."""
    corpus = store.manifest("corpus", plan.corpus_id)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device = pick_device(runtime.device)
    load_start = time.perf_counter()
    model = cached_model(config.model, str(device))
    load_seconds = time.perf_counter() - load_start
    sites = resolve_sites(model, list(config.sites))
    check_model_fits(model, plan, int(corpus.counts.get("max_token_id", -1)) + 1, config)
    specs = array_specs(plan, config, sites, model_dtype_name(model))
    targets = resolve_sites(model, sorted({s for i in config.interventions for s in i.sites}))
    replacements = intervention_replacements(store, config.interventions, {t.name: t.d for t in targets})
    return HarvestSetup(model, sites, specs, targets, replacements, device, load_seconds)


def _arrays_info(specs: list[ArraySpec]) -> dict[str, dict[str, Any]]:
    return {s.attrs.site: {"d": s.attrs.d, "dtype": s.attrs.logical_dtype, "module": s.attrs.module} for s in specs}


@contextlib.contextmanager
def _locked_arrays(
    store_root: str, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan, shard: tuple[int, ...] | None
) -> Iterator[tuple[Store, HarvestSetup, HarvestArrays]]:
    """The checked model and the harvest's arrays, under a lock: the whole harvest's (its arrays created and the
    temp files of killed writes cleared), or one shard's (arrays created before, by `prepare_arrays`)."""
    store = Store(store_root)
    setup = setup_harvest(store, config, runtime, plan)
    directory = store.harvest_dir(plan.harvest_id)
    lock = directory if shard is None else directory / SHARD_LOCKS / f"{shard[0]:08d}-{shard[-1]:08d}"
    try:
        with object_lock(lock):
            arrays = HarvestArrays(directory, setup.specs, plan.n_tokens, plan.chunk_tokens, create=shard is None)
            if shard is None:
                remove_temp_files(directory)
            yield store, setup, arrays
    except OSError as exc:
        raise explain_os_error(exc, directory) from exc


def _run_setup(
    setup: HarvestSetup,
    arrays: HarvestArrays,
    chunks: Iterable[int],
    store: Store,
    config: HarvestConfig,
    runtime: HarvestRuntime,
    plan: HarvestPlan,
) -> dict[str, Any]:
    """Run those of `chunks` not yet done with the interventions spliced in; the splice is hooked before the
    capture, so the stored activations are the intervened ones."""
    done = arrays.done_chunks()
    todo = [c for c in chunks if c not in done]
    with MODEL_LOCK, Splice(setup.model, setup.targets) as splice:
        splice.set(setup.replacements)
        stats = _run_chunks(
            setup.model,
            setup.sites,
            arrays,
            store.corpus_dir(plan.corpus_id),
            config,
            runtime,
            plan,
            setup.device,
            todo,
        )
    return {
        "load_seconds": round(setup.load_seconds, 3),
        **stats,
        "device": str(setup.device),
        "arrays": _arrays_info(setup.specs),
        "pid": os.getpid(),
        "model_loads": model_loads(),
    }


@task(name="harvest-chunks")
def harvest_chunks(
    store_root: str, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan
) -> dict[str, Any]:
    """Run the model over every chunk not yet done; returns timing and size figures of this run.

    The model, sites and context length are checked before anything is written, so bad input leaves the
    store as it was; the object lock then keeps a second run of the same config out.
    """
    with _locked_arrays(store_root, config, runtime, plan, None) as (store, setup, arrays):
        return _run_setup(setup, arrays, range(plan.n_chunks), store, config, runtime, plan)


def prepare_arrays(
    store_root: str, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan
) -> dict[str, Any]:
    """Create the pre-sized arrays once, before shard tasks write into them (two creators would race), and
    clear the temp files of killed writes; returns the arrays' description for the manifest."""
    with _locked_arrays(store_root, config, runtime, plan, None) as (_, setup, _):
        return _arrays_info(setup.specs)


def harvest_shard(
    store_root: str, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan, chunks: tuple[int, ...]
) -> dict[str, Any]:
    """Run the chunks of one shard that are not yet done, into arrays `prepare_arrays` created.

    Shards hold disjoint chunks and each chunk is marked done only after its data is durable, so shards may
    run on any worker, in any order, be killed and re-run: every chunk ends up written by exactly one
    completed write, bit-identical to a single-process harvest run with the same threads."""
    with _locked_arrays(store_root, config, runtime, plan, chunks) as (store, setup, arrays):
        return _run_setup(setup, arrays, chunks, store, config, runtime, plan)


def _run_chunks(
    model: torch.nn.Module,
    sites: list[SiteSpec],
    arrays: HarvestArrays,
    corpus_dir: Path,
    config: HarvestConfig,
    runtime: HarvestRuntime,
    plan: HarvestPlan,
    device: torch.device,
    todo: list[int],
) -> dict[str, Any]:
    """The loop: read windows, forward with hooks, hand the batch to the writer thread, next."""

    def write(item: tuple[int, dict[str, torch.Tensor]]) -> None:
        arrays.write_chunk(*item)

    run_start = time.perf_counter()
    tokens_done = 0
    todo_tokens = sum(r.stop - r.start for r in map(arrays.chunk_rows, todo))
    bar = tqdm(
        total=plan.n_tokens,
        initial=plan.n_tokens - todo_tokens,
        unit="tok",
        unit_scale=True,
        desc=plan.harvest_id,
        disable=not runtime.progress,
    )
    capture = (
        Capture(model, sites, loss=config.loss)
        if config.gradient_metric is None
        else GradientCapture(model, sites, config.gradient_metric, config.logit_diff_tokens)
    )
    with capture, BackgroundWriter(write, runtime.queue_chunks) as writer:
        for chunk in todo:
            rows = arrays.chunk_rows(chunk)
            windows = read_windows(corpus_dir, rows.start // plan.ctx_len, rows.stop // plan.ctx_len, plan.ctx_len)
            ids = torch.from_numpy(windows.astype(np.int64)).to(device)
            result = capture(ids)
            grads = (
                {gradient_array(s): g for s, g in result.grads.items()} if isinstance(result, GradientResult) else {}
            )
            bad = first_nonfinite(CaptureResult({**result.acts, **grads}, None))
            if bad is not None:
                site, row = bad
                raise UserError(
                    f"non-finite activations at {site}, tok {rows.start + row} (chunk {chunk}) of model "
                    f"{config.model.name} in {model_dtype_name(model)}: harvest in float32 or bfloat16 "
                    "(--model-dtype); finished chunks are kept"
                )
            values: dict[str, torch.Tensor] = {**result.acts, **grads}
            if result.loss is not None:
                values[LOSS_SITE] = result.loss
            writer.submit((chunk, values))
            tokens_done += rows.stop - rows.start
            bar.update(rows.stop - rows.start)
    bar.close()
    seconds = time.perf_counter() - run_start
    return {
        **run_figures(tokens_done, seconds),
        "writer_busy_seconds": round(writer.busy_seconds, 3),
    }


def harvest_counts(plan: HarvestPlan, directory: Path) -> dict[str, int]:
    """The counts of a finished harvest's manifest (the synthetic sets' too)."""
    missing = sorted(set(range(plan.n_chunks)) - done_chunks(directory))
    if missing:
        raise UserError(f"harvest {plan.harvest_id} still misses chunks {missing[:5]}: re-run to resume")
    return {
        "n_tokens": plan.n_tokens,
        "n_seqs": plan.n_seqs,
        "n_chunks": plan.n_chunks,
        "chunk_tokens": plan.chunk_tokens,
        "bytes": disk_bytes(directory),
    }


def numeric(stats: dict[str, Any]) -> dict[str, float]:
    """The figures of a run's stats that go into a manifest's timings."""
    return {k: v for k, v in stats.items() if isinstance(v, float | int)}


@task(name="publish-harvest")
def publish_harvest(store_root: str, config: HarvestConfig, plan: HarvestPlan, stats: dict[str, Any]) -> Manifest:
    """Write the manifest once every chunk is durable: from then on the harvest is readable."""
    with Store(store_root).object("harvest", plan.harvest_id).publish(config, staged=False) as pub:
        pub.counts = harvest_counts(plan, pub.directory)
        pub.timings = numeric(stats)
        pub.extra = {
            "arrays": stats["arrays"],
            "corpus_id": plan.corpus_id,
            "ctx_len": plan.ctx_len,
            "device": stats["device"],
        }
    return pub.manifest


@flow(name="harvest")
def harvest(store_root: str, config: HarvestConfig, runtime: HarvestRuntime | None = None) -> Manifest:
    """Corpus + model + sites -> activation arrays; re-running resumes and never duplicates a chunk."""
    runtime = runtime or HarvestRuntime()
    existing = Store(store_root).published("harvest", config.harvest_id())
    if existing is not None:
        return existing
    plan = plan_harvest(store_root, config)
    stats = harvest_chunks(store_root, config, runtime, plan)
    return publish_harvest(store_root, config, plan, stats)
