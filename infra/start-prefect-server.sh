#!/usr/bin/env bash
# Start the Prefect server that the pipeline's flows, Prefect workers and Dask workers all report to.
#
#   PREFECT_API_URL=http://HEAD:4200/api infra/start-prefect-server.sh [prefect server start options...]
#
# PREFECT_API_URL is the address every client uses, the same value on every machine; the server listens on its
# port on all interfaces (PREFECT_SERVER_API_HOST to narrow that) and its UI calls the API there. The database
# is SQLite under PREFECT_HOME unless PREFECT_API_DATABASE_CONNECTION_URL names one, e.g.
# postgresql+asyncpg://prefect:PASSWORD@DBHOST:5432/prefect for several workers and long schedules.
set -euo pipefail

die() {
    echo "start-prefect-server: $*" >&2
    exit 2
}

[[ -n "${PREFECT_API_URL:-}" ]] ||
    die "PREFECT_API_URL is unset: export the address clients will use, e.g. PREFECT_API_URL=http://$HOSTNAME:4200/api"
url_pattern='^https?://(\[[0-9A-Fa-f:.]+\]|[^]/:[]+)(:([0-9]+))?/api/?$'
[[ "$PREFECT_API_URL" =~ $url_pattern ]] ||
    die "PREFECT_API_URL=$PREFECT_API_URL is not http://HOST:PORT/api: clients reach the API under /api"
port="${BASH_REMATCH[3]:-${PREFECT_SERVER_API_PORT:-4200}}"
command -v prefect >/dev/null ||
    die "prefect is not on PATH: activate the environment actstore is installed in (pip install -c constraints.txt -e .)"

database="SQLite in ${PREFECT_HOME:-$HOME/.prefect}"
if [[ -n "${PREFECT_API_DATABASE_CONNECTION_URL:-}" ]]; then
    # Shown without the user and password.
    database_host="${PREFECT_API_DATABASE_CONNECTION_URL#*://}"
    database="${PREFECT_API_DATABASE_CONNECTION_URL%%://*}://${database_host##*@}"
fi
echo "start-prefect-server: serving $PREFECT_API_URL on port $port, database $database" >&2

export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec prefect server start --host "${PREFECT_SERVER_API_HOST:-0.0.0.0}" --port "$port" "$@"
