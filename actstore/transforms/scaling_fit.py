"""Scaling laws `L(x_1..x_k) = E + A_1/x_1^α_1 + ... + A_k/x_k^α_k`, fitted as Hoffmann et al. (2022) did.

Chinchilla's `L(N, D) = E + A/N^α + B/D^β`, a one-variable law `L(x) = E + A/x^α` (loss against parameters,
tokens or compute) and an SAE law `L(n_latents, k) = E + A/n^α + B/k^β` are the same fit with k = 2, 1, 2
power terms, so one function serves all three.

The fit follows Hoffmann et al. 2022 (approach 3) and Epoch's replication (Besiroglu et al. 2024): with
E = exp(e) and A_i = exp(a_i), the predicted log loss is `logsumexp(a_1 - α_1 log x_1, ..., e)`; the summed
Huber loss (δ = 1e-3) between it and the observed log loss is minimised by L-BFGS from a grid of starts, and
the best end point wins. Working in log space weighs a 1% miss the same at every loss; the Huber loss, being
linear beyond δ, makes the fit a median-like regression that a few odd runs cannot drag.

Two departures keep a fit to about a second instead of minutes. L-BFGS runs from the `n_starts` grid points
whose starting objective is lowest, not from all 4,500 (on simulated Chinchilla data about half of all starts
reach the same optimum, so a screened few suffice; `n_starts=None` runs them all). And the grid's `e` and `a`
values are offsets from the log of the losses' geometric mean, so one grid serves nats per token, FVU and MSE
alike; for language-model losses (a few nats) this moves the published grid by about +1.
"""

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from actstore.schemas.errors import UserError

HUBER_DELTA = 1e-3
"""Hoffmann et al. 2022 and Besiroglu et al. 2024: residuals in log loss beyond this count linearly."""

COEFFICIENT_NAMES = ("A", "B", "C", "D")
EXPONENT_NAMES = ("alpha", "beta", "gamma", "delta")

_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-11}
"""Tighter than scipy's defaults, which left A ~2e-5 off on noise-free points; these cost ~50% more steps."""

_SCREEN_CELLS = 2_000_000
"""Array cells per block when scoring grid starts; bounds memory for long tables of runs."""


class Grid(NamedTuple):
    """L-BFGS starting points: every combination of these values (Epoch's grid by default)."""

    exponents: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    """Values of each α_i."""
    log_E: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    """Values of e = log E, as offsets from the log of the losses' geometric mean."""
    log_coefficients: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    """Values of each a_i = log A_i, as offsets from the log of the losses' geometric mean."""


EPOCH_GRID = Grid()
"""The published grid, α, β ∈ {0, 0.5, .., 2}, e ∈ {-1, -0.5, .., 1}, a, b ∈ {0, 5, .., 25}: 4,500 starts for
two variables."""


class PowerLawFit(NamedTuple):
    """One fitted law `L = E + Σ_i A_i / x_i^α_i`."""

    names: tuple[str, ...]
    """The variables x_i, in order (e.g. ("N", "D"))."""
    E: float
    """Irreducible loss: the limit as every x_i grows without bound."""
    coefficients: tuple[float, ...]
    """A_i, one per variable."""
    exponents: tuple[float, ...]
    """α_i, one per variable."""
    objective: float
    """Summed Huber loss of the log residuals at the optimum (Hoffmann's objective; lower is better)."""
    n_points: int
    """Runs the law was fitted to."""
    delta: float = HUBER_DELTA
    """Huber threshold the fit used; refits (bootstrap) use it too."""

    @property
    def params(self) -> dict[str, float]:
        """`E`, then `A`, `B`, ... and `alpha`, `beta`, ... in the order of `names`."""
        k = len(self.names)
        return {
            "E": self.E,
            **dict(zip(COEFFICIENT_NAMES[:k], self.coefficients, strict=True)),
            **dict(zip(EXPONENT_NAMES[:k], self.exponents, strict=True)),
        }

    @property
    def theta(self) -> NDArray[np.float64]:
        """The optimizer's coordinates `[e, a_1..a_k, α_1..α_k]`."""
        return np.array([math.log(self.E), *np.log(self.coefficients), *self.exponents])

    def predict(self, x: Mapping[str, ArrayLike] | ArrayLike) -> NDArray[np.float64]:
        """Predicted loss at `x`: a mapping from each of `names` to values, or values for a one-variable law."""
        return np.exp(log_predict(self.theta[None], log_columns(x, self.names))[0])


