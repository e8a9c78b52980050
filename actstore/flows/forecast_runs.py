"""The run tables of a forecast, read from the store: per-harvest and per-position loss, SAE evaluations, N and D.

Mean losses carry a document bootstrap interval (`transforms.bootstrap.mean_with_interval` with the token
table's `doc` as groups): tokens of one document share topic and style, so resampling documents, not tokens,
gives an honest interval. A harvest's loss array and token columns are read whole (12 bytes a token); the
bootstraps draw about n_boot random indices per token (under a second per 100k tokens at n_boot=400).

N is counted without loading weights: the architecture is built from the checkpoint's config on the meta
device (a GGUF's config is read from its header, ~3 s for the embedded model instead of ~15 s to dequantize).
`total` counts every parameter once (tied embeddings once), as Hoffmann et al. (Chinchilla) do; `non_embedding`
leaves out every embedding table (token and position) and the unembedding, as Kaplan et al. do. The two differ
most for small models, where the vocabulary dominates (SmolLM2-135M: 28M of its 135M are the embedding).
"""

import functools
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from transformers import AutoModelForCausalLM

from actstore.schemas.errors import UserError
from actstore.schemas.forecast import ForecastConfig
from actstore.schemas.ids import slug
from actstore.schemas.model import ModelConfig
from actstore.store.activations import LOSS_SITE
from actstore.store.files import read_manifest
from actstore.store.harvests import harvest_model
from actstore.store.root import Store
from actstore.transforms.bootstrap import mean_with_interval
from actstore.transforms.models import load_model_config

EVAL_COLUMNS = (
    "eval_id",
    "sae_id",
    "harvest_id",
    "site",
    "split",
    "d_sae",
    "l0",
    "nmse",
    "fvu",
    "ce_clean",
    "ce_spliced",
)
"""Columns of the store's evaluation summaries that the SAE table keeps."""


class ParamCount(NamedTuple):
    """Parameters of a model's architecture."""

    total: int
    """Every parameter once (tied input and output embeddings count once): `sum(p.numel() for p in
    model.parameters())`."""
    non_embedding: int
    """`total` without embedding tables (token, position) and the output embedding (unembedding)."""


