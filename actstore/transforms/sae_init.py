"""Starting point of SAE training: weights from a seed, decoder bias and input scale from the first batches.

Decoder rows are random directions and the encoder starts as the decoder's transpose (Gao et al. 2024;
Anthropic's April 2024 update), so every latent starts out reading the direction it writes. The decoder bias
starts at the geometric median of the data, which a few outlying tokens cannot drag the way they drag a mean.
"""

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from actstore.schemas.errors import UserError
from actstore.schemas.train import TrainConfig

UNCONSTRAINED_DECODER_NORM = 0.1
"""Row norm at init when rows may grow (Anthropic's April 2024 update; SAELens' `decoder_init_norm`)."""


def initial_weights(cfg: TrainConfig, d_in: int, d_sae: int, generator: torch.Generator) -> dict[str, Tensor]:
    """float32 CPU tensors in SAELens' names; jumprelu adds `log_threshold` (its trained form)."""
    w_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
    row_norm = 1.0 if cfg.unit_norm_decoder else UNCONSTRAINED_DECODER_NORM
    w_dec *= row_norm / w_dec.norm(dim=-1, keepdim=True)
    weights = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    if cfg.architecture == "jumprelu":
        weights["log_threshold"] = torch.full((d_sae,), math.log(cfg.jumprelu_init_threshold))
    return weights


def stack_batches(batches: Tensor | Iterable[Tensor], d_in: int) -> Tensor:
    """The init batches as one float32 [n, d_in] tensor; refuses empty, misshapen or non-finite data."""
    parts = [batches] if isinstance(batches, Tensor) else list(batches)
    parts = [p.reshape(-1, p.shape[-1]) for p in parts if p.numel()]
    if not parts:
        raise UserError(
            "no activations to initialize the SAE from: the training split is empty; "
            "check the harvest and the split filter"
        )
    for part in parts:
        check_width(part, d_in)
    x = torch.cat([p.to(torch.float32) for p in parts])
    if not bool(torch.isfinite(x).all()):
        raise UserError(
            "the init batches hold non-finite activations (nan/inf): the harvest is corrupt "
            "or overflowed its dtype; re-harvest in a wider dtype"
        )
    return x


def check_width(batch: Tensor, d_in: int) -> None:
    """Refuse activations of another width (another site or model) before a reshape could hide it."""
    if batch.ndim == 0 or batch.shape[-1] != d_in:
        raise UserError(
            f"activations of shape {tuple(batch.shape)} given to an SAE that reads d_in={d_in}: "
            "pass activations of the site the SAE is trained on"
        )


def scaling_factor(x: Tensor) -> float:
    """sqrt(d_in) / mean row norm (SAELens' `expected_average_only_in`): scaled, E||x|| = sqrt(d_in)."""
    mean_norm = float(x.to(torch.float64).norm(dim=-1).mean())
    if mean_norm == 0.0:
        raise UserError(
            "the init activations are all zero, so they cannot be normalized: check the site, "
            "or set normalize_activations=none"
        )
    return math.sqrt(x.shape[-1]) / mean_norm


def geometric_median(x: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimizing the summed Euclidean distance to the rows of `x`, by Weiszfeld's iteration.

    Each step is the mean of the rows weighted by 1 / distance; a row that the estimate lands on exactly is
    given distance `eps` instead of zero (the usual guard), which only slows convergence at that point.
    Computed in float64, returned in x's dtype; stops once a step moves less than `tol` * the data's scale."""
    points = x.to(torch.float64)
    median = points.mean(dim=0)
    scale = float(points.std(dim=0).norm()) or 1.0
    eps = 1e-12 * scale
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = float((new - median).norm())
        median = new
        if moved <= tol * scale:
            break
    return median.to(x.dtype)


def initial_b_dec(cfg: TrainConfig, x_scaled: Tensor) -> Tensor:
    """Decoder bias from the (already normalized) init activations, as `cfg.b_dec_init` says."""
    if cfg.b_dec_init == "geometric_median":
        return geometric_median(x_scaled)
    if cfg.b_dec_init == "mean":
        return x_scaled.to(torch.float64).mean(dim=0).to(torch.float32)
    return torch.zeros(x_scaled.shape[-1])