def fit_power_law(
    x: Mapping[str, ArrayLike],
    loss: ArrayLike,
    *,
    grid: Grid = EPOCH_GRID,
    n_starts: int | None = 64,
    delta: float = HUBER_DELTA,
) -> PowerLawFit:
    """Fit `loss ≈ E + Σ_i A_i / x_i^α_i` over the variables in `x` (name -> one positive value per run)."""
    names = tuple(x)
    if not 1 <= len(names) <= len(COEFFICIENT_NAMES):
        raise UserError(
            f"a power law over {len(names)} variables was asked for: pass 1 to "
            f"{len(COEFFICIENT_NAMES)} variables, e.g. {{'N': params, 'D': tokens}}"
        )
    log_x = log_columns(x, names)
    log_loss = log_values(loss, "loss", log_x.shape[1])
    _check_fit_args(len(log_loss), len(names), n_starts, delta)
    weights = np.ones_like(log_loss)
    theta = best_of(grid_starts(grid, len(names), float(log_loss.mean())), log_x, log_loss, weights, n_starts, delta)
    return to_fit(names, theta, huber_objective(theta, log_x, log_loss, weights, delta)[0], len(log_loss), delta)


def fit_chinchilla(
    params: ArrayLike,
    tokens: ArrayLike,
    loss: ArrayLike,
    *,
    grid: Grid = EPOCH_GRID,
    n_starts: int | None = 64,
    delta: float = HUBER_DELTA,
) -> PowerLawFit:
    """Hoffmann et al.'s `L(N, D) = E + A/N^α + B/D^β` over model parameters N and training tokens D."""
    return fit_power_law({"N": params, "D": tokens}, loss, grid=grid, n_starts=n_starts, delta=delta)


def fit_single(
    x: ArrayLike,
    loss: ArrayLike,
    *,
    name: str = "x",
    grid: Grid = EPOCH_GRID,
    n_starts: int | None = 64,
    delta: float = HUBER_DELTA,
) -> PowerLawFit:
    """`L(x) = E + A/x^α` for one scale variable: parameters, tokens, compute (FLOPs) or SAE width."""
    return fit_power_law({name: x}, loss, grid=grid, n_starts=n_starts, delta=delta)


def fit_sae_law(
    n_latents: ArrayLike,
    k: ArrayLike,
    loss: ArrayLike,
    *,
    grid: Grid = EPOCH_GRID,
    n_starts: int | None = 64,
    delta: float = HUBER_DELTA,
) -> PowerLawFit:
    """`L(n, k) = E + A/n^α + B/k^β` for SAE loss (e.g. FVU or MSE) against width n and active latents k."""
    return fit_power_law({"n_latents": n_latents, "k": k}, loss, grid=grid, n_starts=n_starts, delta=delta)


def huber_objective(
    theta: NDArray[np.float64],
    log_x: NDArray[np.float64],
    log_loss: NDArray[np.float64],
    weights: NDArray[np.float64],
    delta: float,
) -> tuple[float, NDArray[np.float64]]:
    """Weighted summed Huber loss of the log residuals and its gradient in `theta` (L-BFGS's fun and jac).

    Integer `weights` are how bootstrap resamples count repeated runs without copying them."""
    k = log_x.shape[0]
    terms = theta[1 : 1 + k, None] - theta[1 + k :, None] * log_x
    top = np.maximum(terms.max(axis=0), theta[0])
    exp_terms, exp_e = np.exp(terms - top), np.exp(theta[0] - top)
    total = exp_terms.sum(axis=0) + exp_e
    residual = top + np.log(total) - log_loss
    size = np.abs(residual)
    value = float(weights @ np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta)))
    slope = weights * np.clip(residual, -delta, delta) / total
    term_slope = exp_terms * slope
    grad = np.concatenate([[exp_e @ slope], term_slope.sum(axis=1), -(term_slope * log_x).sum(axis=1)])
    return value, grad


def refine(
    theta: NDArray[np.float64],
    log_x: NDArray[np.float64],
    log_loss: NDArray[np.float64],
    weights: NDArray[np.float64],
    delta: float,
) -> tuple[NDArray[np.float64], float]:
    """One L-BFGS run from `theta`: the end point and its objective."""
    result = minimize(
        huber_objective,
        theta,
        args=(log_x, log_loss, weights, delta),
        jac=True,
        method="L-BFGS-B",
        options=_LBFGS_OPTIONS,
    )
    return np.asarray(result.x, dtype=np.float64), float(result.fun)


def best_of(
    starts: NDArray[np.float64],
    log_x: NDArray[np.float64],
    log_loss: NDArray[np.float64],
    weights: NDArray[np.float64],
    n_starts: int | None,
    delta: float,
) -> NDArray[np.float64]:
    """L-BFGS from the `n_starts` starts of lowest objective (all when None); the best end point."""
    if n_starts is not None and n_starts < len(starts):
        starts = starts[np.argsort(_screen(starts, log_x, log_loss, weights, delta), kind="stable")[:n_starts]]
    best, best_value = starts[0], math.inf
    with one_blas_thread():
        for start in starts:
            theta, value = refine(start, log_x, log_loss, weights, delta)
            if value < best_value:
                best, best_value = theta, value
    return best


