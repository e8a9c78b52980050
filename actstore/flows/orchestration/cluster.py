"""Where a pipeline's shard tasks run: in the flow's own process, or on a Dask cluster through prefect-dask.

A step is cut into shards of whole chunks (`shard_ranges`); `run_shards` submits them, updates a Prefect
progress artifact as they finish, and then asks the store which chunks are still missing: a shard lost with
a killed worker is run again until every chunk is durable or the passes run out. The store, not Prefect's
cache, says what is done: a shard whose chunks are missing runs with the cache refreshed, so a cached result
never stands in for deleted files. Chunks are written atomically and marked done, so a
chunk is never stored twice and the result does not depend on which worker ran what.
"""

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from prefect import Task, tags
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from actstore.schemas.errors import UserError

SHARDS_PER_WORKER = 4
"""Default shards per worker and step: enough to balance uneven workers, few enough to keep task overhead low."""
RECOVERY_PASSES = 2
"""Extra passes over chunks still missing after all shards finished (lost workers, deleted files)."""


class Cluster(NamedTuple):
    """How shard tasks run: `address` of a Dask scheduler, a local Dask cluster of `workers` processes, or
    neither (every task in the flow's process, one after another)."""

    address: str | None = None
    local_workers: int | None = None
    workers: int = 1
    """Worker processes that run shards (1 without Dask)."""
    gpus: int = 0
    """Workers that offer a `GPU` resource (`dask worker --resources GPU=1`, one per GPU)."""

    @property
    def distributed(self) -> bool:
        return self.address is not None or self.local_workers is not None

    def task_runner(self) -> TaskRunner[Any] | None:
        """prefect-dask's runner for this cluster; None keeps Prefect's default (tasks here run inline)."""
        if not self.distributed:
            return None
        from prefect_dask import DaskTaskRunner

        if self.address is not None:
            return DaskTaskRunner(address=self.address)
        without_malloc_trim()
        # one thread per worker process: hooks live on each worker's one cached model (see harvest.MODEL_LOCK)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": self.local_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )


def without_malloc_trim() -> None:
    """Start local workers without the `MALLOC_TRIM_THRESHOLD_=65536` Dask's nanny puts in their environment:
    with it, glibc returns freed memory at once and maps it again for the next batch, and the same forward ran
    25 % slower in a worker than in this process (2,172 against 2,908 tokens/s here; 2,843 without it).
    `infra/start-dask-workers.sh` does the same for workers started by hand."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})  # None unsets it


def connect(address: str | None, workers: int | None) -> Cluster:
    """Check the cluster settings before any work: a scheduler that does not answer is a one-line error."""
    if address is not None and workers is not None:
        raise UserError("--dask ADDRESS and --workers N both given: use an existing cluster or start a local one")
    if workers is not None:
        return Cluster(local_workers=workers, workers=workers)
    if address is None:
        return Cluster()
    from distributed import Client

    try:
        with Client(address, timeout=15) as client:
            workers = client.scheduler_info()["workers"].values()
            count = len(workers)
            gpus = sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) > 0)
    except (OSError, TimeoutError) as err:
        raise UserError(
            f"dask scheduler {address} does not answer ({type(err).__name__}): start it "
            "(infra/start-dask-scheduler.sh) or fix --dask / run.dask_address"
        ) from None
    if count == 0:
        raise UserError(f"dask scheduler {address} has no workers: start some (infra/start-dask-workers.sh)")
    return Cluster(address=address, workers=count, gpus=gpus)


def shard_ranges(n_chunks: int, cluster: Cluster, shard_chunks: int | None) -> list[tuple[int, ...]]:
    """Contiguous runs of chunk indices, one per task; one shard of everything without Dask."""
    if not cluster.distributed:
        per = shard_chunks or n_chunks
    else:
        per = shard_chunks or max(1, math.ceil(n_chunks / (SHARDS_PER_WORKER * cluster.workers)))
    per = max(per, 1)
    return [tuple(range(start, min(start + per, n_chunks))) for start in range(0, n_chunks, per)]


def uses_gpu(device: str, cluster: Cluster) -> bool:
    """Whether model tasks will run on cuda: said so, or `auto` where the workers (or this process) have GPUs."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    if cluster.distributed:
        return cluster.gpus > 0
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def on_model_device(device: str, cluster: Cluster) -> Iterator[None]:
    """Tasks that run a model on cuda are tagged `gpu` (the Prefect concurrency limit) and, on a cluster whose
    workers offer `GPU` resources, ask Dask for one, so each GPU worker runs one such task at a time."""
    if not uses_gpu(device, cluster):
        yield
        return
    import dask

    resources = {"GPU": 1} if cluster.gpus > 0 else {}
    with tags("gpu"), dask.annotate(resources=resources):
        yield


def run_shards(
    task: Task[..., dict[str, Any]],
    args: Sequence[tuple[Any, ...]],
    cluster: Cluster,
    device: str,
    missing: Callable[[tuple[int, ...]], tuple[int, ...]],
    what: str,
) -> list[dict[str, Any]]:
    """Run one task per shard (the last argument of each `args` tuple is its chunks) and return their stats.

    `missing(chunks)` asks the store which of a shard's chunks are not yet durable."""
    total = sum(len(a[-1]) for a in args)
    progress = create_progress_artifact(progress=0.0, description=f"{what}: chunks done of {total}")
    results: list[dict[str, Any]] = []
    todo = list(args)
    for _ in range(RECOVERY_PASSES + 1):
        failures = _run_pass(task, todo, cluster, device, results, progress, total, missing, what)
        todo = [(*a[:-1], left) for a in todo if (left := missing(a[-1]))]
        if not todo:
            return results
        user_errors = [f for f in failures if isinstance(f, UserError)]
        if user_errors:
            raise user_errors[0]
    chunks = sorted(c for a in todo for c in a[-1])
    raise UserError(
        f"{what}: chunks {chunks[:8]} still missing after {RECOVERY_PASSES + 1} passes "
        f"(last error: {failures[-1] if failures else 'none'}): re-run to resume"
    )


def _run_pass(
    task: Task[..., dict[str, Any]],
    todo: list[tuple[Any, ...]],
    cluster: Cluster,
    device: str,
    results: list[dict[str, Any]],
    progress: Any,
    total: int,
    missing: Callable[[tuple[int, ...]], tuple[int, ...]],
    what: str,
) -> list[BaseException]:
    failures: list[BaseException] = []
    left = [missing(args[-1]) for args in todo]  # asked once per pass: each shard that returns has written these
    done = total - sum(map(len, left))

    def record(shard: int, result: dict[str, Any]) -> None:
        nonlocal done
        results.append(result)
        done += len(left[shard])
        update_progress_artifact(progress, 100.0 * done / max(total, 1), description=f"{what}: {done} of {total}")

    def runner(shard: int) -> Task[..., dict[str, Any]]:
        """A shard whose chunks the store lacks runs even if Prefect has a cached result for it (its files were
        deleted since); a complete one may come from the cache."""
        return task.with_options(refresh_cache=True) if left[shard] else task

    if not cluster.distributed:
        with on_model_device(device, cluster):
            for shard, args in enumerate(todo):  # inline: one shard after another, exceptions as they come
                record(shard, runner(shard)(*args))
        return failures
    with on_model_device(device, cluster):
        futures = [runner(shard).submit(*args) for shard, args in enumerate(todo)]
    shard_of = {id(future): shard for shard, future in enumerate(futures)}
    for future in as_completed(futures):
        try:
            record(shard_of[id(future)], future.result())
        except Exception as err:  # a lost worker or a failed shard: the store says what is missing
            failures.append(err)
    return failures
