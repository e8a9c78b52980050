"""The results in the store that a dashboard shows next to an SAE's features, each found only when it exists.

- headline numbers: the SAE's evaluation on this harvest (`actstore eval`), else the holdout evaluation its
  training recorded, else none;
- every SAE of the store as a point (L0, explained variance), from evaluations and training manifests;
- per-token squared error and L0 of that evaluation;
- transfer histograms of any transfer analysis that involves this harvest, and per-feature transfer columns;
- per-feature attribution of the loss (`actstore attribute`) on a gradient harvest of the same site;
- a width scaling law, FVU(n_latents) = E + A / n^α, fitted when at least four SAEs of different widths were
  evaluated on this harvest and site.
"""

from typing import Any, NamedTuple

import numpy as np
import polars as pl

from actstore.schemas.attribution import ATTRIBUTION_DIR, PER_FEATURE_NAME
from actstore.schemas.eval_tables import DOWNSTREAM_FIELDS, RECONSTRUCTION_FIELDS
from actstore.store.files import read_manifest
from actstore.store.root import Store
from actstore.transforms.scaling_fit import PowerLawFit, fit_single

PER_TOKEN_POINTS = 20_000
"""Tokens drawn (seeded) for the per-token scatter: enough to see its shape, few enough for a quick plot."""
MIN_WIDTHS_FOR_FIT = 4
"""Distinct SAE widths needed before a three-parameter width law is fitted."""


class WidthFit(NamedTuple):
    """FVU of the SAEs evaluated on one harvest site against their width, and the law fitted to them."""

    points: pl.DataFrame
    """sae_id, d_sae, fvu."""
    fit: PowerLawFit


class Results(NamedTuple):
    """Everything about the SAE beyond its feature tables; each part is None (or empty) when absent."""

    headline: dict[str, Any]
    headline_source: str
    saes: pl.DataFrame
    """sae_id, harvest_id, l0, explained_variance, source: one point per evaluation of any SAE in the store."""
    per_token: pl.DataFrame | None
    """l0, mse of up to PER_TOKEN_POINTS evaluated tokens (excluded tokens left out)."""
    transfer_histograms: pl.DataFrame | None
    """transfer_id, site, measure, lo, hi, count."""
    per_feature: pl.DataFrame | None
    """feature plus per-feature columns from transfer and attribution analyses, for the index."""
    width_fit: WidthFit | None


def sae_points(store: Store) -> pl.DataFrame:
    """(L0, explained variance) of every SAE in the store: one point per evaluation, plus the holdout evaluation
    recorded at training for SAEs with no evaluation of their own."""
    evals = store.evals().select("sae_id", "harvest_id", "l0", "explained_variance", source=pl.lit("eval")).collect()
    evaluated = set(evals["sae_id"].to_list())
    trained = []
    for entry in store.ls():
        if entry.kind != "sae" or not entry.complete or entry.id in evaluated:
            continue
        extra = store.manifest("sae", entry.id).extra
        holdout = extra.get("eval_holdout") or {}
        if "l0" in holdout and "explained_variance" in holdout:
            trained.append(
                {
                    "sae_id": entry.id,
                    "harvest_id": extra.get("harvest_id"),
                    "l0": holdout["l0"],
                    "explained_variance": holdout["explained_variance"],
                    "source": "training holdout",
                }
            )
    schema = {
        "sae_id": pl.String,
        "harvest_id": pl.String,
        "l0": pl.Float64,
        "explained_variance": pl.Float64,
        "source": pl.String,
    }
    return pl.concat([evals.cast(schema), pl.DataFrame(trained, schema=schema)])  # type: ignore[arg-type]


def _eval_row(store: Store, sae_id: str, harvest_id: str) -> dict[str, Any] | None:
    """The SAE's evaluation on this harvest: the holdout split's when there are several."""
    rows = (
        store.evals()
        .filter((pl.col("sae_id") == sae_id) & (pl.col("harvest_id") == harvest_id))
        .sort(pl.col("split") != "holdout", "eval_id")
        .collect()
    )
    return rows.row(0, named=True) if len(rows) else None


