"""`actstore transfer`: how two models' activations on the same tokens differ, and how their SAEs carry over.

The story: `check_pair` makes sure the two harvests hold the same tokens and sites; `compare_activations`
streams both arrays chunk by chunk (cosine and distance per token, global and per-position means, histograms);
each SAE is evaluated on its own model and on the other one by the eval flow (every metric, spliced CE
included), and `correlate_features` encodes both models' activations of the same tokens with it (per-feature
activation correlation, densities, logit-weight similarity); `publish_transfer` writes the tables.
"""

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from actstore.flows.eval import TokenPicker, evaluate
from actstore.flows.runtime import cached_model, flow, task
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.eval_tables import (
    FEATURE_TRANSFER_SCHEMA,
    HISTOGRAM_SCHEMA,
    SAE_TRANSFER_SCHEMA,
    TRANSFER_PER_POSITION_SCHEMA,
    TRANSFER_PER_TOKEN_SCHEMA,
    TRANSFER_SUMMARY_SCHEMA,
)
from actstore.schemas.manifest import Manifest
from actstore.schemas.transfer import TransferConfig
from actstore.store.activations import chunk_rows
from actstore.store.evals import TableAppender, write_table
from actstore.store.harvests import activation_sites, harvest_model
from actstore.store.root import Store
from actstore.transforms.logit_weights import unembedding
from actstore.transforms.models import pick_device
from actstore.transforms.sae import load
from actstore.transforms.transfer import (
    FeatureCorrelation,
    FeatureCorrelationResult,
    PairStats,
    log_density_correlation,
    logit_weight_similarity,
)

PER_TOKEN_PART = "per_token.parquet"


@task(name="check-pair")
def check_pair(store_root: str, config: TransferConfig) -> list[str]:
    """The sites to compare; refuses harvests of different corpora, token counts or sites."""
    store = Store(store_root)
    a, b = store.manifest("harvest", config.harvest_a), store.manifest("harvest", config.harvest_b)
    if a.extra["corpus_id"] != b.extra["corpus_id"] or a.counts["n_tokens"] != b.counts["n_tokens"]:
        raise UserError(
            f"harvests {config.harvest_a} and {config.harvest_b} hold different tokens (corpus "
            f"{a.extra['corpus_id']} x {a.counts['n_tokens']} vs {b.extra['corpus_id']} x "
            f"{b.counts['n_tokens']}): harvest both models on the same corpus and --max-tokens"
        )
    shared = [s for s in activation_sites(a) if s in activation_sites(b)]
    sites = list(config.sites) or shared
    missing = [s for s in sites if s not in shared]
    if missing or not sites:
        raise UserError(
            f"site {missing[0] if missing else '(none)'} is not in both harvests: choose from "
            f"{', '.join(shared) or 'nothing (they share no site)'}"
        )
    for site in sites:
        da, db = store.activations(config.harvest_a, site).attrs.d, store.activations(config.harvest_b, site).attrs.d
        if da != db:
            raise UserError(
                f"site {site} has width {da} in {config.harvest_a} but {db} in {config.harvest_b}: "
                "compare models of the same width"
            )
    return sites


