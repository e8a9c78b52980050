"""Dashboard benchmark: `python tests/bench/dashboard.py [--d-sae 16384] [--tokens 262144] [--out FILE]`.

Synthetic SAE output (k=32 draws per token from d_sae features with power-law frequencies, as in the feature-store
benchmark) is written with FeatureWriter next to a token table; then the whole site is generated from it, timed by
phase: reading the store (`gather`: summary, one pass over by_feature, token ids, co-occurrence), the index plots,
and the pages (index + one page per feature that fires). Top logit tokens for every feature are computed from a
random decoder and unembedding of SmolLM2-135M's shape (576 x 49152) and timed apart, since the flow computes them
from the model before rendering. Prints features/s and total seconds, and writes a markdown summary to --out.
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from bench_report import publish
from features import feature_probabilities, synthetic_chunks, token_batches

from actstore.flows.dashboard.data import DashboardOptions, gather
from actstore.flows.dashboard.pages import LogitTokens, SiteInfo, write_site
from actstore.flows.dashboard.plots import write_plots
from actstore.flows.dashboard.results import Results
from actstore.store.feature_queries import FeatureQueries
from actstore.store.features import FeatureWriter
from actstore.store.tokens import scan_tokens, write_token_table
from actstore.transforms.logit_weights import top_tokens

CTX_LEN = 128  # token_batches packs windows of this length
D_MODEL, VOCAB = 576, 49152
WORDS = (
    "the",
    " model",
    " reads",
    " tokens",
    " and",
    " writes",
    "\n",
    " def",
    "(",
    ")",
    ":",
    " return",
    " self",
    ".",
    ",",
    " a",
    " feature",
    " store",
    " of",
    " sparse",
)


def decode(ids: list[int]) -> str:
    """A stand-in tokenizer: every id maps to a short word, a few to newlines and punctuation."""
    return "".join(WORDS[i % len(WORDS)] + (str(i % 97) if i % 5 == 0 else "") for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--exponent", type=float, default=1.0, help="power law of feature frequencies")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown summary here")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    for name in ("features", "tokens", "site"):
        shutil.rmtree(work / name, ignore_errors=True)
    rng = np.random.default_rng(0)
    probabilities = feature_probabilities(args.d_sae, args.exponent, rng)
    t0 = time.perf_counter()
    with FeatureWriter(work / "features", args.d_sae, args.tokens) as writer:
        for index, chunk in enumerate(synthetic_chunks(args.tokens, 4096, args.k, probabilities, seed=1)):
            writer.add_chunk(index, *chunk)
        counts = writer.finish()
    write_token_table(work / "tokens", token_batches(args.tokens, rng))
    setup_s = time.perf_counter() - t0
    queries = FeatureQueries(work / "features", tokens=scan_tokens(work / "tokens"))

    t0 = time.perf_counter()
    w_dec = torch.randn(args.d_sae, D_MODEL) / D_MODEL**0.5
    top = top_tokens(w_dec, torch.randn(D_MODEL, VOCAB), 10)
    logits = LogitTokens(*(t.numpy() for t in top))
    logits_s = time.perf_counter() - t0

    site = work / "site"
    site.mkdir()
    t0 = time.perf_counter()
    data = gather(queries, CTX_LEN, DashboardOptions(), workers=args.workers)
    gather_s = time.perf_counter() - t0
    results = Results({}, "synthetic store: no evaluation", pl.DataFrame(), None, None, None, None)
    t1 = time.perf_counter()
    plots = write_plots(site, results, "synthetic", data.index["density"].to_numpy())
    plots_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    info = SiteInfo("synthetic SAE", {"features": f"{args.d_sae:,}"}, {}, results.headline_source, plots)
    pages = write_site(site, data, decode, info, logits, workers=args.workers)
    pages_s = time.perf_counter() - t1
    total_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())

    lines = [
        f"Dashboard of a synthetic SAE: {args.d_sae:,} features ({counts['features_alive']:,} fire) on "
        f"{args.tokens:,} tokens, {counts['nnz']:,} non-zeros (k={args.k}, power law {args.exponent}); "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {args.workers} workers, "
        f"polars {pl.__version__}.",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| read the store (summary, by_feature pass, token ids, co-occurrence) | {gather_s:.2f} |",
        f"| plots ({len(plots)}) | {plots_s:.2f} |",
        f"| pages: index + {pages:,} feature pages | {pages_s:.2f} |",
        f"| **total** | **{total_s:.2f}** ({pages / total_s:,.0f} features/s) |",
        "",
        f"Site: {size / 2**20:.0f} MiB. Before rendering, top-10 logit tokens of all {args.d_sae:,} features "
        f"({D_MODEL} x {VOCAB:,} unembedding): {logits_s:.2f} s. Writing the synthetic store: {setup_s:.1f} s "
        "(not counted).",
    ]
    publish("\n".join(lines), args.out)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
