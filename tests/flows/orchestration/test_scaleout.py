"""Scale-out on a real Dask cluster: a scheduler and two worker processes on loopback, reporting to the
session's real Prefect server. The pipeline run through them stores exactly the bytes a single-process run
stores, and killing a worker mid-harvest still ends with every chunk written once."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from actstore.flows.orchestration.cluster import connect
from actstore.flows.orchestration.pipeline import pipeline
from actstore.flows.orchestration.prefect_server import free_port
from actstore.schemas.errors import UserError
from actstore.store.activations import PROGRESS_DIR, WRITES_LOG
from actstore.store.root import Store
from tests.helpers import stored_data, tiny_pipeline

DASK = str(Path(sys.executable).with_name("dask"))


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture()
def dask_cluster(tmp_path: Path) -> Any:
    """`dask scheduler` + two single-threaded `dask worker` processes without nannies (a killed worker stays
    dead); yields the address and the worker processes."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        _start(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            tmp_path / "scheduler.log",
        )
    ]
    procs += [
        _start(
            [
                DASK,
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--name",
                f"w{i}",
                "--local-directory",
                str(tmp_path / f"w{i}"),
            ],
            tmp_path / f"worker{i}.log",
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 90
    while True:
        try:
            if connect(address, None).workers == 2:
                break
        except UserError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"dask cluster did not start: see {tmp_path}/*.log")
        time.sleep(1)
    yield address, procs[1:]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def test_dask_run_is_bit_identical_and_survives_a_killed_worker(tmp_path: Path, dask_cluster: Any) -> None:
    address, workers = dask_cluster
    # small shards: many tasks, so the harvest lasts long enough to kill a worker in the middle of it
    config = tiny_pipeline(
        tmp_path, run={"threads": 1, "progress": False, "shard_chunks": 8, "retries": 1, "retry_delay_seconds": 0}
    )
    single = pipeline(str(config), store=str(tmp_path / "single"))

    result: dict[str, Any] = {}
    run = threading.Thread(
        target=lambda: result.update(pipeline(str(config), dask_address=address, store=str(tmp_path / "dask")))
    )
    run.start()
    harvest_dir = Store(tmp_path / "dask").harvest_dir(single["harvest_id"])
    n_chunks = Store(tmp_path / "single").manifest("harvest", single["harvest_id"]).counts["n_chunks"]
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and run.is_alive():
        done = list((harvest_dir / PROGRESS_DIR).glob("chunk-*.done"))
        if n_chunks // 5 <= len(done) < n_chunks // 2:
            writers = {int(p.read_text().split()[1]) for p in done}
            victim = next((w for w in workers if w.pid in writers), None)
        time.sleep(0.05)
    assert victim is not None, "the harvest never reached a fifth of its chunks on a worker"
    os.killpg(victim.pid, signal.SIGKILL)
    run.join(timeout=600)
    assert not run.is_alive() and result, "the Dask run did not finish after a worker was killed"

    # every chunk written exactly once: one completed write per chunk, by both workers, the killed one included
    lines = [line.split() for line in (harvest_dir / PROGRESS_DIR / WRITES_LOG).read_text().splitlines()]
    assert Counter(int(chunk) for chunk, _, _ in lines) == Counter(range(n_chunks))
    pids = {int(pid) for _, _, pid in lines}
    assert victim.pid in pids and len(pids) == 2

    manifest = Store(tmp_path / "dask").manifest("harvest", single["harvest_id"])
    assert manifest.timings["worker_processes"] >= 1
    assert result["saes"] == single["saes"] and result["workers"] == 2
    single_data, dask_data = stored_data(tmp_path / "single"), stored_data(tmp_path / "dask")
    assert any(k.startswith("activations/") for k in single_data)
    assert any(k.startswith("features/") for k in single_data)
    assert dask_data == single_data
