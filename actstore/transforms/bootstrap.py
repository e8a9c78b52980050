"""Percentile bootstrap intervals, and the mean of per-token values (e.g. loss) with one.

Tokens of one document are not independent draws: they share a topic, a style and a position pattern, so
a token-level bootstrap treats n correlated tokens as n independent facts and gives too narrow an interval.
Passing `groups` (e.g. document ids) resamples whole documents instead, a block (cluster) bootstrap that
keeps that correlation inside each draw; the statistic stays the mean over tokens (total loss / total
tokens of the drawn documents), so long documents weigh as much as their tokens do.
"""

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from actstore.schemas.errors import UserError

_DRAW_CELLS = 4_000_000
"""Random indices drawn per block of replicates; bounds memory on tables of millions of tokens."""


class Interval(NamedTuple):
    """A point estimate and its percentile bootstrap interval."""

    estimate: float
    """The statistic on all the data."""
    low: float
    """Lower end: the (1 - level) / 2 quantile of the bootstrap replicates."""
    high: float
    """Upper end: the (1 + level) / 2 quantile of the bootstrap replicates."""
    level: float
    """Nominal coverage, e.g. 0.95."""


def check_bootstrap_args(n_boot: int, level: float) -> None:
    """Refuse a replicate count or an interval level that cannot give an interval."""
    if n_boot < 2:
        raise UserError(f"n_boot={n_boot}: a bootstrap interval needs at least 2 replicates (hundreds for 95%)")
    if not 0 < level < 1:
        raise UserError(f"level={level}: pass the interval's coverage as a fraction in (0, 1), e.g. 0.95")


def percentile_interval(replicates: ArrayLike, level: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Low and high percentile ends over axis 0 of `replicates` (one row per bootstrap replicate)."""
    ends = np.quantile(np.asarray(replicates, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ends[0], ends[1]


def mean_with_interval(
    values: ArrayLike, groups: ArrayLike | None = None, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of `values` with a percentile bootstrap interval over tokens, or over `groups` when given.

    `groups` holds one label per value (a document id, say); each replicate draws as many groups as there
    are, with replacement, and takes the token-weighted mean of what it drew."""
    check_bootstrap_args(n_boot, level)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) == 0:
        raise UserError("no values to average: the run table is empty; pass at least one per-token value")
    if not np.isfinite(array).all():
        raise UserError(
            f"values hold {int((~np.isfinite(array)).sum())} non-finite entries (nan/inf): "
            "drop them (e.g. positions without a next token) before averaging"
        )
    if groups is None:
        sums, counts = array, np.ones_like(array)
    else:
        labels = np.asarray(groups).reshape(-1)
        if len(labels) != len(array):
            raise UserError(f"groups has {len(labels)} labels for {len(array)} values: pass one label per value")
        _, index = np.unique(labels, return_inverse=True)
        sums, counts = np.bincount(index, weights=array), np.bincount(index).astype(np.float64)
    n = len(sums)
    if n < 2:
        unit = "tokens" if groups is None else "groups"
        raise UserError(
            f"one {unit[:-1]} cannot show how the mean varies: a bootstrap needs at least 2 {unit}; "
            "pass more data" + ("" if groups is None else " or groups=None for a token-level interval")
        )
    rng = np.random.default_rng(seed)
    block = max(1, _DRAW_CELLS // n)
    replicates = []
    for start in range(0, n_boot, block):
        draws = rng.integers(0, n, size=(min(block, n_boot - start), n))
        replicates.append(sums[draws].sum(axis=1) / counts[draws].sum(axis=1))
    low, high = percentile_interval(np.concatenate(replicates), level)
    return Interval(estimate=float(array.mean()), low=float(low), high=float(high), level=level)
