"""Encode: a harvest's activations -> SAE latents -> the sparse-feature store, resumable exactly-once.

The story: `import_sae` puts the checkpoint in the store under a content id, `encode_chunks` reads the
activation array chunk by chunk, encodes on cpu or cuda and hands each chunk's non-zeros to the feature
writer on a background thread (chunks already stored are skipped), `finish_features` sorts them into the
by_feature / by_token / summary tables and writes the manifest.
"""

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.flows.harvest import numeric
from actstore.flows.runtime import flow, run_figures, task
from actstore.flows.saes import open_sae, sae_on_site, stored_sae_id
from actstore.flows.writer_thread import BackgroundWriter
from actstore.schemas.encode import EncodeConfig, EncodeRuntime
from actstore.schemas.errors import MismatchError, UserError
from actstore.schemas.manifest import Manifest
from actstore.store.activations import chunk_rows
from actstore.store.features import FeatureWriter, read_index
from actstore.store.files import explain_os_error
from actstore.store.harvests import choose_site, harvest_model_label
from actstore.store.root import Store
from actstore.transforms.models import pick_device
from actstore.transforms.sae import SAE, check_compatible


def sparse_chunk(sae: SAE, x: torch.Tensor, first_tok: int, batch_tokens: int) -> tuple[np.ndarray, ...]:
    """Encode rows `x` (tok = first_tok + row) in batches; the non-zero (feature, tok, value) triples."""
    features, toks, values = [], [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch_tokens):
            latents = sae.encode(x[start : start + batch_tokens])
            rows, cols = torch.nonzero(latents, as_tuple=True)
            features.append(cols.to(torch.int32).cpu().numpy())
            toks.append((rows + (first_tok + start)).cpu().numpy())
            values.append(latents[rows, cols].float().cpu().numpy())
    return np.concatenate(features), np.concatenate(toks), np.concatenate(values)


@task(name="encode-chunks")
def encode_chunks(store_root: str, config: EncodeConfig, runtime: EncodeRuntime) -> dict[str, Any]:
    """Encode every chunk not yet stored; returns this run's timing figures."""
    return _encode(store_root, config, runtime, None)


def encode_shard(
    store_root: str, config: EncodeConfig, runtime: EncodeRuntime, chunks: tuple[int, ...]
) -> dict[str, Any]:
    """Encode the chunks of one shard not yet stored (one task of a scaled-out encode; chunk files are
    written atomically, so disjoint shards run at once and a killed shard is simply re-run)."""
    return _encode(store_root, config, runtime, chunks)


def _encode(
    store_root: str, config: EncodeConfig, runtime: EncodeRuntime, chunks: tuple[int, ...] | None
) -> dict[str, Any]:
    store = Store(store_root)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device = pick_device(runtime.device)
    _, acts, sae = sae_on_site(store, config.sae_id, config.harvest_id, config.site, device, runtime.allow_mismatch)
    directory = store.features_dir(config.sae_id, config.harvest_id)
    n_chunks = -(-len(acts) // acts.chunk_tokens)
    shard = None if chunks is None else f"{chunks[0]:08d}-{chunks[-1]:08d}"
    start = time.perf_counter()
    encode_seconds = 0.0
    try:
        with feature_writer(directory, sae.d_sae, len(acts), config, shard) as features:
            if features.finished:
                return {"encode_seconds": 0.0, "run_seconds": 0.0, "tokens_this_run": 0}
            todo = [c for c in (range(n_chunks) if chunks is None else chunks) if not features.has_chunk(c)]
            spans = [chunk_rows(c, acts.chunk_tokens, len(acts)) for c in todo]
            tokens = sum(r.stop - r.start for r in spans)
            total = (
                len(acts)
                if chunks is None
                else sum(r.stop - r.start for r in (chunk_rows(c, acts.chunk_tokens, len(acts)) for c in chunks))
            )
            bar = tqdm(
                total=total,
                initial=total - tokens,
                unit="tok",
                unit_scale=True,
                desc=f"encode {config.sae_id}",
                disable=not runtime.progress,
            )

            def write(item: tuple[int, tuple[np.ndarray, ...]]) -> None:
                features.add_chunk(item[0], *item[1])

            with BackgroundWriter(write, max_pending=2) as writer:
                for chunk, rows in zip(todo, spans, strict=True):
                    x = torch.as_tensor(acts[rows]).to(device)
                    if not torch.isfinite(x).all():
                        bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0]) + rows.start
                        raise UserError(
                            f"non-finite activation at tok {bad} of {config.harvest_id}/{config.site}: "
                            "re-harvest in float32 or bfloat16; chunks already encoded are kept"
                        )
                    tick = time.perf_counter()
                    triples = sparse_chunk(sae, x, rows.start, runtime.batch_tokens)
                    encode_seconds += time.perf_counter() - tick
                    writer.submit((chunk, triples))
                    bar.update(len(x))
            bar.close()
    except OSError as exc:
        raise explain_os_error(exc, directory) from exc
    seconds = time.perf_counter() - start
    return {
        "encode_seconds": round(encode_seconds, 3),
        **run_figures(tokens, seconds),
        "device": str(device),
        "pid": os.getpid(),
    }


