"""`actstore forecast`: run tables from the store, scaling laws fitted to them, forecasts, stored as Parquet.

The story: `resolve_inputs` turns "every run" into the ids present (they are part of the forecast id),
`run_tables` reads each harvest's per-token loss into per-run and per-position means with document bootstrap
intervals and `sae_table` collects the SAE evaluations, `fit_laws` fits every law the points support
(`transforms.scaling_fit`, Hoffmann et al.'s Huber-on-log-loss L-BFGS) with bootstrap intervals and forecasts
(`transforms.scaling`), and `publish_forecast` writes the tables and, last, the manifest. A law without enough
points is skipped with the reason in the manifest, unless the config names it, which makes it an error.
"""

import time
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from actstore.flows.forecast_runs import harvest_tables, model_keys, sae_rows
from actstore.flows.runtime import flow, task
from actstore.schemas.errors import UserError
from actstore.schemas.forecast import LAWS, LM_LAWS, ForecastConfig, law_variables
from actstore.schemas.forecast_tables import POSITIONS_SCHEMA, RUNS_SCHEMA, SAES_SCHEMA, TABLES
from actstore.schemas.manifest import Manifest
from actstore.store.activations import LOSS_SITE
from actstore.store.evals import write_table
from actstore.store.harvests import harvest_model
from actstore.store.root import Store
from actstore.transforms.scaling import FitBootstrap, bootstrap_fit, reducible_loss
from actstore.transforms.scaling import forecast as predict
from actstore.transforms.scaling_fit import fit_power_law

Rows = list[dict[str, Any]]

NO_FLOOR = 1e-6
"""A fitted E below this fraction of the smallest observed loss is reported as no floor found."""

POINTS = {
    "loss_vs_params": ("runs of distinct N on one corpus", "harvest more model sizes on that corpus with --loss"),
    "loss_vs_params_tokens": (
        "runs of distinct (N, D) on one corpus with D known",
        "harvest more checkpoints and give --tokens-trained MODEL=D for each",
    ),
    "loss_vs_position": ("positions of one harvest", "harvest a corpus with a longer --ctx-len"),
    "sae_nmse": (
        "evaluations of SAEs of distinct width and sparsity on one harvest site",
        "evaluate more SAE widths and k on that site (actstore eval)",
    ),
    "sae_ce_delta": (
        "evaluations with a downstream loss of SAEs of distinct width and sparsity on one harvest site",
        "evaluate more SAEs with --ce-tokens > 0",
    ),
}
"""Per law: what its points are, and how a user gets more of them."""


class LawPoints(NamedTuple):
    """The points one law is fitted to: runs of one corpus, positions of one harvest, SAEs of one site."""

    law: str
    subject: str
    """What the points share (a corpus id, a harvest id, `harvest_id/site`)."""
    x: dict[str, np.ndarray]
    """Variable -> one value per point, in the law's order."""
    y: np.ndarray
    """The loss or metric at each point."""
    base: dict[str, float]
    """The sizes `extrapolate` multiplies: the largest observed (ctx_len for the position law)."""


class Fitted(NamedTuple):
    """What `fit_laws` found: table rows, and per law and subject whether it was fitted or why not."""

    fits: Rows
    forecasts: Rows
    laws: Rows
    """`{law, subject, status: fitted | skipped, n_points, note}`: why a law was skipped, or a warning on a fitted
    one (None when there is nothing to say)."""


def wanted(config: ForecastConfig) -> tuple[str, ...]:
    return config.laws or LAWS


@task(name="resolve-inputs")
def resolve_inputs(store_root: str, config: ForecastConfig) -> ForecastConfig:
    """The config with empty selections replaced by the store's harvests with loss and finished evaluations
    (only when a law wants them); every id checked, and every given N or D matched to a selected model."""
    store = Store(store_root)
    laws = wanted(config)
    harvest_ids = config.harvest_ids
    if not harvest_ids and any(law in LM_LAWS for law in laws):
        harvest_ids = tuple(
            e.id
            for e in store.ls()
            if e.kind == "harvest"
            and e.complete
            and LOSS_SITE in store.manifest("harvest", e.id).extra.get("arrays", {})
        )
    for harvest_id in harvest_ids:
        if LOSS_SITE not in store.manifest("harvest", harvest_id).extra.get("arrays", {}):
            raise UserError(f"harvest {harvest_id} has no per-token loss: harvest it again with --loss")
    known_evals = store.evals().select("eval_id").collect()["eval_id"].to_list()
    eval_ids = config.eval_ids
    if not eval_ids and any(law not in LM_LAWS for law in laws):
        eval_ids = tuple(sorted(known_evals))
    for eval_id in eval_ids:
        if eval_id not in known_evals:
            raise UserError(
                f"no evaluation {eval_id!r} in store {store.root}: "
                + (f"known: {', '.join(known_evals[:8])}" if known_evals else "run `actstore eval` first")
            )
    if not harvest_ids and not eval_ids:
        raise UserError(f"nothing to forecast in store {store.root}: harvest with --loss or run `actstore eval` first")
    keys = {key for h in harvest_ids for key in model_keys(harvest_model(store.manifest("harvest", h)))}
    for field in ("params", "tokens_trained"):
        unknown = sorted(set(getattr(config, field)) - keys)
        if unknown:
            raise UserError(
                f"{field} names model {unknown[0]!r}, which no selected harvest ran: use one of "
                f"{', '.join(sorted(keys))}"
            )
    return config.model_copy(update={"harvest_ids": tuple(harvest_ids), "eval_ids": tuple(eval_ids)})


