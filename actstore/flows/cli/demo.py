"""`make demo`: the main job on the embedded default, sized to finish in about ten minutes on 2 CPU cores.

ingest pydocs -> harvest a middle layer's resid_post with per-token loss -> train a TopK SAE on it ->
encode the harvest into the sparse-feature store -> evaluate the SAE (reconstruction and spliced CE loss) ->
the same harvest, training and evaluation on a randomized-weights copy of the model, the control that says
how much of the SAE's numbers come from what the model learned -> harvest gradients of the loss on a few windows
and attribute the loss to the SAE's features -> render the feature dashboard -> print the two evaluations side
by side, the attribution, a forecast of the loss at longer context fitted on the loss per position, real top
examples of a few features, and the dashboard's path.
"""

from typing import Any

import numpy as np
import polars as pl

from actstore.flows.attribute import attribute, attribution_dir
from actstore.flows.cli.forecast import demo_forecast
from actstore.flows.dashboard.flow import dashboard
from actstore.flows.encode import encode
from actstore.flows.eval import evaluate
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.runtime import cached_model, flow
from actstore.flows.train import train
from actstore.schemas.attribution import AttributeRuntime
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.encode import EncodeRuntime
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig, ModelControl
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.store.root import Store
from actstore.transforms.models import load_tokenizer, pick_device
from actstore.transforms.sites import n_layers

CTX_LEN = 128
CE_TOKENS = 2048
"""Holdout tokens of spliced-SAE loss per evaluation: four full forwards each, ~15 s on 2 cores."""
CONTROL = ModelControl(kind="reinit", seed=0)
ATTRIBUTION_TOKENS = 4096
"""Tokens harvested with gradients of the next-token loss (a forward and a backward), for one attribution."""


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
    sae_train = TrainConfig(
        architecture="topk",
        expansion_factor=4,
        k=32,
        total_tokens=train_tokens,
        batch_size=4096,
        lr=1e-3,
        warmup_steps=10,
        device=str(pick_device(device)),
    )
    sae = train(store_root, TrainRun(harvest_id=harvested.id, site=site, train=sae_train, checkpoint_every=25))
    features = encode(store_root, sae.id, harvested.id, site, runtime=EncodeRuntime(device=device))
    evaluated = evaluate(
        store_root,
        EvalConfig(sae_id=sae.id, harvest_id=harvested.id, site=site, ce_tokens=CE_TOKENS),
        EvalRuntime(device=device),
    )
    control_cfg = HarvestConfig.model_validate(
        {**config.model_dump(), "loss": False, "model": ModelConfig(control=CONTROL)}
    )
    control = harvest(store_root, control_cfg, HarvestRuntime(device=device))
    control_sae = train(store_root, TrainRun(harvest_id=control.id, site=site, train=sae_train, checkpoint_every=25))
    control_eval = evaluate(
        store_root,
        EvalConfig(sae_id=control_sae.id, harvest_id=control.id, site=site, ce_tokens=CE_TOKENS),
        EvalRuntime(device=device),
    )
    gradient_cfg = HarvestConfig.model_validate(
        {**config.model_dump(), "gradient_metric": "loss", "max_tokens": ATTRIBUTION_TOKENS}
    )
    gradients = harvest(store_root, gradient_cfg, HarvestRuntime(device=device))
    attributed = attribute(store_root, sae.id, gradients.id, site=site, runtime=AttributeRuntime(device=device))
    site_dir = dashboard(store_root, sae.id, harvested.id, device=device)
    return {
        "corpus_id": corpus.id,
        "harvest_id": harvested.id,
        "site": site,
        "sae_id": sae.id,
        "dashboard": str(site_dir / "index.html"),
        "gradient_harvest_id": gradients.id,
        "attribution": attributed.extra,
        "n_tokens": harvested.counts["n_tokens"],
        "tokens_per_s": harvested.timings.get("tokens_per_s"),
        "eval_id": evaluated.id,
        "eval": evaluated.extra["summary"],
        "control_harvest_id": control.id,
        "control_sae_id": control_sae.id,
        "control_eval_id": control_eval.id,
        "control_eval": control_eval.extra["summary"],
        "nnz": features.counts["nnz"],
        "alive": features.counts["alive"],
    }