def feature_writer(
    directory: Path, d_sae: int, n_tokens: int, config: EncodeConfig, shard: str | None = None
) -> FeatureWriter:
    """The writer of one feature store; the chunk loop and the final sort must open it with the same settings."""
    return FeatureWriter(directory, d_sae, n_tokens, config.value_dtype, top_k=config.top_k, shard=shard)


@task(name="finish-features")
def finish_features(store_root: str, config: EncodeConfig, stats: dict[str, Any]) -> Manifest:
    """Sort the stored chunks into the feature tables, then publish the manifest."""
    store = Store(store_root)
    acts = store.activations(config.harvest_id, config.site)
    sae_manifest = store.manifest("sae", config.sae_id)
    start = time.perf_counter()
    with store.object("features", f"{config.sae_id}/{config.harvest_id}").publish(config, staged=False) as pub:
        with feature_writer(pub.directory, sae_manifest.counts["d_sae"], len(acts), config) as features:
            if not features.finished:
                features.finish(-(-len(acts) // acts.chunk_tokens))
        index = read_index(pub.directory)
        assert index is not None
        pub.counts = {
            "n_tokens": index.config.n_tokens,
            "nnz": index.nnz,
            "alive": index.alive,
            "d_sae": index.config.d_sae,
            "n_chunks": index.n_chunks,
        }
        pub.timings = numeric(stats) | {"finish_seconds": round(time.perf_counter() - start, 3)}
        pub.extra = {"site": config.site, "value_dtype": config.value_dtype}
    return pub.manifest


@task(name="prepare-encode")
def prepare_encode(
    store_root: str, sae: str, harvest_id: str, site: str | None, value_dtype: str, allow_mismatch: bool
) -> EncodeConfig:
    """Check the SAE against the harvest before anything is written, then import it into the store."""
    store = Store(store_root)
    harvest = store.manifest("harvest", harvest_id)
    model, known_id = open_sae(store_root, sae)
    chosen = choose_site(harvest, site, model.hook_name)
    acts = store.activations(harvest_id, chosen)
    check_compatible(model, acts.attrs.d, chosen, harvest_model_label(harvest), allow_mismatch)
    sae_id = stored_sae_id(store_root, sae, model, known_id)
    return EncodeConfig(sae_id=sae_id, harvest_id=harvest_id, site=chosen, value_dtype=value_dtype)  # type: ignore[arg-type]


@flow(name="encode")
def encode(
    store_root: str,
    sae: str,
    harvest_id: str,
    site: str | None = None,
    value_dtype: str = "float16",
    runtime: EncodeRuntime | None = None,
) -> Manifest:
    """SAE (id or checkpoint path) x harvest -> sparse feature tables; re-running resumes, never duplicates."""
    runtime = runtime or EncodeRuntime()
    config = prepare_encode(store_root, sae, harvest_id, site, value_dtype, runtime.allow_mismatch)
    existing = Store(store_root).published("features", f"{config.sae_id}/{harvest_id}")
    if existing is not None:
        if existing.config != config.model_dump(mode="json"):
            raise MismatchError(
                f"features of {config.sae_id} on {harvest_id} exist for site {existing.extra['site']}: "
                "delete that directory to encode another site"
            )
        return existing
    stats = encode_chunks(store_root, config, runtime)
    return finish_features(store_root, config, stats)
