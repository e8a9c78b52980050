"""`make demo`: the main job on the embedded default, sized to finish in about ten minutes on 2 CPU cores.

ingest pydocs -> harvest a middle layer's resid_post with per-token loss -> train a TopK SAE on it ->
encode the harvest into the sparse-feature store -> print what was written, the SAE's holdout numbers, and
real top examples of a few features.
"""

from typing import Any

import numpy as np
import polars as pl
from prefect import flow

from flows.encode import encode
from flows.harvest import cached_model, harvest
from flows.ingest import ingest
from flows.train import train
from schemas.corpus import CorpusConfig
from schemas.encode import EncodeRuntime
from schemas.harvest import HarvestConfig, HarvestRuntime
from schemas.model import ModelConfig
from schemas.train import TrainConfig
from schemas.train_run import TrainRun
from store.root import Store
from transforms.models import load_tokenizer, pick_device
from transforms.sites import n_layers

CTX_LEN = 128


@flow(name="demo")
def demo_flow(store_root: str, tokens: int, layer: int | None, device: str, train_tokens: int) -> dict[str, Any]:
    """Each step is skipped when its output already exists, so a re-run (or a killed run) resumes."""
    model_cfg = ModelConfig()
    corpus = ingest(store_root, CorpusConfig(source="pydocs", tokenizer=model_cfg, ctx_len=CTX_LEN, max_tokens=tokens))
    if layer is None:
        layer = n_layers(cached_model(model_cfg, str(pick_device(device)))) // 2
    site = f"blocks.{layer}.hook_resid_post"
    config = HarvestConfig(corpus_id=corpus.id, model=model_cfg, sites=(site,), loss=True)
    harvested = harvest(store_root, config, HarvestRuntime(device=device))
    sae_train = TrainConfig(architecture="topk", expansion_factor=4, k=32, total_tokens=train_tokens, batch_size=4096,
                            lr=1e-3, warmup_steps=10, device=str(pick_device(device)))
    sae = train(store_root, TrainRun(harvest_id=harvested.id, site=site, train=sae_train, checkpoint_every=25))
    features = encode(store_root, sae.id, harvested.id, site, runtime=EncodeRuntime(device=device))
    return {"corpus_id": corpus.id, "harvest_id": harvested.id, "site": site, "sae_id": sae.id,
            "n_tokens": harvested.counts["n_tokens"], "tokens_per_s": harvested.timings.get("tokens_per_s"),
            "eval": sae.extra["eval_holdout"], "nnz": features.counts["nnz"], "alive": features.counts["alive"]}


def run_demo(store_root: str, tokens: int, layer: int | None, device: str, train_tokens: int) -> dict[str, Any]:
    summary = demo_flow(store_root, tokens, layer, device, train_tokens)
    store = Store(store_root)
    hid, site, sid = summary["harvest_id"], summary["site"], summary["sae_id"]
    acts, loss = store.activations(hid, site), store.activations(hid, "loss")
    losses = np.asarray(loss[:], dtype=np.float32)
    splits = store.tokens(summary["corpus_id"]).group_by("split").len().collect().sort("split")
    ev = summary["eval"]
    print(f"\nstore {store.root.resolve()}")
    print(f"  corpus   {summary['corpus_id']}: {summary['n_tokens']:,} tokens in windows of {CTX_LEN} ("
          + ", ".join(f"{r['split']} {r['len']:,}" for r in splits.iter_rows(named=True)) + ")")
    print(f"  harvest  {hid}: {site} {acts.shape} {acts.dtype} + loss; {summary['tokens_per_s']} tokens/s; "
          f"mean next-token loss {np.nanmean(losses):.3f} nats")
    print(f"  sae      {sid}: holdout FVU {ev['fvu']:.3f} (explained {1 - ev['fvu']:.1%}), L0 {ev['l0']:.1f}, "
          f"dead {ev['dead']} on {ev['tokens']:,} holdout tokens")
    print(f"  features {summary['nnz']:,} non-zeros, {summary['alive']:,} features alive")

    tokenizer = load_tokenizer(ModelConfig())
    queries = store.features(sid, hid, decode=lambda ids: tokenizer.decode(list(ids)))
    # Features of middling density whose strongest example sits past the first token (position 1 right after
    # BOS carries outlier norms that top the ranking of many features), in order of density.
    candidates = (queries.density().filter(pl.col("density").is_between(0.002, 0.02))
                  .sort("density", descending=True).collect()["feature"].to_list())
    shown = 0
    for feature in candidates:
        top = queries.top_examples(feature, k=4, context=6).collect()
        if top.is_empty() or top["pos"][0] < 2:
            continue
        print(f"\n  feature {feature}: top examples (activating token in «»)")
        for row in top.iter_rows(named=True):
            text = row["context_text"].replace("\n", "⏎")
            print(f"    {row['value']:7.2f}  {text}")
        shown += 1
        if shown == 3:
            break
    print("\nread it back:\n"
          "  import store\n"
          f"  s = store.open({str(store.root)!r})\n"
          f"  s.tokens({summary['corpus_id']!r})                      # polars LazyFrame\n"
          f"  s.activations({hid!r}, {site!r})[0:4096]\n"
          f"  s.features({sid!r}, {hid!r}).top_examples(FEATURE).collect()\n"
          f"  actstore query --store {store_root} --sae {sid} --harvest {hid} top FEATURE")
    return summary
