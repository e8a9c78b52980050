"""Reconstruction quality of an SAE from streamed batches: per-token metrics, their totals, and latent statistics.

Every total is a float64 sum (or, for the variance, a float64 Chan merge of per-batch moments) divided only in
`result`, so the numbers do not depend on how the tokens were batched and any number of tokens fits. The variance
behind explained variance is taken about the mean of all evaluated tokens, not per batch and not about zero:
residual streams carry a large constant direction, and measuring against zero would credit the SAE for
reproducing that constant.
"""

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from actstore.schemas.errors import UserError
from actstore.transforms.sae import SAE
from actstore.transforms.sae_init import check_width

LATENT_CHUNK_ELEMENTS = 1 << 22
"""Latent values cast to float64 at a time (32 MiB) when summing them per latent."""

EMPTY_EVALUATION = (
    "no held-out activations to evaluate the SAE on: the holdout split is empty; "
    "harvest more documents or lower the holdout share"
)


class TokenMetrics(NamedTuple):
    """Per-token values of one batch, each a numpy float32 array [N].

    Values that divide by ||x|| (nmse, cosine, norm_ratio) are NaN for an all-zero input vector, where they are
    undefined; the totals of `ReconstructionStats` skip those tokens."""

    sq_error: np.ndarray
    """sum_d (x̂ - x)²: squared reconstruction error in input units."""
    nmse: np.ndarray
    """mean_d (x̂ - x)² / mean_d x²: the error relative to the token's own energy."""
    l0: np.ndarray
    """Number of non-zero latents."""
    cosine: np.ndarray
    """cos(x, x̂); 0 when x̂ is all zero (a zero reconstruction points nowhere)."""
    norm_ratio: np.ndarray
    """||x̂|| / ||x||: below 1 means the SAE shrinks the token."""
    x_norm: np.ndarray
    """||x||, for finding outlier-norm tokens."""


