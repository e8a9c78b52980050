"""Feature-store benchmark: `python tests/bench/features.py [--nnz 100_000_000] [--out FILE]`.

Synthetic SAE output (k=32 draws per token from 32k features with power-law frequencies, duplicates within a
token dropped, lognormal values) is written chunk by chunk with FeatureWriter (write throughput reported), and,
in the same run, as one Parquet file in arrival order (tok order), the naive store. Each query is then timed on
both, median of the repeats, page cache warm for both:
- top-100 examples of the median-frequency feature and of the hottest feature;
- one document's features (token-table lookup + by_token; the token table is written by store.tokens);
- density of all features (summary lookup vs a group-by over every triple);
plus top-20 examples with context, co-occurrence and on_token, which have no one-line naive counterpart.
Prints a markdown table and writes it to --out.
"""

import argparse
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from bench_report import publish

from actstore.schemas.features import triples_schema
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.feature_queries import FeatureQueries
from actstore.store.features import FeatureWriter
from actstore.store.tokens import scan_tokens, write_token_table

CTX_LEN = 128
MEAN_DOC_TOKENS = 400


def feature_probabilities(d_sae: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like firing probabilities, assigned to feature ids in random order (as in a trained SAE)."""
    weights = 1.0 / np.arange(1, d_sae + 1) ** exponent
    return rng.permutation(weights / weights.sum())


def synthetic_chunks(n_tokens: int, chunk_tokens: int, k: int, probabilities: np.ndarray, seed: int):
    """Chunks (features, toks, values) in tok order: k draws per token, repeats within a token dropped."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(probabilities)
    d_sae = len(probabilities)
    for start in range(0, n_tokens, chunk_tokens):
        rows = min(chunk_tokens, n_tokens - start)
        features = np.minimum(np.searchsorted(cdf, rng.random((rows, k))), d_sae - 1)
        pairs = np.unique((np.arange(start, start + rows)[:, None] * d_sae + features).ravel())
        values = rng.lognormal(0.0, 0.75, len(pairs)).astype(np.float32)
        yield (pairs % d_sae).astype(np.int32), pairs // d_sae, values


def token_batches(n_tokens: int, rng: np.random.Generator) -> Iterator[pa.RecordBatch]:
    """A token table with documents of geometric length packed into windows of CTX_LEN."""
    lengths = rng.geometric(1 / MEAN_DOC_TOKENS, n_tokens // 10 + 10)
    doc = np.repeat(np.arange(len(lengths)), lengths)[:n_tokens]
    for start in range(0, n_tokens, 1 << 20):
        tok = np.arange(start, min(start + (1 << 20), n_tokens))
        split = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(tok), np.int8)), list(SPLITS))
        columns = [
            tok,
            doc[tok],
            tok // CTX_LEN,
            (tok % CTX_LEN).astype(np.int32),
            rng.integers(0, 49152, len(tok)).astype(np.int32),
            split,
        ]
        yield pa.RecordBatch.from_arrays(columns, schema=TOKEN_SCHEMA)


