"""Arguments and printing of `actstore forecast`, and the lines the demo prints for one harvest."""

import argparse
import math
from typing import Any

import polars as pl

from actstore.schemas.errors import UserError
from actstore.schemas.forecast import LAWS, LM_LAWS, TARGET_VARIABLES, ForecastConfig
from actstore.schemas.manifest import Manifest
from actstore.store.root import Store


def add_forecast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--harvest",
        action="append",
        default=[],
        help="harvest with per-token loss (repeatable; default: every harvest with --loss)",
    )
    p.add_argument("--eval", action="append", default=[], help="SAE evaluation id (repeatable; default: all)")
    p.add_argument(
        "--law",
        action="append",
        default=[],
        choices=LAWS,
        help="law to fit (repeatable; default: every law the data supports)",
    )
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="parameter count of a model (name, slug or name@revision) instead of counting it",
    )
    p.add_argument(
        "--tokens-trained",
        action="append",
        default=[],
        metavar="MODEL=D",
        help="training tokens of a model (name, slug or name@revision); Chinchilla's law needs them",
    )
    p.add_argument(
        "--param-count",
        choices=["total", "non_embedding"],
        default="total",
        help="N as every parameter (Chinchilla) or without embeddings (Kaplan)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="VAR=VALUE[,VAR=VALUE]",
        help=f"point to forecast at (repeatable); variables: {', '.join(TARGET_VARIABLES)}",
    )
    p.add_argument(
        "--extrapolate",
        type=float,
        nargs="*",
        default=[2.0, 4.0],
        metavar="FACTOR",
        help="also forecast at these multiples of the largest observed size (ctx_len for the "
        "position law); default 2 4, none with no values",
    )
    p.add_argument("--split", choices=["all", "train", "holdout"], default="all", help="tokens whose loss is averaged")
    p.add_argument(
        "--sae-sparsity",
        choices=["l0", "k"],
        default="l0",
        help="SAE laws' sparsity variable: measured L0 or the configured k",
    )
    p.add_argument("--n-boot", type=int, default=400, help="bootstrap replicates of every interval")
    p.add_argument("--level", type=float, default=0.95, help="coverage of every interval")
    p.add_argument("--seed", type=int, default=0)


def parse_counts(items: list[str], flag: str) -> dict[str, int]:
    """`MODEL=COUNT` pairs (counts may be written 1.2e9); the model part may itself hold '='."""
    counts: dict[str, int] = {}
    for item in items:
        model, sep, value = item.rpartition("=")
        try:
            count = float(value)
        except ValueError:
            count = math.nan
        if not (sep and model and math.isfinite(count) and count == int(count)):
            raise UserError(f"{flag} {item!r}: write MODEL=COUNT with a whole number, e.g. {flag} smollm2-135m=2e12")
        counts[model] = int(count)
    return counts


