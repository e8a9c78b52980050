"""`actstore eval`: an SAE's reconstruction, latent and downstream-loss numbers on a harvest, stored as Parquet.

The story: `reconstruction_pass` streams the split's activations through the SAE (float64 sums, per-token
rows appended to Parquet), `downstream_pass` splices the SAE (and zero / mean ablation) into the harvest's model
on the first windows of the split, and `publish_eval` joins the two per-token tables and writes the summary.
The whole result is built in a staged directory and renamed into place, so a killed run leaves nothing to read
and a re-run starts over; a finished one is returned as is.
"""

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from actstore.flows.directions import intervention_replacements
from actstore.flows.runtime import cached_model, flow, task
from actstore.flows.saes import sae_on_site
from actstore.schemas.directions import Intervention
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.eval_tables import (
    DENSITY_HISTOGRAM_SCHEMA,
    EVAL_SUMMARY_SCHEMA,
    PER_FEATURE_SCHEMA,
    PER_TOKEN_SCHEMA,
)
from actstore.schemas.manifest import Manifest
from actstore.store.activations import ActivationArray, chunk_rows
from actstore.store.evals import TableAppender, write_table
from actstore.store.harvests import harvest_model
from actstore.store.objects import Publication
from actstore.store.root import Store
from actstore.store.tokens import read_windows
from actstore.transforms.models import pick_device
from actstore.transforms.sae import SAE
from actstore.transforms.sae_eval import ReconstructionStats, density_histogram
from actstore.transforms.sites import resolve_sites
from actstore.transforms.splice import (
    Splice,
    ce_recovered,
    downstream,
    mean_replacement,
    sae_replacement,
    zero_replacement,
)

OUTLIER_SAMPLE_TOKENS = 65_536
"""Tokens whose median activation norm sets the outlier threshold (the first ones of the split, in order)."""

RECON_PART = "per_token_reconstruction.parquet"
CE_PART = "per_token_downstream.parquet"
CE_COLUMNS = ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl_spliced", "kl_zero", "kl_mean")
DOWNSTREAM_PART_SCHEMA = pa.schema([pa.field("tok", pa.int64()), *(pa.field(c, pa.float32()) for c in CE_COLUMNS)])


class Selection(NamedTuple):
    """Which tokens of one chunk are evaluated, and which of those are left out of the sums."""

    rows: np.ndarray
    """Row offsets inside the chunk."""
    pos: np.ndarray
    excluded: np.ndarray
    """BOS (when excluded) or outlier norm."""


class TokenPicker:
    """Tokens of the split in token order, capped at `max_tokens`, with BOS / outlier exclusion applied."""

    def __init__(self, store: Store, corpus_id: str, config: EvalConfig, n_tokens: int) -> None:
        self.tokens = store.tokens(corpus_id).filter(pl.col("tok") < n_tokens).select("tok", "pos", "split")
        self.config = config
        self.taken = 0
        self.norm_threshold: float | None = None

    def pick(self, rows: slice, x: torch.Tensor | None = None) -> Selection:
        frame = self.tokens.filter(pl.col("tok").is_between(rows.start, rows.stop - 1)).collect()
        keep = np.ones(len(frame), dtype=bool)
        if self.config.split != "all":
            keep &= (frame["split"].cast(pl.String) == self.config.split).to_numpy()
        offsets = np.flatnonzero(keep)
        if self.config.max_tokens is not None:
            offsets = offsets[: max(0, self.config.max_tokens - self.taken)]
        self.taken += len(offsets)
        pos = frame["pos"].to_numpy()[offsets].astype(np.int32)
        excluded = (pos == 0) if self.config.exclude_bos else np.zeros(len(offsets), dtype=bool)
        if self.norm_threshold is not None and x is not None:
            excluded |= (x[offsets].float().norm(dim=-1) > self.norm_threshold).numpy()
        return Selection(offsets, pos, excluded)