def one_blas_thread() -> threadpool_limits:
    """Context that keeps BLAS to one thread: L-BFGS-B's tiny BLAS calls ran 10-50x slower with a thread pool
    on a busy 2-core machine (threads spin waiting for cores), and 5 parameters never need more than one."""
    return threadpool_limits(limits=1, user_api="blas")


def grid_starts(grid: Grid, k: int, log_scale: float) -> NDArray[np.float64]:
    """Every grid combination as rows `[e, a_1..a_k, α_1..α_k]`, with e and a_i shifted by `log_scale`."""
    axes = [grid.log_E] + [grid.log_coefficients] * k + [grid.exponents] * k
    if not all(axes):
        raise UserError("a fit grid has an empty axis: give every Grid field at least one value")
    starts = np.array(list(itertools.product(*axes)), dtype=np.float64)
    starts[:, : 1 + k] += log_scale
    return starts


def log_predict(thetas: NDArray[np.float64], log_x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Log loss at each column of `log_x` for each row of `thetas` ([m, 1+2k] -> [m, n]), by logsumexp."""
    k = log_x.shape[0]
    terms = thetas[:, 1 : 1 + k, None] - thetas[:, 1 + k :, None] * log_x[None]
    stacked = np.concatenate([terms, np.broadcast_to(thetas[:, :1, None], (len(thetas), 1, log_x.shape[1]))], 1)
    top = stacked.max(axis=1)
    return top + np.log(np.exp(stacked - top[:, None]).sum(axis=1))


def to_fit(
    names: tuple[str, ...], theta: NDArray[np.float64], objective: float, n_points: int, delta: float
) -> PowerLawFit:
    """The optimizer's coordinates as a `PowerLawFit`."""
    k = len(names)
    return PowerLawFit(
        names=names,
        E=math.exp(theta[0]),
        coefficients=tuple(float(v) for v in np.exp(theta[1 : 1 + k])),
        exponents=tuple(float(v) for v in theta[1 + k :]),
        objective=objective,
        n_points=n_points,
        delta=delta,
    )


def log_columns(x: Mapping[str, ArrayLike] | ArrayLike, names: tuple[str, ...]) -> NDArray[np.float64]:
    """Logs of the variables in `names`' order as a [k, n] array; a bare array serves a one-variable law."""
    if not isinstance(x, Mapping):
        if len(names) != 1:
            raise UserError(
                f"values without names given to a law over {names}: pass a mapping "
                f"{{{', '.join(repr(n) for n in names)}: values}}"
            )
        x = {names[0]: x}
    if set(x) != set(names):
        raise UserError(f"variables {sorted(x)} given to a law over {sorted(names)}: pass exactly those names")
    columns = [np.atleast_1d(np.asarray(x[name], dtype=np.float64)) for name in names]
    n = len(columns[0])
    return np.stack([log_values(column, f"x['{name}']", n) for name, column in zip(names, columns, strict=True)])


def log_values(values: ArrayLike, label: str, n: int) -> NDArray[np.float64]:
    """log of one 1-D column of `n` positive finite values; anything else is the user's to fix."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim > 1:
        raise UserError(f"{label} has shape {array.shape}: pass one value per run, as a 1-D sequence")
    array = np.atleast_1d(array)
    if len(array) != n:
        raise UserError(f"{label} has {len(array)} values but the other columns have {n}: pass one value per run")
    bad = ~np.isfinite(array) | (array <= 0)
    if bad.any():
        raise UserError(
            f"{label} has {int(bad.sum())} values that are not positive and finite "
            f"(first: {array[bad][0]}): a power law needs positive values; drop those runs"
        )
    return np.log(array)


def _check_fit_args(n: int, k: int, n_starts: int | None, delta: float) -> None:
    if n < 1 + 2 * k:
        raise UserError(
            f"{n} runs cannot determine the {1 + 2 * k} parameters of a law over {k} variables: "
            f"pass at least {1 + 2 * k} runs (many more for useful intervals)"
        )
    if n_starts is not None and n_starts < 1:
        raise UserError(f"n_starts={n_starts}: pass a positive number of L-BFGS starts, or None for all")
    if not delta > 0:
        raise UserError(f"delta={delta}: the Huber threshold must be positive (Hoffmann et al. use 1e-3)")


def _screen(
    starts: NDArray[np.float64],
    log_x: NDArray[np.float64],
    log_loss: NDArray[np.float64],
    weights: NDArray[np.float64],
    delta: float,
) -> NDArray[np.float64]:
    """Starting objective of every start, scored in blocks (vectorised: far cheaper than one L-BFGS run)."""
    block = max(1, _SCREEN_CELLS // log_x.size)
    values = []
    for i in range(0, len(starts), block):
        residual = log_predict(starts[i : i + block], log_x) - log_loss
        size = np.abs(residual)
        values.append(np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta)) @ weights)
    return np.concatenate(values)