def parse_target(text: str) -> dict[str, float]:
    """`N=1e9,D=2e10` -> {"N": 1e9, "D": 2e10}."""
    target: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            target[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--target {text!r}: write VAR=VALUE[,VAR=VALUE], e.g. --target N=1e9,D=2e10")
    return target


def config_from_args(a: argparse.Namespace) -> ForecastConfig:
    return ForecastConfig(
        harvest_ids=tuple(a.harvest),
        eval_ids=tuple(a.eval),
        split=a.split,
        params=parse_counts(a.params, "--params"),
        tokens_trained=parse_counts(a.tokens_trained, "--tokens-trained"),
        param_count=a.param_count,
        laws=tuple(a.law),
        targets=tuple(map(parse_target, a.target)),
        extrapolate=tuple(a.extrapolate),
        sae_sparsity=a.sae_sparsity,
        n_boot=a.n_boot,
        level=a.level,
        seed=a.seed,
    )


def cmd_forecast(a: argparse.Namespace) -> dict[str, Any]:
    from actstore.flows.forecast import forecast

    manifest = forecast(a.store, config_from_args(a))
    if not a.json:
        print("\n".join(forecast_lines(a.store, manifest)))
    return {
        "forecast_id": manifest.id,
        **manifest.counts,
        "laws": manifest.extra["laws"],
        "notes": manifest.extra["notes"],
    }


def forecast_lines(store_root: str, manifest: Manifest) -> list[str]:
    """A finished forecast as text: the runs, each law's fit or why it was skipped, and its forecasts."""
    store = Store(store_root)
    tables = {name: store.forecast_table(manifest.id, name).collect() for name in ("runs", "fits", "forecasts")}
    level = manifest.config["level"]
    lines = [f"forecast {manifest.id} ({level:.0%} bootstrap intervals)"]
    for run in tables["runs"].iter_rows(named=True):
        n = f"N={run['n_params']:,} ({run['n_params_source']})" if run["n_params"] is not None else "N unknown"
        lines.append(
            f"  {run['harvest_id']}: {run['model']}, {n}; mean loss {run['mean_loss']:.3f} nats"
            f"{_interval(run)} over {run['tokens']:,} tokens of {run['docs']:,} documents"
        )
    for law in manifest.extra["laws"]:
        where = f" on {law['subject']}" if law["subject"] else ""
        if law["status"] == "skipped":
            lines.append(f"  {law['law']}{where}: skipped, {law['note']}")
            continue
        lines.extend(_law_lines(law["law"], law["subject"], tables["fits"], tables["forecasts"]))
        if law["note"]:
            lines.append(f"    warning: {law['note']}")
    lines.extend(f"  note: {note}" for note in manifest.extra["notes"])
    lines.append(f"  tables: {store.forecast_dir(manifest.id)}/{{runs,positions,saes,fits,forecasts}}.parquet")
    return lines


def _law_lines(law: str, subject: str, fits: pl.DataFrame, forecasts: pl.DataFrame) -> list[str]:
    params = {
        r["param"]: r
        for r in fits.filter((pl.col("law") == law) & (pl.col("subject") == subject)).iter_rows(named=True)
    }
    names = next(iter(params.values()))["variables"].split(",")
    coefficients, exponents = ("A", "B"), ("alpha", "beta")
    terms = " + ".join(
        f"{params[c]['estimate']:.4g}/{n}^{params[e]['estimate']:.3f}"
        for n, c, e in zip(names, coefficients, exponents, strict=False)
    )
    lines = [
        f"  {law} on {subject}: L({', '.join(names)}) = {params['E']['estimate']:.4g} + {terms}"
        f"  ({next(iter(params.values()))['n_points']} points)",
        "    " + "  ".join(f"{p} {r['estimate']:.4g}{_interval(r, '.4g')}" for p, r in params.items()),
    ]
    unit = " nats" if law in LM_LAWS else ""
    kl = "KL per token" if law in LM_LAWS else "reducible"
    for row in forecasts.filter((pl.col("law") == law) & (pl.col("subject") == subject)).iter_rows(named=True):
        at = f"{row['target']}" + (f" ({row['multiple']:g}x)" if row["multiple"] is not None else "")
        lines.append(
            f"    at {at}: {row['point']:.4f}{unit}{_interval(row, '.4f')}; {kl} "
            f"{row['reducible']:.4f}{_interval(row, '.4f', 'reducible_')}"
        )
    return lines


def _interval(row: dict[str, Any], fmt: str = ".3f", prefix: str = "") -> str:
    low, high = row[f"{prefix}low"], row[f"{prefix}high"]
    return "" if low is None or high is None else f" [{low:{fmt}}, {high:{fmt}}]"


def demo_forecast(store_root: str, harvest_id: str) -> list[str]:
    """Loss against position in context on one harvest, forecast at 2x and 4x its context: printable lines."""
    from actstore.flows.forecast import forecast

    config = ForecastConfig(harvest_ids=(harvest_id,), laws=("loss_vs_position",))
    return forecast_lines(store_root, forecast(store_root, config))
