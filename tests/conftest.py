"""Test session setup: one real Prefect server on loopback for every flow run (in-process and subprocess).

Ephemeral mode starts a temporary server per process (~10 s); one shared server makes each CLI process in
the kill/resume tests start in ~3 s instead.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_server: subprocess.Popen[bytes] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if os.environ.get("PREFECT_API_URL"):
        return
    home = tempfile.mkdtemp(prefix="actstore-prefect-")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Path(sys.executable).with_name("prefect")
    _server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(Path(home) / "server.log", "wb"), start_new_session=True,  # noqa: SIM115 - lives as long as the server
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if _server.poll() is not None:
                raise RuntimeError(f"prefect server exited: see {home}/server.log") from None
            time.sleep(0.5)
    else:
        raise RuntimeError(f"prefect server did not start in 90 s: see {home}/server.log")
    os.environ.update(PREFECT_HOME=home, PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      TOKENIZERS_PARALLELISM="false", PREFECT_LOGGING_TO_API_ENABLED="false")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None and _server.poll() is None:
        os.killpg(_server.pid, 15)
        try:
            _server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(_server.pid, 9)
