"""Scale-out and Prefect-overhead benchmark on the embedded default:
`python tests/bench/scaleout.py [--tokens N] [--repeats R] [--threads T] [--out FILE]`.

SmolLM2-135M (fp32) on the pydocs corpus, ctx_len 128, one site `blocks.6.hook_resid_post`, no loss (the forward
stops after block 6); encode with a TopK SAE (d_sae=4608, k=32, random weights: a TopK encode costs the same
whatever the weights, and stores exactly k non-zeros per token). Measured side by side in one run, on the same
tokens, each run into a fresh store (the one ingested corpus is linked into each):

1. Scale-out: the pipeline's own `harvest_step` and `encode_step` inside a Prefect flow whose task runner is a local
   Dask cluster (prefect-dask) of 1 worker with T torch threads, then of 2 workers with T/2 threads each. The
   tokens/s are the step's `tokens_per_s` from the published manifest: tokens over the wall time from the moment
   the arrays exist (after the prepare task) until every shard's result is back; so they include shard
   submission, Prefect's task-run bookkeeping on its API server, each shard's setup (opening arrays, loading the
   SAE from the store), the forward or encode, the writes and fsyncs, and the persisted shard results. They
   exclude the cluster's start, the plan / prepare / publish tasks, the final sort of the feature tables, and the
   model's load: a warm-up harvest of 4 one-window chunks per worker runs first on the same cluster, and the bench
   checks that every worker ran a shard of it, so every worker holds the model before the measured harvest.
   One run per worker count.
2. Prefect overhead: the same single-process harvest (and then encode) done (a) by calling the plain functions,
   no flow and no task (`plan_harvest.fn`, `prepare_arrays`, `harvest_shard` over all chunks,
   `publish_harvest.fn`; `encode_shard` over all chunks, `finish_features.fn`) and (b) through the pipeline's
   Prefect path in this process (`harvest_step` / `encode_step` in a flow, no Dask: Prefect tasks with caching,
   persisted results, retries, progress artifacts). Both sides run with T threads, the model already loaded in
   this process; (b) is timed around the whole flow call, flow-run creation included. Runs alternate (a, b, a,
   b, ...) `--repeats` times after a one-chunk warm-up of both paths; medians are reported. Target: < 5 %.

Dask workers must report to the same Prefect API as their flow: unless `PREFECT_API_URL` is set, the bench
starts a local Prefect server (`flows.prefect_server.ensure_api`) with `PREFECT_HOME` in a temporary directory that
is removed at exit. The server runs on the same cores: its work is part of what Prefect costs.
"""