def print_evaluations(real: dict[str, Any], control: dict[str, Any]) -> None:
    """The SAE's headline numbers next to the same SAE trained on the randomized-weights control."""
    print(
        f"\n  SAE evaluation on {real['tokens']:,} holdout tokens (BOS excluded), downstream loss on "
        f"{real.get('ce_tokens', 0):,}:"
    )
    print(f"    {'':28}{'smollm2-135m':>16}{'reinit control':>16}")
    rows = [
        ("L0", "l0", "{:.1f}"),
        ("explained variance", "explained_variance", "{:.3f}"),
        ("CE loss recovered (zero)", "ce_recovered_zero", "{:.3f}"),
        ("CE loss recovered (mean)", "ce_recovered_mean", "{:.3f}"),
        ("CE clean / spliced (nats)", None, ""),
        ("dead latents", "dead", "{:d}"),
    ]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{e['ce_clean']:.2f} / {e['ce_spliced']:.2f}" for e in (real, control)]
        else:
            cells = [fmt.format(e[key]) if e.get(key) is not None else "-" for e in (real, control)]
        print(f"    {label:28}{cells[0]:>16}{cells[1]:>16}")


def print_attribution(store: Store, sae_id: str, harvest_id: str, extra: dict[str, Any]) -> None:
    """Which features the next-token loss leans on most, and how much of x·g the SAE's error node holds."""
    sums, magnitude = extra["sum"], extra["abs_sum"]
    share = magnitude["error"] / max(magnitude["feature"] + magnitude["error"], 1e-12)
    print(f"\n  attribution of loss to features on {harvest_id} (f_i · W_dec[i]·∂loss/∂x, summed over tokens):")
    print(
        f"    features {sums['feature']:+.1f}, decoder bias {sums['bias']:+.1f}, error node {sums['error']:+.1f}"
        f" nats; the error node holds {share:.1%} of the absolute attribution"
    )
    directory = attribution_dir(store, sae_id, harvest_id)
    per_feature = pl.read_parquet(directory / "per_feature.parquet")
    logits = pl.read_parquet(directory / "logit_weights.parquet").select("feature", "positive_tokens")
    ranked = per_feature.join(logits, on="feature").sort("attribution_sum")
    for label, rows in (("lower the loss most", ranked.head(3)), ("raise it most", ranked.tail(3).reverse())):
        print(f"    features that {label}:")
        for row in rows.iter_rows(named=True):
            promoted = " ".join(repr(t) for t in row["positive_tokens"][:4])
            print(
                f"      {row['feature']:5d}  {row['attribution_sum']:+8.2f} over {row['count']:,} tokens; "
                f"promotes {promoted}"
            )


def run_demo(store_root: str, tokens: int, layer: int | None, device: str, train_tokens: int) -> dict[str, Any]:
    summary = demo_flow(store_root, tokens, layer, device, train_tokens)
    store = Store(store_root)
    hid, site, sid = summary["harvest_id"], summary["site"], summary["sae_id"]
    acts, loss = store.activations(hid, site), store.activations(hid, "loss")
    losses = np.asarray(loss[:], dtype=np.float32)
    splits = store.tokens(summary["corpus_id"]).group_by("split").len().collect().sort("split")
    ev = summary["eval"]
    print(f"\nstore {store.root.resolve()}")
    print(
        f"  corpus   {summary['corpus_id']}: {summary['n_tokens']:,} tokens in windows of {CTX_LEN} ("
        + ", ".join(f"{r['split']} {r['len']:,}" for r in splits.iter_rows(named=True))
        + ")"
    )
    print(
        f"  harvest  {hid}: {site} {acts.shape} {acts.dtype} + loss; {summary['tokens_per_s']} tokens/s; "
        f"mean next-token loss {np.nanmean(losses):.3f} nats"
    )
    print(f"  sae      {sid}")
    print(f"  features {summary['nnz']:,} non-zeros, {summary['alive']:,} features alive")
    print_evaluations(ev, summary["control_eval"])

    print_attribution(store, sid, summary["gradient_harvest_id"], summary["attribution"])
    print("\n" + "\n".join(demo_forecast(store_root, hid)))

    tokenizer = load_tokenizer(ModelConfig())
    queries = store.features(sid, hid, decode=lambda ids: tokenizer.decode(list(ids)))
    # Features of middling density whose strongest example sits past the first token (position 1 right after
    # BOS carries outlier norms that top the ranking of many features), in order of density.
    candidates = (
        queries.density()
        .filter(pl.col("density").is_between(0.002, 0.02))
        .sort("density", descending=True)
        .collect()["feature"]
        .to_list()
    )
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
    print(
        "\nread it back:\n"
        "  import store\n"
        f"  s = store.open({str(store.root)!r})\n"
        f"  s.tokens({summary['corpus_id']!r})                      # polars LazyFrame\n"
        f"  s.activations({hid!r}, {site!r})[0:4096]\n"
        f"  s.features({sid!r}, {hid!r}).top_examples(FEATURE).collect()\n"
        f"  actstore query --store {store_root} --sae {sid} --harvest {hid} top FEATURE\n"
        f"  actstore eval --store {store_root} --sae {sid} --harvest {hid}"
    )
    print(f"\ndashboard: {summary['dashboard']}")
    return summary