class ReconstructionStats:
    """Running totals over batches of (x, x̂, latents); `result()` turns them into metrics at any point."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.d_in = d_in
        self.d_sae = d_sae
        self.tokens = 0
        self._defined = 0  # tokens with ||x|| > 0, over which nmse, cosine and norm_ratio are averaged
        self._sq_error = 0.0
        self._nmse = 0.0
        self._cosine = 0.0
        self._norm_ratio = 0.0
        self._active = 0
        self._x_hat_sq = 0.0
        self._dot = 0.0
        self._mean = np.zeros(d_in, dtype=np.float64)
        self._m2 = np.zeros(d_in, dtype=np.float64)
        # Latent statistics follow the latents' device so a batch costs no [d_sae] transfer.
        self._counts = torch.zeros(d_sae, dtype=torch.int64)
        self._value_sums = torch.zeros(d_sae, dtype=torch.float64)
        self._max = torch.zeros(d_sae, dtype=torch.float32)

    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> TokenMetrics:
        """Add one batch: x and x_hat [N, d_in], latents [N, d_sae]; returns the batch's per-token metrics."""
        n = x.shape[0] if x.ndim == 2 else -1
        if x.shape != (n, self.d_in) or x_hat.shape != x.shape or latents.shape != (n, self.d_sae):
            raise ValueError(
                f"expected x and x_hat [N, {self.d_in}] and latents [N, {self.d_sae}], got "
                f"{tuple(x.shape)}, {tuple(x_hat.shape)} and {tuple(latents.shape)}"
            )
        with torch.no_grad():
            l0 = self._update_latents(latents.detach())
            metrics = self._update_reconstruction(x.detach().double(), x_hat.detach().to(x.device, torch.float64), l0)
        self.tokens += n
        return metrics

    def _update_reconstruction(self, x: Tensor, x_hat: Tensor, l0: Tensor) -> TokenMetrics:
        """Add the reconstruction sums of one batch (x, x_hat in float64); returns its per-token metrics."""
        x_sq = x.pow(2).sum(dim=-1)
        x_hat_sq = x_hat.pow(2).sum(dim=-1)
        dot = (x * x_hat).sum(dim=-1)
        sq_error = (x_hat - x).pow(2).sum(dim=-1)
        x_norm, x_hat_norm = x_sq.sqrt(), x_hat_sq.sqrt()
        defined = x_norm > 0
        nan = torch.full_like(x_norm, float("nan"))
        nmse = torch.where(defined, sq_error / x_sq, nan)
        cosine = torch.where(defined, torch.where(x_hat_norm > 0, dot / (x_norm * x_hat_norm), 0.0), nan)
        norm_ratio = torch.where(defined, x_hat_norm / x_norm, nan)

        n = x.shape[0]
        if n:  # Chan et al.'s merge of (mean, sum of squared deviations): exact up to rounding, any batching
            batch_mean = x.mean(dim=0)
            batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
            mean, m2 = batch_mean.cpu().numpy(), batch_m2.cpu().numpy()
            total = self.tokens + n
            delta = mean - self._mean
            self._m2 += m2 + delta**2 * (self.tokens * n / total)
            self._mean += delta * (n / total)
        self._defined += int(defined.sum())
        self._sq_error += float(sq_error.sum())
        self._nmse += float(nmse[defined].sum())
        self._cosine += float(cosine[defined].sum())
        self._norm_ratio += float(norm_ratio[defined].sum())
        self._x_hat_sq += float(x_hat_sq.sum())
        self._dot += float(dot.sum())
        return TokenMetrics(
            sq_error=_numpy32(sq_error),
            nmse=_numpy32(nmse),
            l0=_numpy32(l0),
            cosine=_numpy32(cosine),
            norm_ratio=_numpy32(norm_ratio),
            x_norm=_numpy32(x_norm),
        )

    def _update_latents(self, latents: Tensor) -> Tensor:
        """Add the latent statistics of one batch; returns its per-token L0."""
        if self._counts.device != latents.device:
            self._counts, self._value_sums, self._max = (
                t.to(latents.device) for t in (self._counts, self._value_sums, self._max)
            )
        fired = latents != 0
        self._counts += fired.sum(dim=0)
        # float64 sums a slice of tokens at a time: casting the whole batch would take 8 bytes per latent value.
        step = max(1, LATENT_CHUNK_ELEMENTS // self.d_sae)
        for rows in latents.split(step):
            self._value_sums += rows.double().sum(dim=0)
        if latents.shape[0]:
            torch.maximum(self._max, latents.amax(dim=0).float(), out=self._max)
        l0 = fired.sum(dim=-1)
        self._active += int(l0.sum())
        return l0

    def result(self) -> dict[str, float | int]:
        """Metrics over every token so far (see the module docstring for why the sums are kept as they are).

        `tokens`; `l0` mean active latents; `explained_variance` 1 - Σ||x - x̂||² / Σ||x - mean(x)||²;
        `fvu` 1 - explained_variance; `nmse`, `cosine`, `norm_ratio` means of the per-token values over tokens
        with ||x|| > 0; `mse` Σ||x - x̂||² / tokens; `shrinkage` γ = E||x̂||² / E[x·x̂] (the scale that best maps
        x̂ back onto x is 1/γ: γ < 1 means the SAE shrinks); `dead` latents that never fired; `dense_1pct` and
        `dense_10pct` latents firing on more than 1% / 10% of tokens."""
        if self.tokens == 0:
            raise UserError(EMPTY_EVALUATION)
        variance = float(self._m2.sum())
        fvu = self._sq_error / variance if variance > 0 else float("nan")
        density = self.feature_counts / self.tokens
        return {
            "tokens": self.tokens,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self._sq_error / self.tokens,
            "nmse": _mean(self._nmse, self._defined),
            "l0": self._active / self.tokens,
            "cosine": _mean(self._cosine, self._defined),
            "norm_ratio": _mean(self._norm_ratio, self._defined),
            "shrinkage": self._x_hat_sq / self._dot if self._dot != 0 else float("nan"),
            "dead": int((density == 0).sum()),
            "dense_1pct": int((density > 0.01).sum()),
            "dense_10pct": int((density > 0.1).sum()),
        }

    @property
    def feature_counts(self) -> np.ndarray:
        """int64 [d_sae]: tokens on which each latent was non-zero."""
        return _snapshot(self._counts)

    @property
    def feature_value_sums(self) -> np.ndarray:
        """float64 [d_sae]: sum of each latent's values (divide by `feature_counts` for the mean when active)."""
        return _snapshot(self._value_sums)

    @property
    def feature_max(self) -> np.ndarray:
        """float32 [d_sae]: largest value of each latent, 0 for one that never fired (latents are non-negative
        in every SAE architecture here)."""
        return _snapshot(self._max)


def _snapshot(values: Tensor) -> np.ndarray:
    """A numpy copy, so a caller writing to it cannot change the running totals."""
    return values.cpu().numpy().copy()


def _numpy32(values: Tensor) -> np.ndarray:
    return values.float().cpu().numpy()


def _mean(total: float, count: int) -> float:
    return total / count if count else float("nan")


def density_histogram(counts: np.ndarray, tokens: int, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10(firing density) of the latents that fired: (edges [bins + 1], counts [bins]).

    Dead latents have no logarithm; `result()["dead"]` reports them. The range is fixed to every density a
    latent can have on `tokens` tokens, [log10(1 / tokens), 0], so two SAEs evaluated on the same tokens get
    the same edges and their histograms compare bin by bin."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if counts.size and (counts.min() < 0 or counts.max() > tokens):
        raise ValueError(f"latent counts must lie in [0, tokens={tokens}]")
    fired = counts[counts > 0]
    hist, edges = np.histogram(np.log10(fired / tokens), bins=bins, range=(-np.log10(tokens), 0.0))
    return edges, hist


def outlier_positions(x_norm: Tensor, factor: float) -> Tensor:
    """Bool mask of the same shape as `x_norm`: norm > factor × the median norm of the whole batch.

    The median and not the mean: attention-sink tokens (BOS, first position) can have norms 10-100x the rest,
    and a mean would be dragged up by the very outliers it is meant to find. The batch median is the lower
    median (torch's convention) for an even count."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if x_norm.numel() == 0:
        return torch.zeros_like(x_norm, dtype=torch.bool)
    return x_norm > factor * x_norm.float().median().to(x_norm.dtype)


def evaluate(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float | int]:
    """Every `ReconstructionStats.result()` metric of `sae` over activations [..., d_in] from `batches`.

    `mse` is the squared error summed over d_in, averaged over tokens, in input units."""
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    rescaled = sae.config.normalize_activations == "constant_norm_rescale"
    with torch.inference_mode():
        for batch in batches:
            check_width(batch, sae.d_in)
            x = batch.to(sae.device, sae.dtype).reshape(-1, sae.d_in)
            latents = sae.encode(x)
            stats.update(x, sae.decode(latents, x.norm(dim=-1) if rescaled else None), latents)
    return stats.result()
