"""CLI overhead benchmark: `python tests/bench/cli_overhead.py [--repeats N] [--out FILE]`.

What a command costs when there is nothing to do, measured as a user runs it (`python -m actstore ...`, a fresh
process each time, no Prefect server configured), alternating the commands in every round so drift hits all:
- `actstore ls` on the store: the floor (Python, the store and its readers imported, the listing);
- a no-op re-run of `ingest`, `harvest` and `encode` whose objects exist (target: <= 1 s above `ls`);
- a first `ingest` of a small corpus run as today (its flow as plain calls) and with Prefect's temporary server
  (`PREFECT_SERVER_ALLOW_EPHEMERAL_MODE` and a flow call: what every command paid before).
The store is made once on the embedded SmolLM2 (4,096 tokens of pydocs, one site) and a random TopK SAE.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import measure_table, publish

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: `tests` is not on the path

from tests.flows.test_encode import random_topk_sae  # noqa: E402

SITE = "blocks.1.hook_resid_post"


def actstore(env: dict[str, str], *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "actstore", *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"actstore {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    work = Path(tempfile.mkdtemp(prefix="actstore-cli-bench-"))
    env["PREFECT_HOME"] = str(work / "prefect")
    store = ["--store", str(work / "store")]
    ingest = ["ingest", *store, "--source", "pydocs", "--max-tokens", "4096"]
    _, corpus = actstore(env, *ingest)
    harvest = ["harvest", *store, "--corpus", corpus["corpus_id"], "--site", SITE, "--no-progress"]
    _, harvested = actstore(env, *harvest)
    from actstore.transforms.sae import save

    save(random_topk_sae(576, seed=0, hook=SITE, model="smollm2-135m"), work / "sae")
    _, encoded = actstore(env, "encode", *store, "--harvest", harvested["harvest_id"], "--sae", str(work / "sae"))
    encode = ["encode", *store, "--harvest", harvested["harvest_id"], "--sae", encoded["sae_id"]]

    ephemeral = {**env, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    first_ingest = (
        "from actstore.flows.ingest import ingest; from actstore.schemas.corpus import CorpusConfig; "
        "import sys; ingest(sys.argv[1], CorpusConfig(source='pydocs', max_tokens=2048))"
    )
    times: dict[str, list[float]] = {k: [] for k in ("ls", "ingest", "harvest", "encode", "first", "first_prefect")}
    for round_ in range(args.repeats):
        times["ls"].append(actstore(env, "ls", *store)[0])
        times["ingest"].append(actstore(env, *ingest)[0])
        times["harvest"].append(actstore(env, *harvest)[0])
        times["encode"].append(actstore(env, *encode)[0])
        times["first"].append(
            actstore(env, "ingest", "--store", str(work / f"a{round_}"), "--source", "pydocs", "--max-tokens", "2048")[
                0
            ]
        )
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", first_ingest, str(work / f"b{round_}")],
            env=ephemeral,
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        times["first_prefect"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        ("`actstore ls` (s)", f"{median['ls']:.2f}"),
        *((f"no-op `actstore {k}` (s)", f"{median[k]:.2f}") for k in ("ingest", "harvest", "encode")),
        *(
            (f"**no-op {k} - ls** (target <= 1 s)", f"**{median[k] - median['ls']:+.2f}**")
            for k in ("ingest", "harvest", "encode")
        ),
        ("first ingest of 2,048 tokens, flow as plain calls (s)", f"{median['first']:.2f}"),
        ("the same through Prefect's temporary server (s)", f"{median['first_prefect']:.2f}"),
    ]
    header = (
        f"CLI start-up and no-op re-runs, median of {args.repeats} alternating rounds; a fresh process per "
        f"command, no Prefect server configured; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    publish(measure_table(header, rows), args.out)


if __name__ == "__main__":
    main()
