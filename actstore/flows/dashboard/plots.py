"""The index page's figures, drawn with matplotlib into PNG files of the site (no pyplot: no global state).

Each plot is drawn only when its data exists; `write_plots` returns the ones it drew, in the order the index
shows them.
"""

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from actstore.flows.dashboard.pages import Plot
from actstore.flows.dashboard.results import Results, WidthFit

PLOTS_DIR = "plots"
_SIZE = (5.2, 3.6)
_DPI = 110
_ACCENT, _HOT, _GREY = "#1f5fbf", "#ff6a00", "#9aa3ad"


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)


def l0_vs_explained_variance(saes: pl.DataFrame, current: str, path: Path) -> None:
    """Every SAE of the store as a point; this SAE's points in the accent colour."""
    figure = Figure(figsize=_SIZE)
    ax = figure.subplots()
    for source, marker in (("eval", "o"), ("training holdout", "s")):
        rows = saes.filter(pl.col("source") == source)
        others, mine = rows.filter(pl.col("sae_id") != current), rows.filter(pl.col("sae_id") == current)
        ax.scatter(
            others["l0"],
            others["explained_variance"],
            marker=marker,
            color=_GREY,
            label=f"other SAEs ({source})" if len(others) else None,
        )
        ax.scatter(
            mine["l0"],
            mine["explained_variance"],
            marker=marker,
            color=_ACCENT,
            s=60,
            label=f"this SAE ({source})" if len(mine) else None,
        )
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("explained variance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, path)


def density_histogram(density: np.ndarray, dead: int, path: Path) -> None:
    """log10 density of the features that fire; the dead ones counted in the title."""
    figure = Figure(figsize=_SIZE)
    ax = figure.subplots()
    live = density[density > 0]
    if len(live):
        ax.hist(np.log10(live), bins=50, color=_HOT)
    ax.set_xlabel("log10 density (fraction of tokens the feature fires on)")
    ax.set_ylabel("features")
    ax.set_title(f"{len(live):,} features fire, {dead:,} never do", fontsize=10)
    _save(figure, path)


def mse_vs_l0(per_token: pl.DataFrame, path: Path) -> None:
    """Per-token reconstruction MSE against the token's L0."""
    figure = Figure(figsize=_SIZE)
    ax = figure.subplots()
    ax.scatter(per_token["l0"], per_token["mse"], s=4, alpha=0.25, color=_ACCENT, linewidths=0)
    ax.set_yscale("log")
    ax.set_xlabel("L0 of the token")
    ax.set_ylabel("MSE of its reconstruction")
    ax.set_title(f"{len(per_token):,} evaluated tokens", fontsize=10)
    _save(figure, path)


def transfer_histograms(histograms: pl.DataFrame, path: Path) -> None:
    """Cosine and distance between the two models' activations of the same tokens, one panel per measure."""
    measures = histograms["measure"].unique(maintain_order=True).to_list()
    figure = Figure(figsize=(_SIZE[0], 2.4 * len(measures) + 0.6))
    axes = figure.subplots(len(measures), 1, squeeze=False)[:, 0]
    for ax, measure in zip(axes, measures, strict=True):
        for (transfer_id, site), rows in histograms.filter(pl.col("measure") == measure).group_by(
            "transfer_id", "site", maintain_order=True
        ):
            ax.stairs(
                rows["count"].to_numpy(),
                np.append(rows["lo"].to_numpy(), rows["hi"][-1]),
                label=f"{site} ({transfer_id})",
                fill=False,
            )
        ax.set_xlabel(measure)
        ax.set_ylabel("tokens")
        ax.legend(fontsize=7)
    _save(figure, path)


def width_scaling(width: WidthFit, path: Path) -> None:
    """FVU against SAE width on log-log axes, with the fitted law."""
    figure = Figure(figsize=_SIZE)
    ax = figure.subplots()
    n, fvu = width.points["d_sae"].to_numpy().astype(np.float64), width.points["fvu"].to_numpy()
    grid = np.geomspace(n.min(), n.max() * 4, 100)
    p = width.fit.params
    ax.scatter(n, fvu, color=_ACCENT, label="evaluated SAEs", zorder=3)
    ax.plot(grid, width.fit.predict(grid), color=_HOT, label=f"{p['E']:.3g} + {p['A']:.3g} / n^{p['alpha']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latents (n)")
    ax.set_ylabel("FVU")
    ax.legend(fontsize=8)
    _save(figure, path)


def write_plots(site: Path, results: Results, sae_id: str, density: np.ndarray) -> list[Plot]:
    """Draw every plot whose data exists into site/plots/ and return them in display order."""
    target = site / PLOTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []

    def add(title: str, name: str) -> Path:
        plots.append(Plot(title, f"{PLOTS_DIR}/{name}"))
        return target / name

    if len(results.saes):
        l0_vs_explained_variance(
            results.saes,
            sae_id,
            add("L0 vs explained variance of the SAEs in the store", "l0_vs_explained_variance.png"),
        )
    density_histogram(density, int((density == 0).sum()), add("feature density", "density.png"))
    if results.per_token is not None:
        mse_vs_l0(results.per_token, add("per-token MSE vs L0", "mse_vs_l0.png"))
    if results.transfer_histograms is not None:
        transfer_histograms(
            results.transfer_histograms, add("transfer: the two models on the same tokens", "transfer.png")
        )
    if results.width_fit is not None:
        width_scaling(results.width_fit, add("scaling: FVU vs SAE width", "width_scaling.png"))
    return plots
