"""`actstore run CONFIG`: the whole job from one config file, as one Prefect flow.

The story: load and check the config (model, sites, cluster) before anything is written, then ingest ->
harvest -> train -> encode -> eval -> dashboard, each step returning its stored object when one with the same
id exists. Harvest and encode are cut into shards of whole chunks that run on Dask workers when `--dask` or
`--workers` is given (the evaluation runs on a worker too); every shard task is cached by Prefect under the
content id of what it writes, so a re-run shows finished shards as Cached and does no work. The flow ends with
a markdown summary and a table of the headline numbers as Prefect artifacts.
"""

import functools
import os
import time
from pathlib import Path
from typing import Any

import torch
from prefect import Task, task
from prefect.context import TaskRunContext
from prefect.settings import get_current_settings
from transformers import AutoModelForCausalLM

from actstore.flows.dashboard.flow import RECORD_NAME, dashboard, default_site_dir
from actstore.flows.encode import encode_shard, finish_features, prepare_encode
from actstore.flows.eval import evaluate_sae
from actstore.flows.harvest import HarvestPlan, harvest_shard, plan_harvest, prepare_arrays, publish_harvest
from actstore.flows.ingest import ingest
from actstore.flows.orchestration.cluster import Cluster, connect, on_model_device, run_shards, shard_ranges
from actstore.flows.orchestration.report import report
from actstore.flows.runtime import flow, run_figures
from actstore.flows.train import train
from actstore.schemas.encode import EncodeConfig, EncodeRuntime
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.ids import content_hash
from actstore.schemas.manifest import Manifest
from actstore.schemas.model import ModelConfig
from actstore.schemas.pipeline import PipelineConfig, RunSettings, load_pipeline_config, resolve_store
from actstore.schemas.train_run import TrainRun
from actstore.store.activations import done_chunks
from actstore.store.features import stored_chunks
from actstore.store.files import read_manifest
from actstore.store.root import Store
from actstore.transforms.models import load_model_config
from actstore.transforms.sites import resolve_sites


def check_pipeline(config: PipelineConfig) -> None:
    """Fail before any work on what can be checked without weights: the model must resolve and the sites must
    exist in its architecture (built on the meta device, no memory)."""
    _check_model_and_sites(config.model, config.harvest.sites)


@functools.lru_cache(maxsize=8)
def _check_model_and_sites(model: ModelConfig, sites: tuple[str, ...]) -> None:
    """Cached: `actstore run` checks before starting Prefect and the flow checks again in the same process
    (~3 s for a GGUF file's metadata); a failed check is not cached."""
    try:
        model_config = load_model_config(model)
    except UserError as err:
        raise UserError(f"model.name {model.name!r}: {err}") from None
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model.trust_remote_code)
    try:
        resolve_sites(net, list(sites))
    except UserError as err:
        raise UserError(f"harvest.sites: {err}") from None


def _transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Retry lost workers and flaky disks, never bad input: a UserError fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


def _shard_key(kind: str) -> Any:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        """`<kind>-<store>-<object id>-<first chunk>-<last chunk>`: what the shard writes, wherever it runs."""
        target = parameters.get("plan") or parameters["config"]
        object_id = target.harvest_id if isinstance(target, HarvestPlan) else f"{target.sae_id}-{target.harvest_id}"
        chunks = parameters["chunks"]
        return f"{kind}-{content_hash(parameters['store_root'])}-{object_id}-{chunks[0]}-{chunks[-1]}"

    return key


def _object_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    config = parameters["config"]
    object_id = config.eval_id() if isinstance(config, EvalConfig) else config.harvest_id()
    return f"{context.task.name}-{content_hash(parameters['store_root'])}-{object_id}"


CACHED = {"persist_result": True, "result_serializer": "json", "retry_condition_fn": _transient}


@task(name="prepare-harvest", cache_key_fn=_object_key, **CACHED)
def prepare_harvest(
    store_root: str, config: HarvestConfig, runtime: HarvestRuntime, plan: HarvestPlan
) -> dict[str, Any]:
    """The arrays' description; creates them (on a worker, which keeps the model for its shards) unless the
    harvest is already published."""
    existing = Store(store_root).published("harvest", plan.harvest_id)
    if existing is not None:
        return dict(existing.extra["arrays"])
    return prepare_arrays(store_root, config, runtime, plan)


harvest_shard_task = task(harvest_shard, name="harvest-shard", cache_key_fn=_shard_key("harvest"), **CACHED)
encode_shard_task = task(encode_shard, name="encode-shard", cache_key_fn=_shard_key("encode"), **CACHED)


@task(name="evaluate", cache_key_fn=_object_key, **CACHED)
def evaluate_task(store_root: str, config: EvalConfig, runtime: EvalRuntime) -> Manifest:
    """One evaluation (a single streaming pass: its float64 sums are not split across workers)."""
    existing = Store(store_root).published("eval", config.eval_id())
    return existing if existing is not None else evaluate_sae.fn(store_root, config, runtime)


