"""`make demo`: the main job on the embedded default, sized to finish in minutes on 2 CPU cores."""

from typing import Any

import numpy as np
from prefect import flow

from flows.harvest import cached_model, harvest
from flows.ingest import ingest
from schemas.corpus import CorpusConfig
from schemas.harvest import HarvestConfig, HarvestRuntime
from schemas.model import ModelConfig
from store.root import Store
from transforms.models import pick_device
from transforms.sites import n_layers

CTX_LEN = 128


@flow(name="demo")
def demo_flow(store_root: str, tokens: int, layer: int | None, device: str) -> dict[str, Any]:
    """Ingest pydocs with the embedded tokenizer, then harvest a middle layer's resid_post with per-token loss."""
    model_cfg = ModelConfig()
    corpus = ingest(store_root, CorpusConfig(source="pydocs", tokenizer=model_cfg, ctx_len=CTX_LEN, max_tokens=tokens))
    if layer is None:
        layer = n_layers(cached_model(model_cfg, str(pick_device(device)))) // 2
    config = HarvestConfig(corpus_id=corpus.id, model=model_cfg, sites=(f"blocks.{layer}.hook_resid_post",), loss=True)
    manifest = harvest(store_root, config, HarvestRuntime(device=device))
    return {"corpus_id": corpus.id, "harvest_id": manifest.id, "site": config.sites[0],
            "n_tokens": manifest.counts["n_tokens"], "tokens_per_s": manifest.timings.get("tokens_per_s")}


def run_demo(store_root: str, tokens: int, layer: int | None, device: str) -> dict[str, Any]:
    summary = demo_flow(store_root, tokens, layer, device)
    store = Store(store_root)
    acts = store.activations(summary["harvest_id"], summary["site"])
    loss = store.activations(summary["harvest_id"], "loss")
    first = np.asarray(acts[: acts.chunk_tokens], dtype=np.float32)
    losses = np.asarray(loss[:], dtype=np.float32)
    splits = store.tokens(summary["corpus_id"]).group_by("split").len().collect().sort("split")
    print(f"\nstore {store.root.resolve()}")
    print(f"  corpus  {summary['corpus_id']}: {summary['n_tokens']:,} tokens in windows of {CTX_LEN}, "
          + ", ".join(f"{r['split']} {r['len']:,}" for r in splits.iter_rows(named=True)))
    print(f"  harvest {summary['harvest_id']}: {summary['site']} {acts.shape} {acts.dtype}, "
          f"loss {loss.shape}; {summary['tokens_per_s']} tokens/s")
    norms = np.linalg.norm(first, axis=1)
    print(f"  mean next-token loss {np.nanmean(losses):.3f} nats; mean |resid| {norms.mean():.1f}")
    print("\nread it back:\n"
          "  import store\n"
          f"  s = store.open({str(store.root)!r})\n"
          f"  tokens = s.tokens({summary['corpus_id']!r}).collect()\n"
          f"  acts = s.activations({summary['harvest_id']!r}, {summary['site']!r})[0:4096]\n"
          f"  loss = s.activations({summary['harvest_id']!r}, 'loss')[:]")
    return summary
