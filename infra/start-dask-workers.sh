#!/usr/bin/env bash
# Start this machine's Dask workers for the pipeline: one single-threaded worker process per GPU, or
# ACTSTORE_CPU_WORKERS of them (default: one per core) when the machine has no GPU.
#
#   PREFECT_API_URL=http://HEAD:4200/api infra/start-dask-workers.sh [--gpu] [SCHEDULER] [-- dask worker options...]
#
# SCHEDULER defaults to $ACTSTORE_DASK (tcp://HEAD:8786). --gpu refuses to start CPU workers when no GPU is
# visible. The GPUs are the entries of CUDA_VISIBLE_DEVICES when it is set, else every GPU (or MIG instance)
# that `nvidia-smi -L` lists; each worker sees only its own through CUDA_VISIBLE_DEVICES and offers one `GPU`
# resource, which the pipeline's model tasks on cuda ask for: one model forward per GPU at a time. Each process
# gets an equal share of the machine's memory. The script runs until a worker exits, then stops the others.
#
# Task runs on a worker report to PREFECT_API_URL, which must be the server of the flow that submits them:
# without it, each worker would start a private ephemeral server and the flow would never see their states.
set -euo pipefail

die() {
    echo "start-dask-workers: $*" >&2
    exit 2
}

require_gpu=false
scheduler="${ACTSTORE_DASK:-}"
worker_options=()
while (($#)); do
    case "$1" in
        --gpu) require_gpu=true ;;
        --) shift; worker_options=("$@"); break ;;
        -*) die "unknown option $1: options for dask worker go after --" ;;
        *) scheduler="$1" ;;
    esac
    shift
done

[[ -n "${PREFECT_API_URL:-}" ]] ||
    die "PREFECT_API_URL is unset: export the flow's Prefect server address, e.g. PREFECT_API_URL=http://HEAD:4200/api"
[[ -n "$scheduler" ]] ||
    die "no scheduler address: pass tcp://HOST:8786 (see infra/start-dask-scheduler.sh) or set ACTSTORE_DASK"
command -v dask >/dev/null ||
    die "dask is not on PATH: activate the environment actstore is installed in (pip install -c constraints.txt -e .)"

# The nanny sets MALLOC_TRIM_THRESHOLD_=65536 in each worker by default; with it glibc unmaps freed memory at once
# and the model's forward ran 25 % slower than outside Dask. A None in dask's config unsets it.
export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None

# A worker pointed at a server that is not there yet would fail every task it runs: wait for it first.
wait_seconds="${ACTSTORE_WAIT_SECONDS:-60}"
deadline=$((SECONDS + wait_seconds))
until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/health", timeout=3)' \
    "$PREFECT_API_URL" 2>/dev/null; do
    ((SECONDS < deadline)) ||
        die "PREFECT_API_URL=$PREFECT_API_URL did not answer in $wait_seconds s: start infra/start-prefect-server.sh or fix the URL"
    sleep 1
done

# One line per usable device: CUDA_VISIBLE_DEVICES entries, or nvidia-smi's GPU UUIDs with a MIG-partitioned
# GPU replaced by its MIG instances (CUDA cannot use such a GPU whole).
list_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | tr -d '[:space:]' | grep -v '^-' | grep . || true
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L | awk '
            /^GPU [0-9]+:/ { if (gpu != "") print gpu; gpu = ""; if (match($0, /UUID: GPU-[^)]+/)) gpu = substr($0, RSTART + 6, RLENGTH - 6); next }
            /UUID: MIG-/ { match($0, /UUID: MIG-[^)]+/); print substr($0, RSTART + 6, RLENGTH - 6); gpu = "" }
            END { if (gpu != "") print gpu }'
    fi
}

gpu_lines=$(list_gpus) ||
    die "nvidia-smi -L failed: check the NVIDIA driver, or set CUDA_VISIBLE_DEVICES= to start CPU workers"
gpus=()
[[ -z "$gpu_lines" ]] || mapfile -t gpus <<<"$gpu_lines"
if ((${#gpus[@]})); then
    count=${#gpus[@]}
else
    [[ "$require_gpu" == false ]] ||
        die "--gpu given but no GPU is visible (nvidia-smi -L lists none, or CUDA_VISIBLE_DEVICES is empty)"
    count="${ACTSTORE_CPU_WORKERS:-$(nproc)}"
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "ACTSTORE_CPU_WORKERS=$count is not a positive integer: set a worker count"
fi
memory_share=$(awk -v n="$count" 'BEGIN { printf "%.4f", 1 / n }')

pids=()
stop_workers() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
}
trap 'stop_workers; exit 143' TERM
trap 'stop_workers; exit 130' INT

for ((i = 0; i < count; i++)); do
    if ((${#gpus[@]})); then
        device="${gpus[i]}"
        name="$HOSTNAME-gpu$i"
        resources=(--resources GPU=1)
    else
        device=""  # no CUDA device: `auto` resolves to cpu
        name="$HOSTNAME-cpu$i"
        resources=()
    fi
    echo "start-dask-workers: $name (CUDA_VISIBLE_DEVICES=$device) -> $scheduler, Prefect API $PREFECT_API_URL" >&2
    CUDA_VISIBLE_DEVICES="$device" dask worker "$scheduler" --name "$name" --nthreads 1 \
        --memory-limit "$memory_share" "${resources[@]}" "${worker_options[@]}" &
    pids+=("$!")
done

status=0
wait -n || status=$?
echo "start-dask-workers: a worker exited with status $status: stopping the others" >&2
stop_workers
exit "$status"