def _headline(store: Store, sae_id: str, row: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    if row is not None:
        numbers = {k: row[k] for k in (*RECONSTRUCTION_FIELDS, *DOWNSTREAM_FIELDS) if row.get(k) is not None}
        return numbers, f"evaluation {row['eval_id']} ({row['split']} split)"
    holdout = store.manifest("sae", sae_id).extra.get("eval_holdout")
    if holdout:
        numbers = {k: holdout[k] for k in RECONSTRUCTION_FIELDS if holdout.get(k) is not None}
        return numbers, "holdout evaluation at the end of training"
    return {}, "no evaluation yet: run `actstore eval` for headline numbers"


def _per_token(store: Store, row: dict[str, Any] | None, d_in: int | None) -> pl.DataFrame | None:
    if row is None or not d_in:
        return None
    directory = store.eval_dir(row["eval_id"])
    if not (directory / "per_token.parquet").is_file():
        return None
    tokens = (
        store.eval_table(row["eval_id"], "per_token")
        .filter(~pl.col("excluded"))
        .select("l0", mse=pl.col("sq_error") / d_in)
        .drop_nulls()
        .collect()
    )
    if len(tokens) > PER_TOKEN_POINTS:
        tokens = tokens.sample(PER_TOKEN_POINTS, seed=0)
    return tokens if len(tokens) else None


def _transfers(
    store: Store, sae_id: str, harvest_id: str, site: str
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Histograms of the transfers involving this harvest (this site's when it has one), and the per-feature
    transfer columns of this SAE (from the first transfer, by id, that has them)."""
    involved = (
        store.transfers()
        .filter((pl.col("harvest_a") == harvest_id) | (pl.col("harvest_b") == harvest_id))
        .select("transfer_id", "site")
        .unique()
        .sort("transfer_id", "site")
        .collect()
    )
    histograms, per_feature = [], None
    for transfer_id in involved["transfer_id"].unique(maintain_order=True).to_list():
        directory = store.transfer_dir(transfer_id)
        if (directory / "histograms.parquet").is_file():
            table = store.transfer_table(transfer_id, "histograms").collect()
            if site in table["site"].to_list():
                table = table.filter(pl.col("site") == site)
            histograms.append(
                table.select(pl.lit(transfer_id).alias("transfer_id"), "site", "measure", "lo", "hi", "count")
            )
        if per_feature is None and (directory / "feature_transfer.parquet").is_file():
            mine = store.transfer_table(transfer_id, "feature_transfer").filter(pl.col("sae_id") == sae_id).collect()
            if len(mine):
                per_feature = mine.select(
                    pl.col("feature").cast(pl.Int32),
                    *(pl.col(c).alias(f"transfer_{c}") for c in ("density_b", "act_corr", "logit_cos")),
                )
    return (pl.concat(histograms) if histograms else None), per_feature


def width_fit(store: Store, harvest_id: str, site: str) -> WidthFit | None:
    """FVU against width of the SAEs evaluated on this harvest site, with `E + A / n^α` fitted, when enough
    distinct widths were evaluated (one point per SAE: its holdout evaluation when it has several)."""
    points = (
        store.evals()
        .filter(
            (pl.col("harvest_id") == harvest_id)
            & (pl.col("site") == site)
            & pl.col("fvu").is_not_null()
            & (pl.col("fvu") > 0)
            & pl.col("d_sae").is_not_null()
        )
        .sort(pl.col("split") != "holdout", "eval_id")
        .unique("sae_id", keep="first", maintain_order=True)
        .select("sae_id", "d_sae", "fvu")
        .sort("d_sae", "sae_id")
        .collect()
    )
    if points["d_sae"].n_unique() < MIN_WIDTHS_FOR_FIT:
        return None
    return WidthFit(
        points, fit_single(points["d_sae"].to_numpy().astype(np.float64), points["fvu"].to_numpy(), name="n_latents")
    )


def _attributions(store: Store, sae_id: str, harvest_id: str, site: str) -> pl.DataFrame | None:
    """Per-feature attribution of the loss (`actstore attribute`) on the SAE's site, from the first gradient
    harvest that has one: the signed sum over tokens and the mean magnitude, as index columns."""
    for directory in sorted(store.features_dir(sae_id, harvest_id).parent.glob(f"*/{ATTRIBUTION_DIR}")):
        manifest = read_manifest(directory)
        if manifest is None or manifest.extra.get("site") != site:
            continue
        return pl.read_parquet(directory / PER_FEATURE_NAME).select(
            pl.col("feature").cast(pl.Int32),
            pl.col("attribution_sum").alias("attribution"),
            pl.col("attribution_abs_mean").alias("attribution_abs_mean"),
        )
    return None


def gather_results(store: Store, sae_id: str, harvest_id: str, site: str) -> Results:
    """Whatever evaluation, transfer and scaling results the store holds for this SAE and harvest."""
    row = _eval_row(store, sae_id, harvest_id)
    headline, source = _headline(store, sae_id, row)
    sae_manifest = read_manifest(store.sae_dir(sae_id))
    d_in = sae_manifest.counts.get("d_in") if sae_manifest else None
    histograms, per_feature = _transfers(store, sae_id, harvest_id, site)
    attributions = _attributions(store, sae_id, harvest_id, site)
    if attributions is not None:
        per_feature = (
            attributions
            if per_feature is None
            else per_feature.join(attributions, on="feature", how="full", coalesce=True)
        )
    return Results(
        headline,
        source,
        sae_points(store),
        _per_token(store, row, d_in),
        histograms,
        per_feature,
        width_fit(store, harvest_id, site),
    )
