"""Harvest benchmark on the embedded default: `python tests/bench/harvest.py [--tokens N] [--out FILE]`.

Everything is measured side by side in one run, on the same token batches, with the model loaded once:
- harvest tokens/s (hooks + early stop + Zarr writes + fsync + done markers) / a bare forward pass stopped at the
  same layer with no hooks and no writes (target >= 0.95);
- the early-stop speed-up: the bare stopped forward against a full forward;
- a four-site harvest (four layers) in one pass against four single-site harvests of the same layers;
- bytes on disk per token per site.
Runs alternate (bare, harvest, bare, harvest, ...) and the median of the repeats is reported, so drift in the
machine's speed hits both sides alike.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_report import measure_table, publish

from actstore.flows.harvest import harvest_chunks, plan_harvest, publish_harvest
from actstore.flows.ingest import ingest_corpus
from actstore.flows.runtime import cached_model
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.store.activations import disk_bytes
from actstore.store.root import Store
from actstore.store.tokens import read_windows
from actstore.transforms.capture import truncated_forward
from actstore.transforms.sites import n_layers

CTX_LEN = 128


def bare_seconds(model: torch.nn.Module, batches: list[torch.Tensor], n_blocks: int | None) -> float:
    """Time a forward over every batch: truncated after `n_blocks` blocks, or the full model when None."""
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            if n_blocks is None:
                model(input_ids=ids, use_cache=False)
            else:
                truncated_forward(model, ids, n_blocks)
    return time.perf_counter() - start


def harvest_seconds(root: Path, corpus_id: str, sites: tuple[str, ...], max_tokens: int) -> tuple[float, str]:
    """Run a fresh harvest (a new store directory each time) and return its run time, model load excluded."""
    config = HarvestConfig(corpus_id=corpus_id, sites=sites, max_tokens=max_tokens, batch_windows=4096 // CTX_LEN)
    store_root = str(root)
    plan = plan_harvest.fn(store_root, config)
    stats = harvest_chunks.fn(store_root, config, HarvestRuntime(progress=False), plan)
    publish_harvest.fn(store_root, config, plan, stats)
    return stats["run_seconds"], plan.harvest_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per measured run (multiple of 4096)")
    parser.add_argument("--full-tokens", type=int, default=8192, help="tokens for the full-forward comparison")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="actstore-bench-") as tmp:
        corpus = ingest_corpus.fn(
            str(Path(tmp) / "corpus-store"), CorpusConfig(source="pydocs", ctx_len=CTX_LEN, max_tokens=args.tokens)
        )
        corpus_root = Path(tmp) / "corpus-store"
        device = torch.device("cpu")
        model = cached_model(ModelConfig(), str(device))
        batch_windows = 4096 // CTX_LEN
        corpus_dir = Store(corpus_root).corpus_dir(corpus.id)
        n_seqs = args.tokens // CTX_LEN
        batches = [
            torch.from_numpy(read_windows(corpus_dir, s, min(s + batch_windows, n_seqs), CTX_LEN)).long()
            for s in range(0, n_seqs, batch_windows)
        ]
        tokens = sum(b.numel() for b in batches)
        layer = args.layer
        site = f"blocks.{layer}.hook_resid_post"

        def new_root(name: str) -> Path:
            root = Path(tmp) / name
            (root / "corpora").mkdir(parents=True, exist_ok=True)
            (root / "corpora" / corpus.id).symlink_to(corpus_dir)
            return root

        bare_seconds(model, batches[:1], layer + 1)  # warm-up: first-call allocations
        bare, harvested, bytes_per_token = [], [], 0.0
        for r in range(args.repeats):
            bare.append(bare_seconds(model, batches, layer + 1))
            seconds, hid = harvest_seconds(new_root(f"one-{r}"), corpus.id, (site,), args.tokens)
            harvested.append(seconds)
            bytes_per_token = disk_bytes(Store(Path(tmp) / f"one-{r}").harvest_dir(hid) / f"{site}.zarr") / tokens

        full_batches = batches[: max(1, args.full_tokens // 4096)]
        full_tokens = sum(b.numel() for b in full_batches)
        full = bare_seconds(model, full_batches, None)
        stopped_same = bare_seconds(model, full_batches, layer + 1)

        layers4 = [layer // 4 * i for i in (1, 2, 3)] + [layer] if layer >= 4 else [0, 1, 2, 3]
        sites4 = tuple(f"blocks.{lay}.hook_resid_post" for lay in layers4)
        four_in_one, _ = harvest_seconds(new_root("four"), corpus.id, sites4, args.tokens)
        four_single = sum(
            harvest_seconds(new_root(f"single-{lay}"), corpus.id, (s,), args.tokens)[0]
            for lay, s in zip(layers4, sites4, strict=True)
        )

    bare_tps = tokens / statistics.median(bare)
    harvest_tps = tokens / statistics.median(harvested)
    rows = [
        ("harvest tokens/s (1 site, writes included)", f"{harvest_tps:,.0f}"),
        (f"bare forward tokens/s stopped after block {layer}, no hooks, no writes", f"{bare_tps:,.0f}"),
        ("**harvest / bare stopped forward** (target >= 0.95)", f"**{harvest_tps / bare_tps:.3f}**"),
        ("full forward tokens/s (all blocks + lm_head)", f"{full_tokens / full:,.0f}"),
        (f"early-stop speed-up (stopped after block {layer} / full)", f"{full / stopped_same:.2f}x"),
        (f"4 sites {sites4} in one pass: seconds", f"{four_in_one:.2f}"),
        ("the same 4 sites as 4 single-site harvests: seconds", f"{four_single:.2f}"),
        ("**one-pass speed-up for 4 sites**", f"**{four_single / four_in_one:.2f}x**"),
        (f"bytes on disk per token per site (d=576, {model.dtype})", f"{bytes_per_token:,.1f}"),
    ]
    header = (
        f"Embedded default (SmolLM2-135M, {n_layers(model)} blocks, fp32), {tokens:,} tokens per run in batches "
        f"of 4096, ctx_len {CTX_LEN}, median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, device cpu"
    )
    publish(measure_table(header, rows), args.out)


if __name__ == "__main__":
    main()