@task(name="run-tables")
def run_tables(store_root: str, config: ForecastConfig) -> tuple[Rows, Rows, list[str]]:
    """Runs and positions rows of every selected harvest, and notes (e.g. a model whose N is unknown)."""
    store = Store(store_root)
    runs: Rows = []
    positions: Rows = []
    notes: list[str] = []
    for harvest_id in config.harvest_ids:
        run, by_position = harvest_tables(store, harvest_id, config, notes)
        runs.append(run)
        positions.extend(by_position)
    return runs, positions, notes


@task(name="sae-table")
def sae_table(store_root: str, config: ForecastConfig) -> Rows:
    """One row per selected SAE evaluation."""
    return sae_rows(Store(store_root), config.eval_ids)


def frame(rows: Rows, schema: Any) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=pl.from_arrow(schema.empty_table()).schema)


def law_points(
    law: str, config: ForecastConfig, runs: pl.DataFrame, positions: pl.DataFrame, saes: pl.DataFrame
) -> list[LawPoints]:
    """The groups of points `law` can be fitted to, one per subject."""
    if law in ("loss_vs_params", "loss_vs_params_tokens"):
        # A control's weights were destroyed on purpose: its loss says nothing about what size buys.
        chosen = runs.filter(pl.col("control").is_null() & pl.col("n_params").is_not_null())
        if law == "loss_vs_params_tokens":
            chosen = chosen.filter(pl.col("tokens_trained").is_not_null())
        return [
            _points(law, corpus, {"N": group["n_params"], "D": group["tokens_trained"]}, group["mean_loss"], config)
            for (corpus,), group in chosen.group_by("corpus_id", maintain_order=True)
        ]
    if law == "loss_vs_position":
        ctx = dict(runs.select("harvest_id", "ctx_len").iter_rows())
        return [
            _points(
                law,
                harvest_id,
                {"context": group["context"]},
                group["mean_loss"],
                config,
                {"context": float(ctx[harvest_id])},
            )
            for (harvest_id,), group in positions.filter(pl.col("context") >= 1).group_by(
                "harvest_id", maintain_order=True
            )
        ]
    metric = "nmse" if law == "sae_nmse" else "ce_delta"
    sparsity = config.sae_sparsity
    chosen = saes.filter(
        pl.col(metric).is_not_null()
        & (pl.col(metric) > 0)
        & pl.col("d_sae").is_not_null()
        & pl.col(sparsity).is_not_null()
        & (pl.col(sparsity) > 0)
    )
    groups = []
    for (harvest_id, site), group in chosen.group_by("harvest_id", "site", maintain_order=True):
        # A sweep often fixes k or the width: a variable with one value cannot be told apart from E, so the
        # law is fitted over the ones that vary (both kept when neither does: the group is then skipped).
        x = {name: group[column] for name, column in (("n_latents", "d_sae"), (sparsity, sparsity))}
        varying = {name: values for name, values in x.items() if values.n_unique() > 1}
        groups.append(_points(law, f"{harvest_id}/{site}", varying or x, group[metric], config))
    return groups


def _points(
    law: str,
    subject: str,
    columns: dict[str, pl.Series],
    y: pl.Series,
    config: ForecastConfig,
    base: dict[str, float] | None = None,
) -> LawPoints:
    names = [n for n in law_variables(law, config.sae_sparsity) if n in columns]
    x = {name: columns[name].cast(pl.Float64).to_numpy() for name in names}
    return LawPoints(law, subject, x, y.cast(pl.Float64).to_numpy(), base or {n: float(x[n].max()) for n in names})


def distinct_points(points: LawPoints) -> int:
    return len(np.unique(np.stack(list(points.x.values()), axis=1), axis=0))