def _chunks(acts: ActivationArray) -> list[slice]:
    return [chunk_rows(c, acts.chunk_tokens, len(acts)) for c in range(-(-len(acts) // acts.chunk_tokens))]


def _outlier_threshold(acts: ActivationArray, picker: TokenPicker, factor: float) -> float:
    """`factor` x the median norm of the first OUTLIER_SAMPLE_TOKENS non-BOS tokens of the split."""
    norms: list[torch.Tensor] = []
    count = 0
    for rows in _chunks(acts):
        x = torch.as_tensor(acts[rows])
        chosen = picker.pick(rows)
        kept = chosen.rows[~chosen.excluded]
        norms.append(x[kept].float().norm(dim=-1))
        count += len(kept)
        if count >= OUTLIER_SAMPLE_TOKENS:
            break
    picker.taken = 0
    if count == 0:
        raise UserError(_empty_message(picker.config))
    return factor * float(torch.cat(norms)[:OUTLIER_SAMPLE_TOKENS].median())


def _empty_message(config: EvalConfig) -> str:
    return (
        f"harvest {config.harvest_id} has no {config.split} tokens to evaluate on: evaluate --split all "
        "or harvest more documents"
    )


def reconstruction_pass(
    acts: ActivationArray, sae: SAE, picker: TokenPicker, runtime: EvalRuntime, out: Path
) -> tuple[ReconstructionStats, torch.Tensor, int]:
    """Every chosen token through the SAE; returns the sums, the mean activation of the counted tokens (the
    mean-ablation value) and how many chosen tokens were excluded."""
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    excluded_count = 0
    bar = tqdm(total=len(acts), unit="tok", unit_scale=True, desc="eval reconstruction", disable=not runtime.progress)
    with TableAppender(out, PER_TOKEN_SCHEMA) as table, torch.inference_mode():
        for rows in _chunks(acts):
            x_all = torch.as_tensor(acts[rows])
            chosen = picker.pick(rows, x_all)
            for start in range(0, len(chosen.rows), runtime.batch_tokens):
                part = slice(start, start + runtime.batch_tokens)
                offsets, excluded = chosen.rows[part], chosen.excluded[part]
                x = x_all[offsets].to(sae.device, sae.dtype)
                if not torch.isfinite(x).all():
                    bad = int(offsets[int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])]) + rows.start
                    raise UserError(
                        f"non-finite activation at tok {bad} of {picker.config.harvest_id}/"
                        f"{picker.config.site}: re-harvest in float32 or bfloat16"
                    )
                latents = sae.encode(x)
                x_hat = sae.decode(latents, x.norm(dim=-1))
                counted = torch.from_numpy(~excluded).to(x.device)
                metrics = _token_metrics(stats, x, x_hat, latents, counted, sae)
                total += x[counted].to(torch.float64).sum(dim=0).cpu()
                excluded_count += int(excluded.sum())
                table.append({"tok": offsets + rows.start, "pos": chosen.pos[part], "excluded": excluded, **metrics})
            bar.update(rows.stop - rows.start)
            if picker.config.max_tokens is not None and picker.taken >= picker.config.max_tokens:
                break
    bar.close()
    counted_tokens = table.rows - excluded_count
    if counted_tokens == 0:
        raise UserError(_empty_message(picker.config))
    return stats, (total / counted_tokens).to(torch.float32), excluded_count


def _token_metrics(
    stats: ReconstructionStats,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    latents: torch.Tensor,
    counted: torch.Tensor,
    sae: SAE,
) -> dict[str, np.ndarray]:
    """Per-token metrics of every token; only counted ones enter `stats` (excluded ones go to a scratch copy)."""
    columns: dict[str, np.ndarray] = {}
    groups = [(counted, stats), (~counted, ReconstructionStats(sae.d_in, sae.d_sae))]
    for mask, target in groups:
        if not bool(mask.any()):
            continue
        values = target.update(x[mask], x_hat[mask], latents[mask])._asdict()
        for name, value in values.items():
            column = columns.setdefault(name, np.full(len(x), np.nan, dtype=np.float32))
            column[mask.cpu().numpy()] = np.asarray(value, dtype=np.float32)
    return columns


def downstream_pass(
    store: Store,
    harvest: Manifest,
    acts: ActivationArray,
    sae: SAE,
    config: EvalConfig,
    runtime: EvalRuntime,
    picker: TokenPicker,
    mean: torch.Tensor,
    out: Path,
) -> int:
    """CE and KL per token with the SAE spliced in (and zero / mean ablation) on the first windows of the split.

    Positions excluded from the metrics keep their clean activation in every variant and are left out of the
    means; the window's last position has no next token. Returns the tokens written."""
    ctx_len = int(harvest.extra["ctx_len"])
    device = pick_device(runtime.device)
    model = cached_model(harvest_model(harvest), str(device))
    specs = resolve_sites(model, [config.site])
    # a harvest made with interventions ran an intervened model: its clean forward here must be that same model
    interventions = tuple(Intervention.model_validate(i) for i in harvest.config.get("interventions", ()))
    targets = resolve_sites(model, sorted({s for i in interventions for s in i.sites}))
    fixed = Splice(model, targets)
    fixed.set(intervention_replacements(store, interventions, {t.name: t.d for t in targets}))
    corpus_dir = store.corpus_dir(harvest.extra["corpus_id"])
    variants = {
        "spliced": {config.site: sae_replacement(sae)},
        "zero": {config.site: zero_replacement()},
        "mean": {config.site: mean_replacement(mean)},
    }
    picker.taken = 0
    written = 0
    bar = tqdm(
        total=config.ce_tokens, unit="tok", unit_scale=True, desc="eval downstream", disable=not runtime.progress
    )
    with fixed, TableAppender(out, DOWNSTREAM_PART_SCHEMA) as table:
        seqs = _windows_of_split(acts, picker, ctx_len, config.ce_tokens)
        for start in range(0, len(seqs), runtime.ce_batch_windows):
            batch = seqs[start : start + runtime.ce_batch_windows]
            ids = np.concatenate([read_windows(corpus_dir, s, s + 1, ctx_len) for s in batch]).astype(np.int64)
            chosen, keep = _window_selection(acts, picker, batch, ctx_len)
            with torch.inference_mode():
                result = downstream(
                    model, specs, torch.from_numpy(ids).to(device), variants, keep=torch.from_numpy(keep).to(device)
                )
            flat_tok = (np.asarray(batch)[:, None] * ctx_len + np.arange(ctx_len)[None, :]).reshape(-1)
            counted = chosen & ~keep.reshape(-1)
            counted &= np.isfinite(result["clean"].ce.numpy())
            columns = {"tok": flat_tok[counted]}
            for name in ("clean", "spliced", "zero", "mean"):
                columns[f"ce_{name}"] = result[name].ce.numpy()[counted]
                if name != "clean":
                    columns[f"kl_{name}"] = result[name].kl.numpy()[counted]
            table.append(columns)
            written += int(counted.sum())
            bar.update(int(counted.sum()))
    bar.close()
    return written


def _windows_of_split(acts: ActivationArray, picker: TokenPicker, ctx_len: int, tokens: int) -> list[int]:
    """Window indices holding the first `tokens` chosen, non-excluded tokens."""
    seqs: list[int] = []
    count = 0
    for rows in _chunks(acts):
        chosen = picker.pick(rows, torch.as_tensor(acts[rows]) if picker.norm_threshold is not None else None)
        toks = chosen.rows[~chosen.excluded] + rows.start
        toks = toks[toks % ctx_len != ctx_len - 1]  # the last position of a window has no next token
        for seq in np.unique(toks // ctx_len):
            if count >= tokens:
                break
            seqs.append(int(seq))
            count += int((toks // ctx_len == seq).sum())
        if count >= tokens:
            break
    picker.taken = 0
    return seqs


def _window_selection(
    acts: ActivationArray, picker: TokenPicker, seqs: list[int], ctx_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """For whole windows: which tokens are chosen ([W*T] bool) and which keep their clean activation ([W, T])."""
    chosen = np.zeros((len(seqs), ctx_len), dtype=bool)
    keep = np.zeros((len(seqs), ctx_len), dtype=bool)
    split = picker.config.split
    for i, seq in enumerate(seqs):
        rows = slice(seq * ctx_len, (seq + 1) * ctx_len)
        frame = picker.tokens.filter(pl.col("tok").is_between(rows.start, rows.stop - 1)).collect()
        if split != "all":
            chosen[i] = (frame["split"].cast(pl.String) == split).to_numpy()
        else:
            chosen[i] = True
        if picker.config.exclude_bos:
            keep[i, 0] = True
        if picker.norm_threshold is not None:
            keep[i] |= (torch.as_tensor(acts[rows]).float().norm(dim=-1) > picker.norm_threshold).numpy()
    return chosen.reshape(-1), keep


def summarize(
    config: EvalConfig, stats: ReconstructionStats, d_sae: int, excluded: int, ce: pl.DataFrame | None
) -> dict[str, Any]:
    """The one summary row: reconstruction, latents and (when measured) downstream means."""
    row: dict[str, Any] = {
        "eval_id": config.eval_id(),
        "sae_id": config.sae_id,
        "harvest_id": config.harvest_id,
        "site": config.site,
        "split": config.split,
        "d_sae": d_sae,
        "excluded_tokens": excluded,
        **stats.result(),
    }
    if ce is not None and len(ce):
        means = {name: float(ce[name].mean()) for name in CE_COLUMNS}
        row.update(means, ce_tokens=len(ce))
        row["ce_recovered_zero"] = ce_recovered(means["ce_clean"], means["ce_spliced"], means["ce_zero"])
        row["ce_recovered_mean"] = ce_recovered(means["ce_clean"], means["ce_spliced"], means["ce_mean"])
    return row


@task(name="evaluate-sae")
def evaluate_sae(store_root: str, config: EvalConfig, runtime: EvalRuntime) -> Manifest:
    """Compute and publish one evaluation; bad input fails before anything is written."""
    store = Store(store_root)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    harvest, acts, sae = sae_on_site(
        store, config.sae_id, config.harvest_id, config.site, pick_device(runtime.device), runtime.allow_mismatch
    )
    downstream_possible = config.ce_tokens > 0 and not harvest.extra.get("synthetic", False)
    picker = TokenPicker(store, harvest.extra["corpus_id"], config, len(acts))
    if config.outlier_factor is not None:
        picker.norm_threshold = _outlier_threshold(acts, picker, config.outlier_factor)
    start = time.perf_counter()
    with store.object("eval", config.eval_id()).publish(config) as pub:
        tmp = pub.directory
        stats, mean, excluded = reconstruction_pass(acts, sae, picker, runtime, tmp / RECON_PART)
        recon_seconds = time.perf_counter() - start
        ce = None
        if downstream_possible:
            downstream_pass(store, harvest, acts, sae, config, runtime, picker, mean, tmp / CE_PART)
            ce = pl.read_parquet(tmp / CE_PART)
        _write_tables(
            pub,
            config,
            stats,
            sae.d_sae,
            excluded,
            ce,
            picker.norm_threshold,
            {"reconstruction_seconds": round(recon_seconds, 3), "total_seconds": round(time.perf_counter() - start, 3)},
        )
    return pub.manifest


def _write_tables(
    pub: Publication,
    config: EvalConfig,
    stats: ReconstructionStats,
    d_sae: int,
    excluded: int,
    ce: pl.DataFrame | None,
    threshold: float | None,
    timings: dict[str, float],
) -> None:
    """Per-token table (reconstruction joined to downstream), per-feature, histogram, summary, and what the
    manifest says of them."""
    tmp = pub.directory
    per_token = pl.scan_parquet(tmp / RECON_PART)
    if ce is not None:
        per_token = per_token.drop(*CE_COLUMNS).join(ce.lazy(), on="tok", how="left", maintain_order="left")
    per_token.select(PER_TOKEN_SCHEMA.names).sink_parquet(tmp / "per_token.parquet", compression="zstd")
    (tmp / RECON_PART).unlink()
    (tmp / CE_PART).unlink(missing_ok=True)
    tokens = int(stats.result()["tokens"])
    counts = np.asarray(stats.feature_counts, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_value = np.where(counts > 0, stats.feature_value_sums / np.maximum(counts, 1), np.nan)
    write_table(
        tmp / "per_feature.parquet",
        {
            "feature": np.arange(len(counts), dtype=np.int32),
            "count": counts,
            "density": counts / tokens,
            "mean_value": pl.Series(mean_value.astype(np.float32)).fill_nan(None).to_numpy(),
            "max_value": np.asarray(stats.feature_max, dtype=np.float32),
        },
        PER_FEATURE_SCHEMA,
    )
    edges, hist = density_histogram(counts, tokens, config.histogram_bins)
    write_table(
        tmp / "density_histogram.parquet",
        {"log10_lo": edges[:-1], "log10_hi": edges[1:], "n_features": hist.astype(np.int64)},
        DENSITY_HISTOGRAM_SCHEMA,
    )
    row = summarize(config, stats, d_sae, excluded, ce)
    write_table(tmp / "summary.parquet", [row], EVAL_SUMMARY_SCHEMA)
    pub.counts = {"tokens": tokens, "excluded_tokens": excluded, "ce_tokens": 0 if ce is None else len(ce)}
    pub.timings = timings
    pub.extra = {"summary": {k: v for k, v in row.items() if v is not None}, "outlier_norm_threshold": threshold}


@flow(name="eval")
def evaluate(store_root: str, config: EvalConfig, runtime: EvalRuntime | None = None) -> Manifest:
    """SAE x harvest site -> evaluation tables; a finished evaluation is returned, not recomputed."""
    existing = Store(store_root).published("eval", config.eval_id())
    if existing is not None:
        return existing
    return evaluate_sae(store_root, config, runtime or EvalRuntime())
