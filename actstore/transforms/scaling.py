"""Forecasting loss from a fitted scaling law: bootstrap intervals, forecasts, and the reducible loss.

Intervals are percentile bootstrap intervals: runs are resampled with replacement and the law refitted on
each resample. A refit starts from the
full fit's optimum rather than the whole grid (a resample's optimum lies near the full data's; one L-BFGS
run per replicate instead of dozens), so an interval describes the spread of the optimum the fit found, not
of far basins. The intervals carry sampling noise only: they assume the law's form holds out to the target,
which nothing in the data can vouch for when the target lies beyond the runs.

Reducible loss. A model's expected loss per token is the cross-entropy H(p, q) = H(p) + KL(p ‖ q) between
the text's true distribution p and the model's q. As width and data grow without bound the law tends to E,
read as the entropy H(p) of text per token; the rest, L - E = Σ A_i / x_i^α_i, is then the KL divergence per
token (in nats; divide by ln 2 for bits) between the model and the true distribution: what more scale can
still remove. E is an extrapolation: it depends on the tokenizer and the data mix, and is only as good as
the law's form.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from actstore.schemas.errors import UserError
from actstore.transforms.bootstrap import check_bootstrap_args, percentile_interval
from actstore.transforms.scaling_fit import (
    COEFFICIENT_NAMES,
    EXPONENT_NAMES,
    PowerLawFit,
    log_columns,
    log_predict,
    log_values,
    one_blas_thread,
    refine,
)


class FitBootstrap(NamedTuple):
    """A law fitted to all runs and refitted to `n_boot` resamples of them."""

    fit: PowerLawFit
    """The fit to all runs: the point estimates."""
    thetas: NDArray[np.float64]
    """[n_boot, 1 + 2k] optimizer coordinates `[e, a_1..a_k, α_1..α_k]`, one row per resample."""
    level: float
    """Nominal coverage of the intervals, e.g. 0.8."""

    @property
    def samples(self) -> dict[str, NDArray[np.float64]]:
        """Each parameter of `fit.params` across the resamples."""
        k = len(self.fit.names)
        values = np.concatenate([np.exp(self.thetas[:, : 1 + k]), self.thetas[:, 1 + k :]], axis=1)
        return dict(zip(["E", *COEFFICIENT_NAMES[:k], *EXPONENT_NAMES[:k]], values.T, strict=True))

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile interval of each parameter at `level`."""
        ends = {name: percentile_interval(values, self.level) for name, values in self.samples.items()}
        return {name: (float(low), float(high)) for name, (low, high) in ends.items()}


class Forecast(NamedTuple):
    """Values at each target from the full fit, with bootstrap interval ends when a bootstrap was given."""

    point: NDArray[np.float64]
    """From the fit to all runs."""
    low: NDArray[np.float64] | None
    """Lower interval end per target; None without a bootstrap."""
    high: NDArray[np.float64] | None
    """Upper interval end per target; None without a bootstrap."""
    level: float | None
    """Nominal coverage of the interval; None without a bootstrap."""


def bootstrap_fit(
    fit: PowerLawFit,
    x: Mapping[str, ArrayLike] | ArrayLike,
    loss: ArrayLike,
    *,
    n_boot: int = 200,
    level: float = 0.8,
    seed: int = 0,
) -> FitBootstrap:
    """Refit `fit` on `n_boot` resamples of its runs (`x`, `loss`: the data it was fitted to); seeded."""
    check_bootstrap_args(n_boot, level)
    log_x = log_columns(x, fit.names)
    log_loss = log_values(loss, "loss", log_x.shape[1])
    n = len(log_loss)
    if n != fit.n_points:
        raise UserError(f"{n} runs given to bootstrap a fit made on {fit.n_points}: pass the runs it was fitted to")
    rng = np.random.default_rng(seed)
    thetas = np.empty((n_boot, len(fit.theta)))
    with one_blas_thread():
        for i in range(n_boot):
            weights = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
            thetas[i] = refine(fit.theta, log_x, log_loss, weights, fit.delta)[0]
    return FitBootstrap(fit=fit, thetas=thetas, level=level)


def forecast(model: PowerLawFit | FitBootstrap, targets: Mapping[str, ArrayLike] | ArrayLike) -> Forecast:
    """Predicted loss at `targets` (name -> values, or values for a one-variable law)."""
    fit = model.fit if isinstance(model, FitBootstrap) else model
    log_x = log_columns(targets, fit.names)
    return _evaluate(model, lambda thetas: np.exp(log_predict(thetas, log_x)))


def reducible_loss(
    model: PowerLawFit | FitBootstrap,
    targets: Mapping[str, ArrayLike] | ArrayLike | None = None,
    *,
    loss: ArrayLike | None = None,
) -> Forecast:
    """L - E in nats per token, read as the KL per token from the true distribution (see the module notes).

    At `targets` it is the law's `Σ A_i / x_i^α_i`; for an observed `loss` (e.g. a run's mean loss) it is
    `loss - E`, which is negative where a run beats the fitted floor."""
    if (targets is None) == (loss is None):
        raise UserError(
            "reducible_loss needs exactly one of targets (sizes to forecast at) or loss "
            "(observed losses): pass one of them"
        )
    fit = model.fit if isinstance(model, FitBootstrap) else model
    if loss is not None:
        observed = np.atleast_1d(np.asarray(loss, dtype=np.float64))
        return _evaluate(model, lambda thetas: observed[None] - np.exp(thetas[:, :1]))
    log_x = log_columns(targets, fit.names)
    k = len(fit.names)
    return _evaluate(model, lambda thetas: np.exp(thetas[:, 1 : 1 + k, None] - thetas[:, 1 + k :, None] * log_x).sum(1))


def _evaluate(
    model: PowerLawFit | FitBootstrap, values: Callable[[NDArray[np.float64]], NDArray[np.float64]]
) -> Forecast:
    """`values` (rows of optimizer coordinates -> [rows, targets]) at the fit, and its bootstrap interval."""
    if isinstance(model, PowerLawFit):
        return Forecast(point=values(model.theta[None])[0], low=None, high=None, level=None)
    low, high = percentile_interval(values(model.thetas), model.level)
    return Forecast(point=values(model.fit.theta[None])[0], low=low, high=high, level=model.level)
