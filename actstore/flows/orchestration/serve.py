"""`actstore serve CONFIG`: the pipeline as a Prefect deployment on the config's schedule, served from here.

It connects to `$PREFECT_API_URL` or starts a Prefect server (SQLite under `$PREFECT_HOME`, or Postgres with
`--database-url`), registers the deployment and runs each scheduled flow run in a subprocess until stopped.
Runs never overlap (a run still going when the next is due makes the next wait), and each run reuses what
earlier runs stored. `infra/prefect.yaml` declares the same deployment for `prefect deploy` on a team's own
Prefect and work pool.
"""

from pathlib import Path
from typing import Any

from prefect import serve
from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from actstore.flows.orchestration.pipeline import check_pipeline, pipeline
from actstore.flows.orchestration.prefect_server import ensure_api
from actstore.schemas.errors import UserError
from actstore.schemas.pipeline import PipelineConfig, load_pipeline_config


def schedules(config: PipelineConfig, path: Path) -> list[Any]:
    if config.schedule is None:
        raise UserError(
            f'pipeline config {path} has no schedule: add `schedule: {{cron: "0 3 * * *"}}` or '
            "`schedule: {interval_seconds: 3600}`, or run it once with `actstore run`"
        )
    if config.schedule.cron is not None:
        return [Cron(config.schedule.cron, timezone=config.schedule.timezone)]
    assert config.schedule.interval_seconds is not None
    return [Interval(config.schedule.interval_seconds, timezone=config.schedule.timezone)]


def serve_pipeline(
    config_path: str,
    database_url: str | None = None,
    port: int | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> None:
    """Blocks until interrupted; the deployment is named after the config's `name`."""
    path = Path(config_path).expanduser().resolve()
    config = load_pipeline_config(path)
    check_pipeline(config)
    plan = schedules(config, path)
    url = ensure_api(database_url, port)
    parameters: dict[str, Any] = {"config_path": str(path)}
    if dask_address is not None:
        parameters["dask_address"] = dask_address
    if workers is not None:
        parameters["workers"] = workers
    # Served runs import the flow by its module path from the installed package, so they do not depend on the
    # working directory (a file path would be resolved against it).
    deployment = pipeline.to_deployment(
        name=config.name,
        entrypoint_type=EntrypointType.MODULE_PATH,
        schedules=plan,
        parameters=parameters,
        concurrency_limit=1,
        description=f"actstore pipeline {path}",
    )
    print(f"serving deployment pipeline/{config.name} on {url} ({plan[0]}); Ctrl-C stops")
    serve(deployment, limit=1, print_starting_message=False)
