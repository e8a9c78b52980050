"""Encode benchmark: `python tests/bench/encode.py [--chunks N] [--out FILE]`.

On the same chunks of a synthetic harvest (Gaussian rows, d=576, fp32) and one random TopK SAE (d_sae=4608,
k=32), measured side by side in one run:
- a bare encode: `sae.encode` (matmul + top-k) of each chunk already in memory, nothing read, nothing written;
- the encode flow's chunk loop: read from Zarr, encode, extract the non-zeros, hand them to the feature writer
  on its thread (sorted runs fsynced to disk);
- the final sort into by_feature / by_token / summary (reported separately: it runs once, after all chunks).
Target: encode+write >= 0.8 of the bare encode.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_report import measure_table, publish

from actstore.flows.encode import encode_chunks, finish_features
from actstore.flows.saes import publish_sae
from actstore.schemas.arrays import ActivationAttrs
from actstore.schemas.encode import EncodeConfig, EncodeRuntime
from actstore.schemas.manifest import Manifest
from actstore.schemas.sae import SAEConfig
from actstore.store.activations import ArraySpec, HarvestArrays
from actstore.store.files import write_manifest
from actstore.store.objects import utc_now
from actstore.store.root import Store
from actstore.transforms.sae import SAE

D, D_SAE, K, CHUNK = 576, 4608, 32, 4096
SITE = "blocks.6.hook_resid_post"


def synthetic_harvest(root: Path, chunks: int) -> tuple[str, list[np.ndarray]]:
    harvest_id = "harvest-synthetic-00000000"
    directory = Store(root).harvest_dir(harvest_id)
    n = chunks * CHUNK
    attrs = ActivationAttrs(
        harvest_id=harvest_id,
        corpus_id="corpus-synthetic",
        site=SITE,
        module="model.layers.6",
        model="synthetic",
        logical_dtype="float32",
        n_tokens=n,
        d=D,
        ctx_len=128,
        chunk_tokens=CHUNK,
    )
    arrays = HarvestArrays(directory, [ArraySpec(attrs)], n, CHUNK)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((CHUNK, D), dtype=np.float32) for _ in range(chunks)]
    for c, x in enumerate(data):
        arrays.write_chunk(c, {SITE: x})
    write_manifest(
        directory,
        Manifest(
            kind="harvest",
            id=harvest_id,
            config={"model": {"name": "synthetic"}},
            code_version="bench",
            created=utc_now(),
            counts={"n_tokens": n},
            extra={"arrays": {SITE: {"d": D}}, "corpus_id": "corpus-synthetic"},
        ),
    )
    return harvest_id, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=24, help="chunks of 4096 tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    sae = SAE(
        SAEConfig(architecture="topk", d_in=D, d_sae=D_SAE, k=K, hook_name=SITE),
        {
            "W_enc": torch.randn(D, D_SAE, generator=g) / D**0.5,
            "W_dec": torch.randn(D_SAE, D, generator=g),
            "b_enc": torch.zeros(D_SAE),
            "b_dec": torch.zeros(D),
        },
    )
    bare, flow_s, finish_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="actstore-bench-") as tmp:
        root = Path(tmp)
        harvest_id, data = synthetic_harvest(root, args.chunks)
        sae_id = publish_sae(str(root), sae, source="bench").id
        tensors = [torch.from_numpy(x) for x in data]
        with torch.inference_mode():
            sae.encode(tensors[0])  # warm-up
        for r in range(args.repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                for x in tensors:
                    sae.encode(x)
            bare.append(time.perf_counter() - start)
            config = EncodeConfig(sae_id=sae_id, harvest_id=harvest_id, site=SITE, value_dtype="float16")
            store = Store(root)
            features_dir = store.features_dir(sae_id, harvest_id)
            shutil.rmtree(features_dir, ignore_errors=True)
            start = time.perf_counter()
            stats = encode_chunks.fn(str(root), config, EncodeRuntime(device="cpu", progress=False))
            flow_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            manifest = finish_features.fn(str(root), config, stats)
            finish_s.append(time.perf_counter() - start)
            print(
                f"repeat {r}: bare {bare[-1]:.2f} s, encode+write {flow_s[-1]:.2f} s, finish {finish_s[-1]:.2f} s",
                flush=True,
            )
    tokens = args.chunks * CHUNK
    b, f, s = (statistics.median(v) for v in (bare, flow_s, finish_s))
    rows = [
        ("bare encode tokens/s (matmul + top-k, in memory)", f"{tokens / b:,.0f}"),
        ("encode flow tokens/s (Zarr read + encode + non-zeros + sorted runs written)", f"{tokens / f:,.0f}"),
        ("**encode+write / bare encode** (target >= 0.8)", f"**{b / f:.3f}**"),
        ("final sort into by_feature/by_token/summary: seconds", f"{s:.2f}"),
        ("encode+write+sort tokens/s", f"{tokens / (f + s):,.0f}"),
        ("non-zeros stored", f"{manifest.counts['nnz']:,}"),
    ]
    header = (
        f"TopK SAE d_in={D}, d_sae={D_SAE}, k={K}; {tokens:,} synthetic fp32 tokens in chunks of {CHUNK}; "
        f"median of {args.repeats}; {torch.get_num_threads()} torch threads, cpu"
    )
    publish(measure_table(header, rows), args.out)


if __name__ == "__main__":
    main()
