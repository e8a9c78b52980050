"""A Prefect server for runs that need one: schedules (`actstore serve`) and Dask workers, which must report to
the same API as their flow (a worker in ephemeral mode would start a private server of its own, DESIGN.md).

`ensure_api` connects to `$PREFECT_API_URL` when it is set, and otherwise starts `prefect server start` on
loopback (SQLite under `$PREFECT_HOME` by default, Postgres when a database URL is given) for as long as this
process lives.
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from actstore.schemas.errors import UserError

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=3):
            return True
    except OSError:
        return False


def start_server(
    home: Path, port: int | None = None, database_url: str | None = None, host: str = "127.0.0.1"
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `prefect server start` with its state in `home`; returns the process and its API URL once healthy."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    with log.open("ab") as log_file:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
        )
    url = f"http://{host}:{port}/api"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url):
        if server.poll() is not None:
            raise UserError(f"prefect server exited (code {server.returncode}) on port {port}: see {log}")
        if time.monotonic() > deadline:
            stop_server(server)
            raise UserError(f"prefect server did not answer in {START_TIMEOUT_S} s on port {port}: see {log}")
        time.sleep(0.5)
    return server, url


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def ensure_api(database_url: str | None = None, port: int | None = None) -> str:
    """The API URL every process of this run reports to; starts (and at exit stops) a server when none is set.

    Sets `PREFECT_API_URL` in this process's environment, so Dask workers and flow-run subprocesses started
    from here inherit it."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if database_url:
            raise UserError(
                "--database-url starts a new server, but PREFECT_API_URL names one already: "
                "unset PREFECT_API_URL or drop --database-url"
            )
        if not healthy(url):
            raise UserError(
                f"PREFECT_API_URL={url} does not answer: start that server "
                "(prefect server start) or unset PREFECT_API_URL to start one here"
            )
        return url
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    server, url = start_server(home, port, database_url)
    atexit.register(stop_server, server)
    os.environ["PREFECT_API_URL"] = url
    _reload_prefect_settings()
    return url


def _reload_prefect_settings() -> None:
    """Prefect reads its settings once at import: make the new API URL current in this process too, for the
    rest of its life."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _settings.append(temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}))
    _settings[-1].__enter__()


_settings: list[Any] = []