def _with_retries(t: Task[..., Any], run: RunSettings) -> Task[..., Any]:
    return t.with_options(retries=run.retries, retry_delay_seconds=run.retry_delay_seconds)


def _one(
    t: Task[..., Any], args: tuple[Any, ...], cluster: Cluster, device: str, run: RunSettings, stored: bool
) -> Any:
    """One task on the cluster (a worker that has the model), or inline; its cached result is used only while
    its output is `stored`."""
    t = _with_retries(t, run).with_options(refresh_cache=not stored)
    with on_model_device(device, cluster):
        return t(*args) if not cluster.distributed else t.submit(*args).result()


def merged_stats(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One step's figures from its shards: tokens/s over the step's wall time, the workers that ran it and the
    models they loaded (1 per worker process when each loads it once)."""
    tokens = sum(r.get("tokens_this_run", 0) for r in results)
    loads: dict[int, int] = {}
    for r in results:
        if "pid" in r:
            loads[r["pid"]] = max(loads.get(r["pid"], 0), r.get("model_loads", 0))
    return {
        **run_figures(tokens, seconds),
        "shards": len(results),
        "worker_processes": len(loads),
        "model_loads": sum(loads.values()),
    }


def task_threads(run: RunSettings, cluster: Cluster) -> int | None:
    """torch threads of each task: as configured, else the cores shared out among a local cluster's workers
    (Dask starts them with 1), else torch's default. Results are bit-identical across runs with equal threads."""
    if run.threads is not None or cluster.local_workers is None:
        return run.threads
    return max(1, (os.cpu_count() or 1) // cluster.local_workers)


def harvest_step(store_root: str, config: HarvestConfig, run: RunSettings, cluster: Cluster) -> Manifest:
    runtime = HarvestRuntime(
        device=run.device, threads=task_threads(run, cluster), progress=run.progress and not cluster.distributed
    )
    plan = plan_harvest(store_root, config)
    directory = Store(store_root).harvest_dir(plan.harvest_id)
    arrays = _one(
        prepare_harvest,
        (store_root, config, runtime, plan),
        cluster,
        run.device,
        run,
        stored=read_manifest(directory) is not None or any(directory.glob("*.zarr/zarr.json")),
    )

    def missing(chunks: tuple[int, ...]) -> tuple[int, ...]:
        if read_manifest(directory) is not None:
            return ()
        done = done_chunks(directory)
        return tuple(c for c in chunks if c not in done)

    start = time.perf_counter()
    shards = [(store_root, config, runtime, plan, s) for s in shard_ranges(plan.n_chunks, cluster, run.shard_chunks)]
    results = run_shards(
        _with_retries(harvest_shard_task, run), shards, cluster, run.device, missing, f"harvest {plan.harvest_id}"
    )
    existing = Store(store_root).published("harvest", plan.harvest_id)
    if existing is not None:
        return existing
    devices = {r["device"] for r in results if "device" in r}
    stats = {
        **merged_stats(results, time.perf_counter() - start),
        "arrays": arrays,
        "device": ",".join(sorted(devices)) or run.device,
    }
    return publish_harvest(store_root, config, plan, stats)


def encode_step(store_root: str, config: EncodeConfig, run: RunSettings, cluster: Cluster) -> Manifest:
    store = Store(store_root)
    directory = store.features_dir(config.sae_id, config.harvest_id)
    acts = store.activations(config.harvest_id, config.site)
    runtime = EncodeRuntime(
        device=run.device, threads=task_threads(run, cluster), progress=run.progress and not cluster.distributed
    )
    n_chunks = -(-len(acts) // acts.chunk_tokens)

    def missing(chunks: tuple[int, ...]) -> tuple[int, ...]:
        if read_manifest(directory) is not None:
            return ()
        stored = stored_chunks(directory)
        return tuple(c for c in chunks if c not in stored)

    start = time.perf_counter()
    shards = [(store_root, config, runtime, s) for s in shard_ranges(n_chunks, cluster, run.shard_chunks)]
    results = run_shards(
        _with_retries(encode_shard_task, run), shards, cluster, run.device, missing, f"encode {config.sae_id}"
    )
    existing = store.published("features", f"{config.sae_id}/{config.harvest_id}")
    if existing is not None:
        return existing
    return finish_features(store_root, config, merged_stats(results, time.perf_counter() - start))


@flow(name="pipeline-steps")
def run_steps(config: PipelineConfig, store_root: str, cluster: Cluster) -> dict[str, Any]:
    """The steps in order; the task runner (inline or Dask) is chosen by `pipeline` before this starts."""
    run = config.run
    if run.threads:
        torch.set_num_threads(run.threads)
    corpus = ingest(store_root, config.corpus)
    harvest_config = HarvestConfig(
        corpus_id=corpus.id,
        model=config.model,
        sites=config.harvest.sites,
        loss=config.harvest.loss,
        store_dtype=config.harvest.store_dtype,
        batch_windows=config.harvest.batch_windows,
        max_tokens=config.harvest.max_tokens,
    )
    harvested = harvest_step(store_root, harvest_config, run, cluster)
    summary: dict[str, Any] = {
        "store": store_root,
        "corpus_id": corpus.id,
        "harvest_id": harvested.id,
        "n_tokens": harvested.counts["n_tokens"],
        "harvest_tokens_per_s": harvested.timings.get("tokens_per_s"),
        "saes": [],
    }
    for site in config.harvest.sites if config.train is not None else ():
        assert config.train is not None
        sae = train(
            store_root,
            TrainRun(
                harvest_id=harvested.id,
                site=site,
                train=config.train.train_config(),
                checkpoint_every=config.train.checkpoint_every,
            ),
            progress=run.progress,
        )
        entry: dict[str, Any] = {"site": site, "sae_id": sae.id}
        if config.encode is not None:
            encode_config = prepare_encode(store_root, sae.id, harvested.id, site, config.encode.value_dtype, False)
            features = encode_step(store_root, encode_config, run, cluster)
            entry.update(nnz=features.counts["nnz"], alive=features.counts["alive"])
        if config.eval is not None:
            eval_config = EvalConfig(sae_id=sae.id, harvest_id=harvested.id, site=site, **config.eval.model_dump())
            runtime = EvalRuntime(
                device=run.device, threads=task_threads(run, cluster), progress=run.progress and not cluster.distributed
            )
            stored = Store(store_root).published("eval", eval_config.eval_id()) is not None
            evaluated = _one(evaluate_task, (store_root, eval_config, runtime), cluster, run.device, run, stored)
            entry.update(eval_id=evaluated.id, eval=evaluated.extra["summary"])
        if config.dashboard is not None and config.encode is not None:
            site_dir = default_site_dir(store_root, sae.id, harvested.id)
            if not (site_dir / RECORD_NAME).is_file():
                site_dir = dashboard(
                    store_root, sae.id, harvested.id, logits=config.dashboard.logits, device=run.device
                )
            entry["dashboard"] = str(site_dir / "index.html")
        summary["saes"].append(entry)
    return summary


@flow(name="pipeline")
def pipeline(
    config_path: str, dask_address: str | None = None, workers: int | None = None, store: str | None = None
) -> dict[str, Any]:
    """Run the pipeline a config file describes; `dask_address` / `workers` override its `run` section and
    `store` its store root. Re-running the same config resumes and never repeats finished work."""
    path = Path(config_path).expanduser().resolve()
    config = load_pipeline_config(path)
    store_root = store or resolve_store(config, path)
    check_pipeline(config)
    cluster = connect(dask_address or config.run.dask_address, workers or config.run.workers)
    if cluster.address is not None and Store(store_root).remote is not None:
        raise UserError(
            f"store {store_root} is built in a local cache and published per object, which workers on "
            "other machines cannot share: use a directory every worker mounts, or --workers N"
        )
    if cluster.distributed and get_current_settings().api.url is None:
        raise UserError(
            "a Dask run needs a Prefect server its workers report to: set PREFECT_API_URL, or use "
            "`actstore run`, which starts one"
        )
    if config.run.gpu_concurrency is not None:
        set_gpu_limit(config.run.gpu_concurrency)
    runner = cluster.task_runner()
    steps = run_steps if runner is None else run_steps.with_options(task_runner=runner)
    start = time.perf_counter()
    summary = steps(config, store_root, cluster)
    summary.update(
        seconds=round(time.perf_counter() - start, 1),
        workers=cluster.workers,
        cluster=cluster.address or (f"local x{cluster.local_workers}" if cluster.distributed else "none"),
    )
    report(config, summary)
    return summary


def set_gpu_limit(limit: int) -> None:
    """Create or update the Prefect concurrency limit on tasks tagged `gpu`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=limit)


def run_pipeline(
    config_path: str, dask_address: str | None = None, workers: int | None = None, store: str | None = None
) -> dict[str, Any]:
    """`actstore run`: check the config without Prefect (fast errors), start a local Prefect server when Dask
    workers need one and none is set, then run the flow."""
    path = Path(config_path).expanduser()
    config = load_pipeline_config(path)
    check_pipeline(config)
    if (dask_address or workers or config.run.dask_address or config.run.workers) and not os.environ.get(
        "PREFECT_API_URL"
    ):
        from actstore.flows.orchestration.prefect_server import ensure_api

        ensure_api()
    return pipeline(str(path.resolve()), dask_address, workers, store)