import argparse
import atexit
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Prefect reads PREFECT_HOME when it is imported: point it at a temporary directory before any import of it.
os.environ.update(
    {}
    if os.environ.get("PREFECT_API_URL")
    else {
        "PREFECT_HOME": tempfile.mkdtemp(prefix="actstore-bench-prefect-"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
)

import distributed
import prefect
import torch
from bench_report import measure_table, publish
from prefect import flow

from actstore.flows.encode import encode_shard, finish_features
from actstore.flows.harvest import harvest_shard, plan_harvest, prepare_arrays, publish_harvest
from actstore.flows.ingest import ingest_corpus
from actstore.flows.orchestration.cluster import Cluster
from actstore.flows.orchestration.pipeline import encode_step, harvest_step
from actstore.flows.orchestration.prefect_server import ensure_api
from actstore.flows.runtime import cached_model
from actstore.flows.saes import publish_sae
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.encode import EncodeConfig, EncodeRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.manifest import Manifest
from actstore.schemas.model import ModelConfig
from actstore.schemas.pipeline import RunSettings
from actstore.schemas.sae import SAEConfig
from actstore.store.root import Store
from actstore.transforms.sae import SAE

CTX_LEN = 128
CHUNK = 4096
SITE = "blocks.6.hook_resid_post"
D, D_SAE, K = 576, 4608, 32


@flow(name="bench-harvest")
def harvest_flow(store_root: str, config: HarvestConfig, run: RunSettings, cluster: Cluster) -> Manifest:
    return harvest_step(store_root, config, run, cluster)


@flow(name="bench-encode")
def encode_flow(store_root: str, config: EncodeConfig, run: RunSettings, cluster: Cluster) -> Manifest:
    return encode_step(store_root, config, run, cluster)


@flow(name="bench-scaleout")
def scaleout_flow(
    store_root: str,
    warmup: HarvestConfig,
    config: HarvestConfig,
    encode: EncodeConfig,
    run: RunSettings,
    cluster: Cluster,
) -> list[Manifest]:
    """The warm-up harvest (loads the model on every worker), then the measured harvest and encode, all on the
    one cluster this flow's task runner starts."""
    return [
        harvest_step(store_root, warmup, run, cluster),
        harvest_step(store_root, config, run, cluster),
        encode_step(store_root, encode, run, cluster),
    ]


def random_sae() -> SAE:
    g = torch.Generator().manual_seed(0)
    config = SAEConfig(architecture="topk", d_in=D, d_sae=D_SAE, k=K, hook_name=SITE, model_name=ModelConfig().label())
    return SAE(
        config,
        {
            "W_enc": torch.randn(D, D_SAE, generator=g) / D**0.5,
            "W_dec": torch.randn(D_SAE, D, generator=g) / D_SAE**0.5,
            "b_enc": torch.zeros(D_SAE),
            "b_dec": torch.zeros(D),
        },
    )


def encode_config(store_root: str, sae: SAE, harvest: HarvestConfig) -> EncodeConfig:
    """Publish the SAE into this store (not timed) and name the encode of `harvest`'s site with it."""
    sae_id = publish_sae(store_root, sae, source="bench").id
    return EncodeConfig(sae_id=sae_id, harvest_id=harvest.harvest_id(), site=SITE)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def direct_harvest(store_root: str, config: HarvestConfig, runtime: HarvestRuntime) -> Manifest:
    """The harvest step's work as plain function calls: what the Prefect path does, minus Prefect."""
    plan = plan_harvest.fn(store_root, config)
    arrays = prepare_arrays(store_root, config, runtime, plan)
    stats = harvest_shard(store_root, config, runtime, plan, tuple(range(plan.n_chunks)))
    return publish_harvest.fn(store_root, config, plan, {**stats, "arrays": arrays})


def direct_encode(store_root: str, config: EncodeConfig, runtime: EncodeRuntime) -> Manifest:
    acts = Store(store_root).activations(config.harvest_id, config.site)
    stats = encode_shard(store_root, config, runtime, tuple(range(-(-len(acts) // acts.chunk_tokens))))
    return finish_features.fn(store_root, config, stats)


class Bench:
    """The ingested corpus and the fresh stores that link it."""

    def __init__(self, tmp: Path, tokens: int) -> None:
        self.tmp = tmp
        corpus_root = tmp / "corpus-store"
        self.corpus_id = ingest_corpus.fn(
            str(corpus_root), CorpusConfig(source="pydocs", ctx_len=CTX_LEN, max_tokens=tokens)
        ).id
        self.corpus_dir = Store(corpus_root).corpus_dir(self.corpus_id)
        self.sae = random_sae()

    def new_root(self, name: str) -> str:
        root = self.tmp / name
        (root / "corpora").mkdir(parents=True)
        (root / "corpora" / self.corpus_id).symlink_to(self.corpus_dir)
        return str(root)

    def harvest_config(self, tokens: int, batch_windows: int | None = None) -> HarvestConfig:
        return HarvestConfig(
            corpus_id=self.corpus_id, sites=(SITE,), loss=False, max_tokens=tokens, batch_windows=batch_windows
        )

    def scaleout(self, tokens: int, workers: int, threads: int) -> tuple[Manifest, Manifest]:
        """Harvest then encode `tokens` on a local Dask cluster of `workers` processes: their manifests."""
        root = self.new_root(f"dask-{workers}")
        cluster = Cluster(local_workers=workers, workers=workers)
        run = RunSettings(device="cpu", threads=threads, progress=False)
        # one-window chunks, 4 shards per worker: every idle worker takes one, and loads the model for it
        warmup = self.harvest_config(4 * workers * CTX_LEN, batch_windows=1)
        config = self.harvest_config(tokens)
        steps = scaleout_flow.with_options(task_runner=cluster.task_runner())
        warm, harvested, encoded = steps(root, warmup, config, encode_config(root, self.sae, config), run, cluster)
        if warm.timings["worker_processes"] != workers:
            raise RuntimeError(
                f"the warm-up harvest ran on {warm.timings['worker_processes']:.0f} of {workers} "
                "workers: a worker's model load would be in the measured time; run the bench again"
            )
        shutil.rmtree(root)
        return harvested, encoded

    def overhead_pair(self, name: str, tokens: int, threads: int) -> tuple[list[float], list[float]]:
        """One direct and one Prefect harvest, then one direct and one Prefect encode of those harvests:
        seconds as [direct, prefect] for harvest and for encode."""
        config = self.harvest_config(tokens)
        run = RunSettings(device="cpu", threads=threads, progress=False)
        runtime = HarvestRuntime(device="cpu", threads=threads, progress=False)
        direct_root, prefect_root = self.new_root(f"direct-{name}"), self.new_root(f"prefect-{name}")
        harvest_s, harvests = zip(
            timed(direct_harvest, direct_root, config, runtime),
            timed(harvest_flow, prefect_root, config, run, Cluster()),
            strict=True,
        )
        encodes = [encode_config(root, self.sae, config) for root in (direct_root, prefect_root)]
        encode_runtime = EncodeRuntime(device="cpu", threads=threads, progress=False)
        encode_s, features = zip(
            timed(direct_encode, direct_root, encodes[0], encode_runtime),
            timed(encode_flow, prefect_root, encodes[1], run, Cluster()),
            strict=True,
        )
        if harvests[0].counts != harvests[1].counts or features[0].counts != features[1].counts:
            raise RuntimeError(f"direct and Prefect runs stored different objects: {harvests}, {features}")
        shutil.rmtree(direct_root)
        shutil.rmtree(prefect_root)
        return list(harvest_s), list(encode_s)


def main() -> None:
    own_server = not os.environ.get("PREFECT_API_URL")
    if own_server:  # PREFECT_HOME is the temporary directory made at import
        atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # runs after the server stops
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262144, help="tokens per run (multiple of 4096, >= 8192)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating direct / Prefect pairs")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads in all: 1 worker gets them all, 2 workers half each"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if args.tokens < 2 * CHUNK or args.tokens % CHUNK:
        parser.error(f"--tokens {args.tokens}: give a multiple of {CHUNK}, at least {2 * CHUNK}")
    if args.threads < 2 or args.repeats < 1:
        parser.error("--threads must be >= 2 (two workers get half each) and --repeats >= 1")
    api = ensure_api()
    server = "a local server started by the bench" if own_server else f"server {api}"
    half = args.threads // 2

    with tempfile.TemporaryDirectory(prefix="actstore-bench-") as tmp:
        bench = Bench(Path(tmp), args.tokens)
        one = bench.scaleout(args.tokens, 1, args.threads)
        print(
            f"1 worker: harvest {one[0].timings['tokens_per_s']:,.0f} tok/s, "
            f"encode {one[1].timings['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )
        two = bench.scaleout(args.tokens, 2, half)
        print(
            f"2 workers: harvest {two[0].timings['tokens_per_s']:,.0f} tok/s, "
            f"encode {two[1].timings['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )

        cached_model(ModelConfig(), "cpu")
        bench.overhead_pair("warmup", 2 * CHUNK, args.threads)  # first-call allocations and Prefect's first runs
        harvest_s: list[list[float]] = []
        encode_s: list[list[float]] = []
        for r in range(args.repeats):
            h, e = bench.overhead_pair(str(r), args.tokens, args.threads)
            harvest_s.append(h)
            encode_s.append(e)
            print(
                f"repeat {r}: harvest direct {h[0]:.2f} s, Prefect {h[1]:.2f} s; "
                f"encode direct {e[0]:.2f} s, Prefect {e[1]:.2f} s",
                flush=True,
            )

    def ratio_rows(step: str, on_one: Manifest, on_two: Manifest) -> list[tuple[str, str]]:
        one_tps, two_tps = on_one.timings["tokens_per_s"], on_two.timings["tokens_per_s"]
        each = f"{half} thread{'s' if half > 1 else ''} each"
        return [
            (
                f"{step} tokens/s, 1 Dask worker ({args.threads} threads, {on_one.timings['shards']:.0f} shards)",
                f"{one_tps:,.0f}",
            ),
            (f"{step} tokens/s, 2 Dask workers ({each}, {on_two.timings['shards']:.0f} shards)", f"{two_tps:,.0f}"),
            ("**2 workers / 1 worker**", f"**{two_tps / one_tps:.2f}x**"),
        ]

    def overhead_rows(step: str, seconds: list[list[float]]) -> list[tuple[str, str]]:
        direct, through = (statistics.median(s[i] for s in seconds) for i in (0, 1))
        return [
            (f"{step} direct (no Prefect) seconds", f"{direct:.2f}"),
            (f"{step} through Prefect seconds", f"{through:.2f}"),
            ("**Prefect overhead** (target < 5 %)", f"**{100 * (through - direct) / direct:+.1f} %**"),
        ]

    rows = (
        ratio_rows("harvest", one[0], two[0])
        + ratio_rows("encode", one[1], two[1])
        + overhead_rows("harvest", harvest_s)
        + overhead_rows("encode", encode_s)
    )
    header = (
        f"Embedded default (SmolLM2-135M, fp32), pydocs, {args.tokens:,} tokens per run, ctx_len {CTX_LEN}, "
        f"site {SITE}, no loss; TopK SAE d_sae={D_SAE}, k={K} (random weights); Dask {distributed.__version__} "
        f"LocalCluster, Prefect {prefect.__version__} ({server}); Prefect overhead: median of {args.repeats} "
        f"alternating runs, {args.threads} threads; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, device cpu"
    )
    publish(measure_table(header, rows), args.out)


if __name__ == "__main__":
    main()
