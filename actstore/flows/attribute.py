"""`actstore attribute`: attribution patching of an SAE's features from a gradient harvest, stored with its features.

The story: `prepare_attribute` checks the harvest's gradients and the SAE before anything is written (a checkpoint
given by path is imported only then), `attribute_features` streams activations and gradients chunk by chunk
through the SAE into a feature-store layout of attributions and a per-token table of the error node, folds the
sorted attributions into per-feature rows, writes each feature's direct logit attribution, and the manifest last.
Everything is built in a staged directory (`store/features/<sae_id>/<harvest_id>/attribution/`, see
schemas/attribution.py) and renamed into place: a killed run leaves nothing to read and a re-run starts over;
a finished one is returned as is. No encode of the same SAE and harvest is needed first.
"""

import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from actstore.flows.runtime import cached_model, flow, task
from actstore.flows.saes import open_sae, sae_on_site, stored_sae_id
from actstore.schemas.attribution import (
    LOGIT_WEIGHTS_NAME,
    LOGIT_WEIGHTS_SCHEMA,
    PER_FEATURE_NAME,
    PER_FEATURE_SCHEMA,
    PER_TOKEN_NAME,
    PER_TOKEN_SCHEMA,
    AttributeConfig,
    AttributeRuntime,
)
from actstore.schemas.errors import UserError
from actstore.schemas.harvest import gradient_array
from actstore.schemas.manifest import Manifest
from actstore.store.activations import LOSS_SITE, ActivationArray, chunk_rows
from actstore.store.evals import TableAppender, write_table
from actstore.store.features import FeatureWriter, read_index
from actstore.store.files import read_manifest
from actstore.store.harvests import choose_site, harvest_model, harvest_model_label
from actstore.store.root import Store
from actstore.transforms.attribution import attribute_batch, unit_directions
from actstore.transforms.logit_weights import top_tokens, unembedding
from actstore.transforms.models import load_tokenizer, pick_device
from actstore.transforms.sae import SAE, check_compatible

TERMS = ("feature", "bias", "error", "total")
"""The parts of x.g that the per-token table holds and the manifest sums."""


def attribution_dir(store: Store, sae_id: str, harvest_id: str) -> Path:
    """Where the attribution of an SAE on a harvest lives: inside that pair's feature store directory."""
    return store.object_dir("attribution", f"{sae_id}/{harvest_id}")


@task(name="prepare-attribute")
def prepare_attribute(
    store_root: str, sae: str, harvest_id: str, site: str | None, top_k: int, logit_k: int, allow_mismatch: bool
) -> AttributeConfig:
    """Check the harvest's gradients and the SAE before anything is written, then import the SAE into the store."""
    store = Store(store_root)
    harvest = store.manifest("harvest", harvest_id)
    metric = harvest.config.get("gradient_metric")
    if metric is None:
        raise UserError(
            f"harvest {harvest_id} stores no gradients: re-harvest with --gradients loss (or "
            "--gradients logit_diff --logit-diff A B) to attribute features"
        )
    model, known_id = open_sae(store_root, sae)
    chosen = choose_site(harvest, site, model.hook_name, gradients=True)
    acts = store.activations(harvest_id, chosen)
    check_compatible(model, acts.attrs.d, chosen, harvest_model_label(harvest), allow_mismatch)
    tokens = harvest.config.get("logit_diff_tokens")
    return AttributeConfig(
        sae_id=stored_sae_id(store_root, sae, model, known_id),
        harvest_id=harvest_id,
        site=chosen,
        metric=metric,
        logit_diff_tokens=tuple(tokens) if tokens else None,
        top_k=top_k,
        logit_k=logit_k,
    )