@task(name="compare-activations")
def compare_activations(
    store_root: str, config: TransferConfig, site: str, out: str, progress: bool = True
) -> dict[str, Any]:
    """Cosine similarity and Euclidean distance of the two models' activations, every token of one site."""
    store = Store(store_root)
    a, b = store.activations(config.harvest_a, site), store.activations(config.harvest_b, site)
    stats = PairStats(ctx_len=a.attrs.ctx_len)
    bar = tqdm(total=len(a), unit="tok", unit_scale=True, desc=f"transfer {site}", disable=not progress)
    with TableAppender(Path(out), TRANSFER_PER_TOKEN_SCHEMA) as table:
        for chunk in range(-(-len(a) // a.chunk_tokens)):
            rows = chunk_rows(chunk, a.chunk_tokens, len(a))
            tok = np.arange(rows.start, rows.stop, dtype=np.int64)
            cosine, euclid = stats.update(tok, torch.as_tensor(a[rows]), torch.as_tensor(b[rows]))
            table.append({"site": [site] * len(tok), "tok": tok, "cosine": cosine, "euclid": euclid})
            bar.update(len(tok))
    bar.close()
    return {"result": stats.result(), "per_position": stats.per_position(), "histograms": stats.histograms()}


@task(name="correlate-features")
def correlate_features(
    store_root: str, config: TransferConfig, sae_id: str, site: str, own: str, other: str
) -> FeatureCorrelationResult:
    """One SAE on both models' activations of the same tokens: per-feature activation correlation."""
    store = Store(store_root)
    device = pick_device("auto")
    sae = load(store.sae_dir(sae_id), device=device)
    acts_own, acts_other = store.activations(own, site), store.activations(other, site)
    picker = TokenPicker(
        store, store.manifest("harvest", own).extra["corpus_id"], _eval_config(config, sae_id, own, site), len(acts_own)
    )
    corr = FeatureCorrelation(sae.d_sae)
    with torch.inference_mode():
        for chunk in range(-(-len(acts_own) // acts_own.chunk_tokens)):
            rows = chunk_rows(chunk, acts_own.chunk_tokens, len(acts_own))
            chosen = picker.pick(rows)
            offsets = chosen.rows[~chosen.excluded]
            if len(offsets):
                fa = sae.encode(torch.as_tensor(acts_own[rows])[offsets].to(device, sae.dtype))
                fb = sae.encode(torch.as_tensor(acts_other[rows])[offsets].to(device, sae.dtype))
                corr.update(fa, fb)
            if config.max_tokens is not None and picker.taken >= config.max_tokens:
                break
    return corr.result()


def _eval_config(config: TransferConfig, sae_id: str, harvest_id: str, site: str) -> EvalConfig:
    return EvalConfig(
        sae_id=sae_id,
        harvest_id=harvest_id,
        site=site,
        split=config.split,
        max_tokens=config.max_tokens,
        exclude_bos=config.exclude_bos,
        ce_tokens=config.ce_tokens,
    )


def _sae_site(store: Store, sae_id: str, sites: list[str]) -> str:
    hook = load(store.sae_dir(sae_id)).hook_name
    if hook in sites:
        return hook
    if len(sites) == 1:
        return sites[0]
    raise UserError(f"SAE {sae_id} reads {hook}, which is not among the compared sites {', '.join(sites)}: pass --site")


def _logit_cos(store: Store, sae_id: str, config: TransferConfig) -> np.ndarray | None:
    """Per-feature cosine of `W_dec[i]·W_U` under the two models' unembeddings; None for synthetic harvests."""
    harvests = [store.manifest("harvest", h) for h in (config.harvest_a, config.harvest_b)]
    if any(h.extra.get("synthetic", False) for h in harvests):
        return None
    device = str(pick_device("auto"))
    w_u = [unembedding(cached_model(harvest_model(h), device)) for h in harvests]
    if w_u[0].shape != w_u[1].shape:
        return None
    return logit_weight_similarity(load(store.sae_dir(sae_id)).W_dec.detach(), w_u[0], w_u[1]).numpy()


def transfer_saes(
    store_root: str, config: TransferConfig, sites: list[str], runtime: EvalRuntime
) -> tuple[list[dict[str, Any]], list[pl.DataFrame]]:
    """Evaluate each SAE on its own and the other model; per-feature transfer of each."""
    store = Store(store_root)
    rows: list[dict[str, Any]] = []
    features: list[pl.DataFrame] = []
    pairs = [
        (config.sae_a, config.harvest_a, config.harvest_b, "a"),
        (config.sae_b, config.harvest_b, config.harvest_a, "b"),
    ]
    for sae_id, own, other, side in pairs:
        if sae_id is None:
            continue
        site = _sae_site(store, sae_id, sites)
        mismatch = runtime.model_copy(update={"allow_mismatch": True})
        evals = {}
        for target, name in ((own, f"{side}_on_{side}"), (other, f"{side}_on_{'b' if side == 'a' else 'a'}")):
            manifest = evaluate(
                store_root, _eval_config(config, sae_id, target, site), runtime if target == own else mismatch
            )
            evals[name] = (manifest.id, store.eval_table(manifest.id, "per_feature").collect())
            summary = store.eval_table(manifest.id, "summary").collect().row(0, named=True)
            rows.append({**summary, "direction": name})
        (own_name, (_, own_f)), (_, (_, other_f)) = evals.items()
        density = log_density_correlation(
            own_f["count"].to_numpy(), other_f["count"].to_numpy(), _tokens(rows[-2]), _tokens(rows[-1])
        )
        for row in rows[-2:]:
            row["log_density_corr"] = 1.0 if row["direction"] == own_name else density
            if row.get("ce_spliced") is not None and row.get("ce_clean") is not None:
                row["ce_delta"] = row["ce_spliced"] - row["ce_clean"]
        corr = correlate_features(store_root, config, sae_id, site, own, other)
        logit_cos = _logit_cos(store, sae_id, config)
        features.append(
            pl.DataFrame(
                {
                    "sae_id": [sae_id] * len(own_f),
                    "feature": own_f["feature"],
                    "density_a": own_f["density"] if side == "a" else other_f["density"],
                    "density_b": other_f["density"] if side == "a" else own_f["density"],
                    "act_corr": corr.r,
                    "logit_cos": logit_cos,
                }
            )
        )
    return rows, features


def _tokens(row: dict[str, Any]) -> int:
    return int(row["tokens"])


@task(name="transfer-tables", cache_policy=NO_CACHE)
def write_transfer_tables(
    tmp: str,
    config: TransferConfig,
    compared: dict[str, dict[str, Any]],
    sae_rows: list[dict[str, Any]],
    features: list[pl.DataFrame],
) -> tuple[dict[str, int], dict[str, Any]]:
    """Summary, per-position, histogram, SAE and feature tables; returns the manifest's counts and extra."""
    directory = Path(tmp)
    summary, positions, histograms = [], [], []
    for site, found in compared.items():
        summary.append(
            {
                "transfer_id": config.transfer_id(),
                "harvest_a": config.harvest_a,
                "harvest_b": config.harvest_b,
                "site": site,
                **found["result"],
            }
        )
        positions.append(found["per_position"].with_columns(site=pl.lit(site)))
        for measure, hist in found["histograms"]._asdict().items():
            # values beyond the last edge are one more bin up to infinity, so counts always sum to the tokens
            edges = np.asarray(hist.edges, dtype=np.float64)
            lo, hi = edges, np.append(edges[1:], np.inf)
            counts = np.append(np.asarray(hist.counts, dtype=np.int64), int(hist.overflow))
            histograms.append(pl.DataFrame({"site": site, "measure": measure, "lo": lo, "hi": hi, "count": counts}))
    write_table(directory / "summary.parquet", summary, TRANSFER_SUMMARY_SCHEMA)
    write_table(
        directory / "per_position.parquet", pl.concat(positions).to_dict(as_series=False), TRANSFER_PER_POSITION_SCHEMA
    )
    write_table(directory / "histograms.parquet", pl.concat(histograms).to_dict(as_series=False), HISTOGRAM_SCHEMA)
    write_table(directory / "sae_transfer.parquet", sae_rows, SAE_TRANSFER_SCHEMA)
    feature_rows = pl.concat(features).to_dict(as_series=False) if features else {}
    write_table(
        directory / "feature_transfer.parquet",
        feature_rows or {f.name: [] for f in FEATURE_TRANSFER_SCHEMA},
        FEATURE_TRANSFER_SCHEMA,
    )
    return (
        {"sites": len(summary), "saes": len(features)},
        {
            "summary": summary,
            "sae_transfer": [
                {
                    k: r.get(k)
                    for k in (
                        "direction",
                        "sae_id",
                        "harvest_id",
                        "explained_variance",
                        "ce_recovered_zero",
                        "ce_delta",
                        "log_density_corr",
                    )
                }
                for r in sae_rows
            ],
        },
    )


@flow(name="transfer")
def transfer(store_root: str, config: TransferConfig, runtime: EvalRuntime | None = None) -> Manifest:
    """Two harvests (and their SAEs) -> transfer tables; a finished analysis is returned, not recomputed."""
    runtime = runtime or EvalRuntime()
    stored = Store(store_root).object("transfer", config.transfer_id())
    existing = stored.published()
    if existing is not None:
        return existing
    sites = check_pair(store_root, config)
    sae_rows, features = transfer_saes(store_root, config, sites, runtime)
    with stored.publish(config) as pub:
        tmp = pub.directory
        compared = {
            site: compare_activations(store_root, config, site, str(tmp / f"per_token-{i}.parquet"), runtime.progress)
            for i, site in enumerate(sites)
        }
        parts = [str(tmp / f"per_token-{i}.parquet") for i in range(len(sites))]
        pl.scan_parquet(parts).sink_parquet(tmp / PER_TOKEN_PART, compression="zstd")
        for part in parts:
            Path(part).unlink()
        pub.counts, pub.extra = write_transfer_tables(str(tmp), config, compared, sae_rows, features)
    return pub.manifest