@task(name="fit-laws")
def fit_laws(config: ForecastConfig, runs: Rows, positions: Rows, saes: Rows) -> Fitted:
    """Every wanted law fitted to every group that supports it, with bootstrap intervals and forecasts."""
    tables = frame(runs, RUNS_SCHEMA), frame(positions, POSITIONS_SCHEMA), frame(saes, SAES_SCHEMA)
    result = Fitted([], [], [])
    for law in wanted(config):
        groups = law_points(law, config, *tables)
        needed = 1 + 2 * len(law_variables(law, config.sae_sparsity))
        fitted = 0
        for points in groups:
            n = distinct_points(points)
            status = {"law": law, "subject": points.subject, "n_points": len(points.y)}
            if n < 1 + 2 * len(points.x):
                result.laws.append(
                    status | {"status": "skipped", "note": f"{n} distinct points, needs {1 + 2 * len(points.x)}"}
                )
                continue
            floor = _fit_one(points, config, result)
            result.laws.append(status | {"status": "fitted", "note": floor})
            fitted += 1
        if not groups:
            result.laws.append(
                {"law": law, "subject": "", "status": "skipped", "n_points": 0, "note": f"no {POINTS[law][0]}"}
            )
        if config.laws and not fitted:
            best = max((distinct_points(p) for p in groups), default=0)
            raise UserError(f"law {law} needs at least {needed} {POINTS[law][0]}; found {best}: {POINTS[law][1]}")
    return result


def _fit_one(points: LawPoints, config: ForecastConfig, result: Fitted) -> str | None:
    """Fit, bootstrap and forecast one group into `result`; a warning when E fell to zero, else None."""
    fit = fit_power_law(points.x, points.y)
    boot = bootstrap_fit(fit, points.x, points.y, n_boot=config.n_boot, level=config.level, seed=config.seed)
    common = {"law": points.law, "subject": points.subject}
    intervals = boot.intervals
    for name, value in fit.params.items():
        result.fits.append(
            common
            | {
                "variables": ",".join(fit.names),
                "param": name,
                "estimate": value,
                "low": intervals[name][0],
                "high": intervals[name][1],
                "n_points": fit.n_points,
                "objective": fit.objective,
            }
        )
    targets = _targets(points, config)
    if targets:
        _forecast_rows(boot, targets, common, result)
    if fit.E / float(points.y.min()) < NO_FLOOR:
        return (
            "E fell to 0: the points show no floor, so the reducible part is all of the loss and E's interval "
            "is degenerate (refits start at the optimum); more or longer-range points may find one"
        )
    return None


def _forecast_rows(
    boot: FitBootstrap,
    targets: list[tuple[str, float | None, dict[str, float]]],
    common: dict[str, str],
    result: Fitted,
) -> None:
    names = boot.fit.names
    at = {name: np.array([t[2][name] for t in targets]) for name in names}
    loss, reducible = predict(boot, at), reducible_loss(boot, at)
    for i, (label, multiple, values) in enumerate(targets):
        result.forecasts.append(
            common
            | {
                "target": label,
                "multiple": multiple,
                **values,
                "point": loss.point[i],
                "low": loss.low[i],
                "high": loss.high[i],
                "reducible": reducible.point[i],
                "reducible_low": reducible.low[i],
                "reducible_high": reducible.high[i],
            }
        )


def _targets(points: LawPoints, config: ForecastConfig) -> list[tuple[str, float | None, dict[str, float]]]:
    """(label, extrapolation multiple or None, variable -> value) of every target that names the law's variables."""
    names = list(points.x)
    chosen = [(None, {n: t[n] for n in names}) for t in config.targets if set(names) <= set(t)]
    chosen += [(m, {n: m * points.base[n] for n in names}) for m in config.extrapolate]
    return [(",".join(f"{n}={v[n]:g}" for n in names), m, v) for m, v in chosen]


@task(name="publish-forecast")
def publish_forecast(
    store_root: str,
    config: ForecastConfig,
    tables: dict[str, Rows],
    laws: Rows,
    notes: list[str],
    timings: dict[str, float],
) -> Manifest:
    """Write every table into a staged directory, the manifest last, and rename it into place."""
    fitted = [law for law in laws if law["status"] == "fitted"]
    with Store(store_root).object("forecast", config.forecast_id()).publish(config) as pub:
        for name, schema in TABLES.items():
            write_table(pub.directory / f"{name}.parquet", tables[name], schema)
        pub.counts = {
            **{name: len(rows) for name, rows in tables.items()},
            "laws_fitted": len(fitted),
            "laws_skipped": len(laws) - len(fitted),
        }
        pub.timings = timings
        pub.extra = {"laws": laws, "notes": notes}
    return pub.manifest


@flow(name="forecast")
def forecast(store_root: str, config: ForecastConfig) -> Manifest:
    """Store runs and SAE evaluations -> run tables, fitted laws, forecasts; a finished forecast is returned."""
    resolved = resolve_inputs(store_root, config)
    existing = Store(store_root).published("forecast", resolved.forecast_id())
    if existing is not None:
        return existing
    start = time.perf_counter()
    runs, positions, notes = run_tables(store_root, resolved)
    saes = sae_table(store_root, resolved)
    tables_seconds = time.perf_counter() - start
    fitted = fit_laws(resolved, runs, positions, saes)
    timings = {
        "tables_seconds": round(tables_seconds, 3),
        "fit_seconds": round(time.perf_counter() - start - tables_seconds, 3),
    }
    tables = {"runs": runs, "positions": positions, "saes": saes, "fits": fitted.fits, "forecasts": fitted.forecasts}
    return publish_forecast(store_root, resolved, tables, fitted.laws, notes, timings)