def attribution_pass(
    acts: ActivationArray,
    grads: ActivationArray,
    loss: ActivationArray,
    sae: SAE,
    tmp: Path,
    config: AttributeConfig,
    runtime: AttributeRuntime,
) -> dict[str, dict[str, float]]:
    """Stream every chunk through the SAE: attributions of active features into a feature-store layout, one
    per-token row each; returns the sums (and absolute sums) of each term of x.g over all tokens."""
    n_chunks = -(-len(acts) // acts.chunk_tokens)
    sums = {"sum": dict.fromkeys(TERMS, 0.0), "abs_sum": dict.fromkeys(TERMS, 0.0)}
    bar = tqdm(
        total=len(acts), unit="tok", unit_scale=True, desc=f"attribute {config.sae_id}", disable=not runtime.progress
    )
    with (
        FeatureWriter(tmp, sae.d_sae, len(acts), "float32", top_k=config.top_k) as features,
        TableAppender(tmp / PER_TOKEN_NAME, PER_TOKEN_SCHEMA) as per_token,
    ):
        for chunk in range(n_chunks):
            rows = chunk_rows(chunk, acts.chunk_tokens, len(acts))
            x = torch.as_tensor(acts[rows]).to(sae.device)
            g = torch.as_tensor(grads[rows]).to(sae.device)
            if not (torch.isfinite(x).all() and torch.isfinite(g).all()):
                bad = int((~(torch.isfinite(x) & torch.isfinite(g))).any(dim=1).nonzero()[0, 0]) + rows.start
                raise UserError(
                    f"non-finite activation or gradient at tok {bad} of {config.harvest_id}/{config.site}:"
                    " re-harvest in float32 or bfloat16"
                )
            triples, columns = _attribute_chunk(sae, x, g, rows.start, runtime.batch_tokens)
            features.add_chunk(chunk, *triples)
            chunk_loss = np.asarray(loss[rows], dtype=np.float32)
            per_token.append(
                {
                    "tok": np.arange(rows.start, rows.stop, dtype=np.int64),
                    "loss": pa.array(chunk_loss, mask=np.isnan(chunk_loss)),
                    **columns,
                }
            )
            for term in TERMS:
                values = columns[f"{term}_attribution"].astype(np.float64)
                sums["sum"][term] += float(values.sum())
                sums["abs_sum"][term] += float(np.abs(values).sum())
            bar.update(len(x))
        features.finish(n_chunks)
    bar.close()
    return sums


def _attribute_chunk(
    sae: SAE, x: torch.Tensor, g: torch.Tensor, first_tok: int, batch_tokens: int
) -> tuple[tuple[np.ndarray, ...], dict[str, np.ndarray]]:
    """The (feature, tok, attribution) triples of the active latents of rows `x`, and the per-token columns."""
    features, toks, values = [], [], []
    columns: dict[str, list[np.ndarray]] = {name: [] for name in ("l0", *(f"{t}_attribution" for t in TERMS))}
    for start in range(0, len(x), batch_tokens):
        part = attribute_batch(sae, x[start : start + batch_tokens], g[start : start + batch_tokens])
        rows, cols = torch.nonzero(part.latents, as_tuple=True)
        features.append(cols.to(torch.int32).cpu().numpy())
        toks.append((rows + first_tok + start).cpu().numpy())
        values.append(part.attribution[rows, cols].cpu().numpy())
        active = part.latents != 0
        columns["l0"].append(active.sum(dim=-1).to(torch.int32).cpu().numpy())
        columns["feature_attribution"].append(part.attribution.sum(dim=-1).cpu().numpy())
        for term, value in (("bias", part.bias), ("error", part.error), ("total", part.total)):
            columns[f"{term}_attribution"].append(value.cpu().numpy())
    return (
        (np.concatenate(features), np.concatenate(toks), np.concatenate(values)),
        {name: np.concatenate(parts) for name, parts in columns.items()},
    )


def write_per_feature(tmp: Path, top_k: int) -> None:
    """Fold the feature-sorted attributions into one row per feature, a by_feature part at a time."""
    index = read_index(tmp)
    assert index is not None
    value = pl.col("value").cast(pl.Float64)
    by_magnitude = {"by": [pl.col("value").abs(), pl.col("tok")], "descending": [True, False]}
    with TableAppender(tmp / PER_FEATURE_NAME, PER_FEATURE_SCHEMA) as table:
        for part in index.by_feature:
            stats = (
                pl.scan_parquet(tmp / part.file)
                .group_by("feature")
                .agg(
                    pl.len().alias("count"),
                    value.sum().alias("attribution_sum"),
                    value.mean().alias("attribution_mean"),
                    value.abs().mean().alias("attribution_abs_mean"),
                    pl.col("value").min().alias("attribution_min"),
                    pl.col("value").max().alias("attribution_max"),
                    pl.col("tok").sort_by(**by_magnitude).head(top_k).alias("top_tok"),
                    pl.col("value").sort_by(**by_magnitude).head(top_k).alias("top_attribution"),
                )
            )
            every = pl.LazyFrame({"feature": np.arange(part.start, part.stop, dtype=np.int32)})
            rows = (
                every.join(stats, on="feature", how="left")
                .sort("feature")
                .collect()
                .with_columns(
                    pl.col("count").fill_null(0),
                    pl.col("attribution_sum").fill_null(0.0),
                    pl.col("top_tok").fill_null([]),
                    pl.col("top_attribution").fill_null([]),
                )
            )
            # Scalars go over as Arrow so a dead feature's null mean stays null; lists as Python lists, whose
            # items the schema declares non-null (polars' list items are nullable, which Arrow will not cast).
            table.append(
                {
                    name: rows[name].to_list() if name.startswith("top_") else rows[name].to_arrow()
                    for name in PER_FEATURE_SCHEMA.names
                }
            )


def write_logit_weights(tmp: Path, harvest: Manifest, sae: SAE, k: int, device: torch.device) -> bool:
    """Each feature's most promoted and suppressed tokens through the unembedding; False (no table) when the site's
    width is not the model's d_model, as then the SAE's directions have no direct path to the logits."""
    model_config = harvest_model(harvest)
    w_u = unembedding(cached_model(model_config, str(device)))
    if w_u.shape[0] != sae.d_in:
        return False
    top = top_tokens(unit_directions(sae).cpu(), w_u, k=k)
    ids = torch.cat([top.positive_ids.reshape(-1), top.negative_ids.reshape(-1)]).unique().tolist()
    tokenizer = load_tokenizer(model_config)
    known = [i for i in ids if i < len(tokenizer)]
    text = dict(zip(known, tokenizer.batch_decode([[i] for i in known]), strict=True))

    def strings(token_ids: torch.Tensor) -> list[list[str]]:
        return [[text.get(i, "") for i in row] for row in token_ids.tolist()]

    write_table(
        tmp / LOGIT_WEIGHTS_NAME,
        {
            "feature": np.arange(sae.d_sae, dtype=np.int32),
            "positive_ids": top.positive_ids.tolist(),
            "positive_tokens": strings(top.positive_ids),
            "positive_logits": top.positive_values.tolist(),
            "negative_ids": top.negative_ids.tolist(),
            "negative_tokens": strings(top.negative_ids),
            "negative_logits": top.negative_values.tolist(),
        },
        LOGIT_WEIGHTS_SCHEMA,
    )
    return True


@task(name="attribute-features")
def attribute_features(store_root: str, config: AttributeConfig, runtime: AttributeRuntime) -> Manifest:
    """Compute and publish one attribution."""
    store = Store(store_root)
    device = pick_device(runtime.device)
    harvest, acts, sae = sae_on_site(
        store, config.sae_id, config.harvest_id, config.site, device, runtime.allow_mismatch
    )
    grads = store.activations(config.harvest_id, gradient_array(config.site))
    loss = store.activations(config.harvest_id, LOSS_SITE)
    start = time.perf_counter()
    with store.object("attribution", f"{config.sae_id}/{config.harvest_id}").publish(config) as pub:
        sums = attribution_pass(acts, grads, loss, sae, pub.directory, config, runtime)
        pass_seconds = time.perf_counter() - start
        write_per_feature(pub.directory, config.top_k)
        has_logit_weights = write_logit_weights(pub.directory, harvest, sae, config.logit_k, device)
        index = read_index(pub.directory)
        assert index is not None
        pub.timings = {
            "attribution_seconds": round(pass_seconds, 3),
            "total_seconds": round(time.perf_counter() - start, 3),
            "tokens_per_s": round(len(acts) / pass_seconds, 1) if pass_seconds else 0.0,
        }
        pub.counts = {"n_tokens": len(acts), "nnz": index.nnz, "alive": index.alive, "d_sae": sae.d_sae}
        pub.extra = {
            "site": config.site,
            "metric": config.metric,
            **sums,
            "logit_weights": has_logit_weights,
            "device": str(device),
        }
    return pub.manifest


@flow(name="attribute")
def attribute(
    store_root: str,
    sae: str,
    harvest_id: str,
    site: str | None = None,
    top_k: int = 32,
    logit_k: int = 10,
    runtime: AttributeRuntime | None = None,
) -> Manifest:
    """SAE (id or checkpoint path) x gradient harvest -> attribution tables; a finished one is returned as is."""
    runtime = runtime or AttributeRuntime()
    config = prepare_attribute(store_root, sae, harvest_id, site, top_k, logit_k, runtime.allow_mismatch)
    store = Store(store_root)
    encoded = read_manifest(store.features_dir(config.sae_id, harvest_id))
    if encoded is not None and encoded.extra.get("site") != config.site:
        raise UserError(
            f"features of {config.sae_id} on {harvest_id} are of site {encoded.extra.get('site')}, not "
            f"{config.site}: attribute that site (--site {encoded.extra.get('site')})"
        )
    directory = attribution_dir(store, config.sae_id, harvest_id)
    existing = store.published("attribution", f"{config.sae_id}/{harvest_id}")
    if existing is not None:
        if existing.config != config.model_dump(mode="json"):
            raise UserError(
                f"an attribution of {config.sae_id} on {harvest_id} exists with other settings "
                f"(site {existing.extra['site']}): delete {directory} to recompute it"
            )
        return existing
    return attribute_features(store_root, config, runtime)
