"""Test session setup: one real Prefect server on loopback for every flow run (in-process and subprocess).

Ephemeral mode starts a temporary server per process (~10 s); one shared server makes each CLI process in
the kill/resume tests start in ~3 s instead, and Dask workers and served deployments need a real one anyway.
"""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from actstore.flows.orchestration.prefect_server import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
_server: subprocess.Popen[bytes] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if os.environ.get("PREFECT_API_URL"):
        return
    home = tempfile.mkdtemp(prefix="actstore-prefect-")
    _server, url = start_server(Path(home))
    os.environ.update(
        PREFECT_HOME=home,
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TOKENIZERS_PARALLELISM="false",
        PREFECT_LOGGING_TO_API_ENABLED="false",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        stop_server(_server)