@functools.lru_cache(maxsize=32)
def count_parameters(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ParamCount:
    """Parameters of the model `name` (hub id, directory, .gguf file or the embedded default), weights unread."""
    model = ModelConfig(name=name, revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = load_model_config(model)
    except UserError as err:
        raise UserError(f"cannot count the parameters of model {name!r}: pass --params {slug(name)}=N ({err})") from err
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    embedding = {id(p) for m in net.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    output = net.get_output_embeddings()
    if output is not None:
        embedding |= {id(p) for p in output.parameters()}
    params = list(net.parameters())
    return ParamCount(
        total=sum(p.numel() for p in params), non_embedding=sum(p.numel() for p in params if id(p) not in embedding)
    )


def model_keys(model: ModelConfig) -> list[str]:
    """Keys that name this model in `params` / `tokens_trained`, most specific first."""
    names = [model.name, slug(model.name)]
    with_revision = [f"{n}@{model.revision}" for n in names] if model.revision else []
    return with_revision + names


def lookup(counts: dict[str, int], model: ModelConfig) -> int | None:
    """The count given for `model` (a checkpoint's `name@revision` before its `name`), or None."""
    return next((counts[key] for key in model_keys(model) if key in counts), None)


def model_facts(model: ModelConfig, config: ForecastConfig, notes: list[str]) -> dict[str, Any]:
    """N (given, else counted as the config says) and D for the runs table; an N that cannot be had is a note."""
    facts: dict[str, Any] = {"tokens_trained": lookup(config.tokens_trained, model)}
    given = lookup(config.params, model)
    if given is not None:
        return facts | {"n_params": given, "n_params_source": "given"}
    try:
        counted = count_parameters(model.name, model.revision, model.trust_remote_code)
    except UserError as err:
        notes.append(str(err))
        return facts
    return facts | {
        "n_params": getattr(counted, config.param_count),
        "n_params_total": counted.total,
        "n_params_non_embedding": counted.non_embedding,
        "n_params_source": config.param_count,
    }


def mean_loss(values: np.ndarray, docs: np.ndarray, config: ForecastConfig) -> dict[str, Any]:
    """Mean with a document bootstrap interval; the interval is null with one document (nothing to resample)."""
    n_docs = len(np.unique(docs))
    if n_docs < 2:
        return {"tokens": len(values), "docs": n_docs, "mean_loss": float(values.mean()), "low": None, "high": None}
    interval = mean_with_interval(values, docs, n_boot=config.n_boot, level=config.level, seed=config.seed)
    return {
        "tokens": len(values),
        "docs": n_docs,
        "mean_loss": interval.estimate,
        "low": interval.low,
        "high": interval.high,
    }


def harvest_tables(
    store: Store, harvest_id: str, config: ForecastConfig, notes: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One harvest's runs row and its positions rows."""
    harvest = store.manifest("harvest", harvest_id)
    corpus = store.manifest("corpus", harvest.extra["corpus_id"])
    ctx_len = int(harvest.extra["ctx_len"])
    loss = np.asarray(store.activations(harvest_id, LOSS_SITE)[:], dtype=np.float64)
    tokens = store.tokens(corpus.id).filter(pl.col("tok") < len(loss)).select("doc", "split").collect()
    chosen = np.isfinite(loss)
    if config.split != "all":
        chosen &= (tokens["split"].cast(pl.String) == config.split).to_numpy()
    if not chosen.any():
        raise UserError(f"harvest {harvest_id} has no {config.split} tokens with a loss: forecast with --split all")
    docs = tokens["doc"].to_numpy()
    model = harvest_model(harvest)
    run = {
        "harvest_id": harvest_id,
        "corpus_id": corpus.id,
        "model": model.name,
        "revision": model.revision,
        "control": model.control.tag() if model.control is not None else None,
        "ctx_len": ctx_len,
        **model_facts(model, config, notes),
        **mean_loss(loss[chosen], docs[chosen], config),
    }
    # With a BOS in front of every window, position p conditions on p corpus tokens; without one, on p + 1.
    has_bos = bool(corpus.config.get("add_bos", True)) and corpus.extra.get("bos_token_id") is not None
    by_pos = chosen.reshape(-1, ctx_len)
    loss_2d, docs_2d = loss.reshape(-1, ctx_len), docs.reshape(-1, ctx_len)
    positions = [
        {
            "harvest_id": harvest_id,
            "pos": pos,
            "context": pos + (0 if has_bos else 1),
            **mean_loss(loss_2d[by_pos[:, pos], pos], docs_2d[by_pos[:, pos], pos], config),
        }
        for pos in range(ctx_len)
        if by_pos[:, pos].any()
    ]
    return run, positions


def sae_rows(store: Store, eval_ids: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per evaluation: its summary numbers, the SAE's architecture and k, and the CE loss delta."""
    if not eval_ids:
        return []
    summaries = store.evals().filter(pl.col("eval_id").is_in(list(eval_ids))).select(EVAL_COLUMNS).collect()
    rows = []
    for row in summaries.sort("eval_id").iter_rows(named=True):
        architecture, k = sae_sparsity(store, row["sae_id"])
        delta = None if row["ce_spliced"] is None or row["ce_clean"] is None else row["ce_spliced"] - row["ce_clean"]
        rows.append({**row, "architecture": architecture, "k": k, "ce_delta": delta})
    return rows


def sae_sparsity(store: Store, sae_id: str) -> tuple[str | None, float | None]:
    """Architecture and configured k from the SAE's manifest: a trained SAE keeps them under `train`, an
    imported one at the top of its config. Both None when the SAE is no longer in the store."""
    manifest = read_manifest(store.sae_dir(sae_id))
    if manifest is None:
        return None, None
    config = manifest.config.get("train", manifest.config)
    k = config.get("k")
    return config.get("architecture"), None if k is None else float(k)
