"""Draws of synthetic activation sets: the mixture's parameters, then each chunk's rows.

Every draw comes from a numpy generator keyed by the seed and what is drawn (the parameters, or chunk `c`), so a
chunk is the same array whenever and wherever it is made: a resumed write gives the bytes an uninterrupted one
would, and chunks can be made in any order.
"""

from typing import NamedTuple

import numpy as np

from actstore.schemas.synthetic import SyntheticConfig

_PARAMETERS, _CHUNK = 0, 1
"""First entropy word after the seed: which stream a generator draws (the parameters, or a chunk's rows)."""


class MixtureParameters(NamedTuple):
    """The ground truth of a Gaussian mixture with diagonal covariances."""

    weights: np.ndarray
    """`[components]` probability of each component (equal)."""
    means: np.ndarray
    """`[components, d]` float32 component means, each coordinate N(0, spread^2)."""
    stds: np.ndarray
    """`[components, d]` float32 std of each component along each coordinate."""


class Chunk(NamedTuple):
    """One chunk of rows with the component each came from."""

    x: np.ndarray
    """`[rows, d]` float32."""
    component: np.ndarray | None
    """`[rows]` int64 component of each row (gaussian_mixture), None for a uniform cube."""


def mixture_parameters(config: SyntheticConfig) -> MixtureParameters:
    """The means and stds of `config`'s mixture, a function of its seed alone."""
    rng = np.random.default_rng([config.seed, _PARAMETERS])
    shape = (config.components, config.d)
    means = rng.normal(0.0, config.spread, shape)
    half_log = np.log(config.anisotropy) / 2
    stds = config.scale * np.exp(rng.uniform(-half_log, half_log, shape))
    weights = np.full(config.components, 1.0 / config.components)
    return MixtureParameters(weights, means.astype(np.float32), stds.astype(np.float32))


def sample_chunk(config: SyntheticConfig, chunk: int, rows: int, params: MixtureParameters | None = None) -> Chunk:
    """Rows of chunk `chunk` (`rows` of them: the last chunk may be short), drawn in float32.

    `params` are `mixture_parameters(config)`, passed in so a writer computes them once."""
    rng = np.random.default_rng([config.seed, _CHUNK, chunk])
    if config.kind == "uniform_cube":
        x = rng.uniform(-config.scale, config.scale, (rows, config.d)).astype(np.float32)
        return Chunk(x, None)
    params = params if params is not None else mixture_parameters(config)
    component = rng.integers(0, config.components, rows)
    noise = rng.standard_normal((rows, config.d), dtype=np.float32)
    return Chunk(params.means[component] + params.stds[component] * noise, component)