class AnonymousPeak(threading.Thread):
    """Samples the process's anonymous resident memory (Linux RssAnon) every 20 ms and keeps the peak.

    Peak RSS (ru_maxrss) would also count the memory-mapped spill pages finish reads, which are page cache
    the kernel can drop, not memory the writer holds.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = 0
        self.running = True

    def run(self) -> None:
        status = Path("/proc/self/status")
        while self.running and status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            time.sleep(0.02)


def median_ms(query: Callable[[], pl.DataFrame], repeats: int) -> tuple[float, int]:
    """Median wall time of `query` in ms after one warm-up run, and the rows it returned."""
    rows = len(query())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        query()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnz", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--exponent", type=float, default=1.0, help="power law of feature frequencies")
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    probabilities = feature_probabilities(args.d_sae, args.exponent, rng)
    unique_per_token = float((1 - (1 - probabilities) ** args.k).sum())
    n_tokens = int(np.ceil(args.nnz / unique_per_token))
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-features-"))
    store_dir, naive_path = work / "features", work / "naive.parquet"
    for path in (store_dir, naive_path, work / "tokens"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    memory = AnonymousPeak()
    memory.start()
    time.sleep(0.1)
    baseline_kib = memory.peak_kib
    add_s = generate_s = naive_s = 0.0
    schema = triples_schema("float16")
    nnz = 0
    with (
        FeatureWriter(store_dir, args.d_sae, n_tokens) as writer,
        pq.ParquetWriter(
            naive_path, schema, compression="zstd", compression_level=1, use_dictionary=["feature"]
        ) as naive,
    ):
        chunks = synthetic_chunks(n_tokens, args.chunk_tokens, args.k, probabilities, seed=1)
        index = 0
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            t1 = time.perf_counter()
            generate_s += t1 - t0
            if chunk is None:
                break
            writer.add_chunk(index, *chunk)
            t2 = time.perf_counter()
            naive.write_table(
                pa.table(
                    [pa.array(chunk[0]), pa.array(chunk[1]), pa.array(chunk[2].astype(np.float16))], schema=schema
                ),
                row_group_size=1 << 20,
            )
            naive_s += time.perf_counter() - t2
            add_s += t2 - t1
            nnz += len(chunk[0])
            index += 1
        t0 = time.perf_counter()
        counts = writer.finish()
        finish_s = time.perf_counter() - t0
    memory.running = False
    write_token_table(work / "tokens", token_batches(n_tokens, rng))
    disk = {
        name: sum(p.stat().st_size for p in (store_dir / name).glob("*.parquet")) for name in ("by_feature", "by_token")
    }
    disk["summary"] = (store_dir / "summary.parquet").stat().st_size

    tokens = scan_tokens(work / "tokens")
    q = FeatureQueries(store_dir, tokens=tokens, decode=lambda ids: " ".join(map(str, ids)))
    naive_lf = pl.scan_parquet(naive_path)
    summary = q.summary.select("feature", "count").collect()
    alive = summary.filter(pl.col("count") > 0).sort("count", "feature")
    median_feature = int(alive["feature"][len(alive) // 2])
    hot_feature = int(alive["feature"][-1])
    lengths = tokens.group_by("doc").len().sort("doc").collect()
    typical = lengths.filter((pl.col("doc") >= len(lengths) // 2) & (pl.col("len") >= MEAN_DOC_TOKENS))
    doc = int(typical["doc"][0])  # a document of at least mean length, mid-corpus
    doc_tokens = tokens.filter(pl.col("doc") == doc).select("tok").collect()["tok"]

    def naive_top(feature: int) -> pl.DataFrame:
        return (
            naive_lf.filter(pl.col("feature") == feature)
            .sort(["value", "tok"], descending=[True, False])
            .head(100)
            .collect()
        )

    def naive_document() -> pl.DataFrame:
        toks = tokens.filter(pl.col("doc") == doc).select("tok").collect()["tok"]
        return naive_lf.filter(pl.col("tok").is_in(toks.implode())).sort("tok", "feature").collect()

    def feature_sorted_document() -> pl.DataFrame:
        return q.by_feature.filter(pl.col("tok").is_in(doc_tokens.implode())).collect()

    def naive_density() -> pl.DataFrame:
        return (
            naive_lf.group_by("feature")
            .agg(count=pl.len(), mean=pl.col("value").cast(pl.Float32).mean(), max=pl.col("value").max())
            .collect()
        )

    r = args.repeats
    rows: list[tuple[str, str, str, str]] = []

    def measure(
        name: str,
        store_query: Callable[[], pl.DataFrame],
        naive_query: Callable[[], pl.DataFrame] | None,
        naive_name: str = "naive file",
    ) -> None:
        ours, n = median_ms(store_query, r)
        theirs = f"{median_ms(naive_query, max(3, r // 5))[0]:.1f} ms ({naive_name})" if naive_query else "-"
        rows.append((name, f"{ours:.1f} ms", theirs, str(n)))
        print(rows[-1], flush=True)

    median_count = int(summary["count"][median_feature])
    hot_count = int(summary["count"][hot_feature])
    measure(
        f"top-100 of the median feature ({median_count:,} rows)",
        lambda: q.examples(median_feature).head(100).collect(),
        lambda: naive_top(median_feature),
    )
    measure(
        f"top-100 of the hottest feature ({hot_count:,} rows)",
        lambda: q.examples(hot_feature).head(100).collect(),
        lambda: naive_top(hot_feature),
    )
    measure(f"one document's features ({len(doc_tokens)} tokens)", lambda: q.document(doc).collect(), naive_document)
    measure("same document from the feature-sorted copy", feature_sorted_document, None)
    measure("density of all features", lambda: q.density().collect(), naive_density)
    measure(
        "top-20 with 8 tokens of context, decoded (median feature)",
        lambda: q.top_examples(median_feature, k=20, context=8).collect(),
        None,
    )
    measure(
        "quantile examples, 4 buckets x 5 (median feature)",
        lambda: q.quantile_examples(median_feature, context=8).collect(),
        None,
    )
    measure("co-occurrence of the median feature", lambda: q.cooccurrence(median_feature).collect(), None)
    token_id = int(tokens.filter(pl.col("tok") == int(doc_tokens[0])).select("token_id").collect().item())
    measure("features on one token id", lambda: q.on_token(token_id).collect(), None)

    write_rate = nnz / (add_s + finish_s)
    lines = [
        f"Feature store, {nnz:,} non-zeros ({n_tokens:,} tokens x ~{nnz / n_tokens:.1f} of {args.d_sae:,} "
        f"features, power law {args.exponent}), float16 values; {platform.processor() or platform.machine()}, "
        f"polars {pl.__version__}, pyarrow {pa.__version__}.",
        "",
        f"Write: add_chunk {add_s:.1f} s + finish {finish_s:.1f} s = {write_rate / 1e6:.2f} M triples/s "
        f"({counts['by_feature_parts']} by_feature parts, {counts['by_token_parts']} by_token parts); "
        f"naive single-file write {nnz / naive_s / 1e6:.2f} M triples/s. Disk: by_feature "
        f"{disk['by_feature'] / 2**20:.0f} MiB, by_token {disk['by_token'] / 2**20:.0f} MiB, summary "
        f"{disk['summary'] / 2**20:.1f} MiB, naive file {naive_path.stat().st_size / 2**20:.0f} MiB. "
        f"Peak anonymous memory while writing (generator, naive writer and FeatureWriter with the default "
        f"bucket_rows=4M): {(memory.peak_kib - baseline_kib) / 1024:.0f} MiB above the {baseline_kib / 1024:.0f} "
        f"MiB before writing (imports; `store` pulls in torch). "
        f"(Synthetic data generation, {generate_s:.0f} s, excluded.)",
        "",
        f"| query | feature store (median of {r}) | naive full scan | rows |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    publish("\n".join(lines), args.out)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
