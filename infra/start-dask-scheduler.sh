#!/usr/bin/env bash
# Start the Dask scheduler that the pipeline's flow submits its tasks to (`actstore run --dask tcp://HOST:8786`).
#
#   infra/start-dask-scheduler.sh [dask scheduler options...]
#
# It listens on all interfaces (DASK_SCHEDULER_HOST to narrow that), port DASK_SCHEDULER_PORT (8786), with its
# dashboard on DASK_DASHBOARD_PORT (8787) when bokeh is installed. The scheduler runs no task and no Prefect
# code: only the workers and the flow need PREFECT_API_URL.
set -euo pipefail

die() {
    echo "start-dask-scheduler: $*" >&2
    exit 2
}

command -v dask >/dev/null ||
    die "dask is not on PATH: activate the environment actstore is installed in (pip install -c constraints.txt -e .)"

port="${DASK_SCHEDULER_PORT:-8786}"
echo "start-dask-scheduler: workers and flows connect to tcp://$HOSTNAME:$port" >&2
exec dask scheduler --host "${DASK_SCHEDULER_HOST:-0.0.0.0}" --port "$port" \
    --dashboard-address ":${DASK_DASHBOARD_PORT:-8787}" "$@"
