"""`actstore serve`: the pipeline as a deployment on a short interval schedule, served against the session's
real Prefect server. It runs at least twice; the second run finds the first run's outputs (the store's
manifests are untouched) and Prefect records its shard tasks as Cached."""

import os
import signal
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort

from actstore.flows.cli.main import main
from actstore.schemas.manifest import MANIFEST_NAME
from tests.helpers import cli_popen, tiny_pipeline


def _runs(deployment: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            sort=FlowRunSort.START_TIME_ASC,
        )


def _shard_states(parent: FlowRun) -> dict[str, set[str]]:
    with get_client(sync_client=True) as client:
        (steps,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[steps.id]))
        )
    states: dict[str, set[str]] = {}
    for t in tasks:
        states.setdefault(t.name.rsplit("-", 1)[0], set()).add(t.state.name if t.state else "")
    return states


def _manifests(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): p.read_text() for p in store.rglob(MANIFEST_NAME)}


def test_served_schedule_runs_twice_and_the_second_run_reuses_the_first(tmp_path: Path) -> None:
    config = tiny_pipeline(tmp_path, name="served", schedule={"interval_seconds": 20})
    server = cli_popen("serve", str(config))
    try:
        deadline = time.monotonic() + 420
        first_manifests: dict[str, str] | None = None
        while time.monotonic() < deadline:
            finished = [r for r in _runs("served") if r.state and r.state.is_final()]
            if finished and first_manifests is None:
                first_manifests = _manifests(tmp_path / "store")
            if len(finished) >= 2:
                break
            assert server.poll() is None, server.communicate()[1][-3000:]
            time.sleep(2)
        else:
            raise AssertionError(f"fewer than two finished scheduled runs in 420 s: {_runs('served')}")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.communicate(timeout=60)
    first, second = finished[:2]
    assert first.state_name == second.state_name == "Completed"
    assert second.expected_start_time > first.expected_start_time  # two scheduled runs, not one retried
    assert first_manifests and _manifests(tmp_path / "store") == first_manifests  # nothing republished
    assert _shard_states(first)["harvest-shard"] == {"Completed"}
    later = _shard_states(second)
    for name in ("prepare-harvest", "harvest-shard", "encode-shard", "evaluate"):
        assert later[name] == {"Cached"}, (name, later[name])


def test_serve_without_a_schedule_fails_naming_it(tmp_path: Path, capsys: object) -> None:
    config = tiny_pipeline(tmp_path)
    assert main(["serve", str(config)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "has no schedule" in err and "schedule: {interval_seconds" in err
