"""Shard reader benchmark: `python tests/bench/reader.py [--rows N] [--d D] [--out FILE]`.

Reader half: on a synthetic harvest written with HarvestArrays (random float32 rows, `--rows` x `--d`, chunks of
`--chunk` rows), rows/s of the shuffled reader against a sequential read of the same array, chunk by chunk,
straight from Zarr, in the same run (target >= 0.8). The array is read once before timing so both sides read
from the page cache, and runs alternate (sequential, shuffled, sequential, ...) with the median of the repeats
reported, so drift in the machine's speed hits both sides alike. Also timed: the reader through a loader with
worker processes, and with the split and BOS filters on.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from actstore.store.root import Store
from actstore.store.shards import DEFAULT_BUFFER_TOKENS, ShardReader, make_loader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, `tests` is not on the path
from bench_report import publish

from tests.shard_data import write_synthetic_store

SITE = "blocks.6.hook_resid_post"
CTX_LEN = 128


def rows_per_second(batches: Callable[[], Iterable[torch.Tensor]]) -> float:
    """Rows/s of one full pass over `batches()`."""
    start = time.perf_counter()
    rows = 0
    for batch in batches():
        rows += len(batch)
    return rows / (time.perf_counter() - start)


def sequential(store: Store, harvest_id: str) -> Callable[[], Iterable[torch.Tensor]]:
    """The baseline: every chunk in order, read straight from Zarr into a new tensor."""
    array = store.activations(harvest_id, SITE)

    def batches() -> Iterable[torch.Tensor]:
        for start in range(0, len(array), array.chunk_tokens):
            yield torch.from_numpy(array.zarr[start : start + array.chunk_tokens])

    return batches


def bench_reader(
    root: Path, n_rows: int, d: int, chunk: int, batch_size: int, buffer_tokens: int, workers: int, repeats: int
) -> list[dict[str, Any]]:
    """Write the synthetic harvest under `root` and time every reader against the sequential baseline."""
    start = time.perf_counter()
    made = write_synthetic_store(root, n_rows // CTX_LEN, CTX_LEN, chunk, [{SITE: (d, "float32")}])
    write_seconds = time.perf_counter() - start
    store = Store(root)
    harvest_id = made.harvest_ids[0]
    for _ in sequential(store, harvest_id)():
        pass  # into the page cache

    def shuffled(epoch: int, **filters: Any) -> ShardReader:
        reader = ShardReader(
            store, [(harvest_id, SITE)], batch_size=batch_size, seed=0, buffer_tokens=buffer_tokens, **filters
        )
        reader.set_epoch(epoch)
        return reader

    cases: dict[str, Callable[[int], Callable[[], Iterable[torch.Tensor]]]] = {
        "shuffled reader, in process": lambda e: lambda: shuffled(e),
        f"shuffled reader, loader with {workers} workers": lambda e: lambda: make_loader(shuffled(e), workers),
        "shuffled reader, split=train, drop_positions={0}": lambda e: (
            lambda: shuffled(e, split="train", drop_positions={0})
        ),
    }
    times: dict[str, list[float]] = {"sequential Zarr read": [], **{name: [] for name in cases}}
    for epoch in range(repeats):
        for name, case in cases.items():
            times["sequential Zarr read"].append(rows_per_second(sequential(store, harvest_id)))
            times[name].append(rows_per_second(case(epoch)))
    baseline = statistics.median(times["sequential Zarr read"])
    row_bytes = d * 4
    return [
        {
            "reader": name,
            "rows_per_s": statistics.median(values),
            "mb_per_s": statistics.median(values) * row_bytes / 1e6,
            "ratio": statistics.median(values) / baseline,
            "write_seconds": write_seconds,
        }
        for name, values in times.items()
    ]


def reader_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Shard reader: {args.rows:,} rows x {args.d} float32 ({args.rows * args.d * 4 / 1e9:.2f} GB), chunks of "
        f"{args.chunk} rows, batches of {args.batch}, buffer_tokens={args.buffer}; median of {args.repeats} "
        f"alternating runs, page cache warm; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end. Writing the harvest took "
        f"{results[0]['write_seconds']:.1f} s.",
        "",
        "| reader | rows/s | MB/s | ÷ sequential |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['reader']} | {r['rows_per_s']:,.0f} | {r['mb_per_s']:,.0f} | {r['ratio']:.2f} |" for r in results]
    return "\n".join(lines) + "\n"


def bench_training(root: Path, harvest_id: str, d: int, batch_size: int, steps: int, repeats: int) -> dict[str, float]:
    """TopK SAE steps/s fed by the shuffled reader vs fed from batches already in memory (same batches)."""
    from actstore.schemas.train import TrainConfig
    from actstore.transforms.sae_training import Trainer

    cfg = TrainConfig(
        architecture="topk",
        d_sae=8 * d,
        k=32,
        total_tokens=batch_size * steps * 100,
        batch_size=batch_size,
        warmup_steps=0,
        b_dec_init="mean",
        init_tokens=batch_size,
    )
    store = Store(root)

    def reader_batches() -> Iterable[torch.Tensor]:
        reader = ShardReader(store, [(harvest_id, SITE)], batch_size, seed=0)
        for i, batch in enumerate(reader):
            if i == steps:
                return
            yield batch

    in_memory = [b.clone() for b in reader_batches()]
    fed, memory = [], []
    for _ in range(repeats):
        for source, times in ((reader_batches, fed), (lambda: iter(in_memory), memory)):
            trainer = Trainer(cfg, d)
            trainer.init_from_data(in_memory[:1])
            start = time.perf_counter()
            for batch in source():
                trainer.step(batch)
            times.append(steps / (time.perf_counter() - start))
    return {"reader": statistics.median(fed), "memory": statistics.median(memory)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 20, help="rows of the synthetic harvest")
    parser.add_argument("--d", type=int, default=576, help="columns (576 = SmolLM2-135M d_model)")
    parser.add_argument("--chunk", type=int, default=4096, help="rows per Zarr chunk")
    parser.add_argument("--batch", type=int, default=4096, help="rows per batch")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER_TOKENS, help="shuffle buffer rows")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes for the loader row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the harvest (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--train-steps", type=int, default=8, help="SAE steps per training measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = bench_reader(
            Path(tmp), args.rows, args.d, args.chunk, args.batch, args.buffer, args.workers, args.repeats
        )
        harvest_id = next(p.name for p in (Path(tmp) / "activations").iterdir() if p.is_dir())
        training = bench_training(Path(tmp), harvest_id, args.d, args.batch, args.train_steps, args.repeats)
    table = reader_table(results, args) + (
        f"\n\nSAE training (TopK, d_sae={8 * args.d}, k=32, batch {args.batch}, {args.train_steps} steps, median of "
        f"{args.repeats}):\n\n| fed by | steps/s | ÷ in-memory |\n|---|---:|---:|\n"
        f"| in-memory tensors (same batches) | {training['memory']:.3f} | 1.00 |\n"
        f"| shuffled shard reader | {training['reader']:.3f} | **{training['reader'] / training['memory']:.3f}** |\n"
    )
    publish(table, args.out)


if __name__ == "__main__":
    main()
