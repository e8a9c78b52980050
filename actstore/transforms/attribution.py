"""Attribution patching of SAE features from stored gradients, and the SAE error node's share.

Hold the SAE's error fixed: x = x_hat(f) + err with err = x - x_hat(f) a constant. Then dm/df_i = (dx_hat/df_i).g
with g = dm/dx the stored gradient, and the attribution of feature i at a token is a_i = f_i (dx_hat/df_i . g),
its first-order contribution to m; zero-ablating the feature changes m by about -a_i (schemas/attribution.py).

Decoding is affine in f for every SAE here (`transforms.sae.SAE.decode`), x_hat = s (sum_i f_i c_i W_dec[i] + b_dec):
  c_i = 1 / ||W_dec[i]|| when `rescale_acts_by_decoder_norm` (latents are divided back before decoding), else 1;
  s   = 1 / scaling_factor for `expected_average_only_in`,
        ||x|| / sqrt(d_in) for `constant_norm_rescale` (the input's own norm, a constant once the error is held
        fixed: the spliced model computes it from the clean x), 1 otherwise.
So dx_hat/df_i = s c_i W_dec[i], and x.g splits exactly into sum_i a_i + s (b_dec.g) + (x - x_hat).g.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from actstore.transforms.sae import SAE


class TokenAttribution(NamedTuple):
    """Per token of a batch: the SAE's latents and the first-order contributions to the metric."""

    latents: Tensor
    """[N, d_sae] latents f."""
    attribution: Tensor
    """[N, d_sae] f_i (dx_hat/df_i . g); zero wherever f_i is."""
    bias: Tensor
    """[N] s (b_dec . g): the decoder bias' part of x_hat."""
    error: Tensor
    """[N] (x - x_hat) . g: the error node's attribution."""
    total: Tensor
    """[N] x . g = attribution.sum(-1) + bias + error."""


def unit_directions(sae: SAE) -> Tensor:
    """[d_sae, d_in] float32: c_i W_dec[i] / scaling_factor, the change of x_hat per unit of latent i up to the
    per-token factor ||x|| / sqrt(d_in) of `constant_norm_rescale` SAEs (which `token_scale` gives)."""
    directions = sae.W_dec.detach().float()
    if sae.config.rescale_acts_by_decoder_norm:
        directions = directions / directions.norm(dim=-1, keepdim=True)
    if sae.config.normalize_activations == "expected_average_only_in":
        directions = directions / float(sae.config.scaling_factor)  # type: ignore[arg-type]
    return directions


def token_scale(sae: SAE, x: Tensor) -> Tensor:
    """[N] float32 per-token factor s of the decoder path: ||x|| / sqrt(d_in) for `constant_norm_rescale`, else 1
    (a constant scaling factor is in `unit_directions`)."""
    if sae.config.normalize_activations == "constant_norm_rescale":
        return x.to(sae.dtype).norm(dim=-1).float() / math.sqrt(sae.d_in)
    return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


def unit_bias(sae: SAE) -> Tensor:
    """[d_in] float32 b_dec / scaling_factor: the bias' part of x_hat up to the per-token `token_scale`."""
    bias = sae.b_dec.detach().float()
    if sae.config.normalize_activations == "expected_average_only_in":
        bias = bias / float(sae.config.scaling_factor)  # type: ignore[arg-type]
    return bias


def feature_attribution(latents: Tensor, directions: Tensor, scale: Tensor, g: Tensor) -> Tensor:
    """[N, d_sae] float32 f_i * s * (directions[i] . g): each feature's first-order contribution at each token.

    `directions` [d_sae, d_in] is `unit_directions(sae)` (or W_dec for a plain SAE), `scale` [N] is
    `token_scale(sae, x)`, `g` [N, d_in] the metric's gradient at the site."""
    return latents.float() * scale[:, None] * (g.float() @ directions.T)


def error_attribution(x: Tensor, x_hat: Tensor, g: Tensor) -> Tensor:
    """[N] float32 (x - x_hat) . g: the error node's contribution (zero-ablating the error changes m by about
    minus this)."""
    return ((x.float() - x_hat.float()) * g.float()).sum(dim=-1)


def attribute_batch(sae: SAE, x: Tensor, g: Tensor) -> TokenAttribution:
    """Latents, feature attributions and the bias / error / total terms of activations `x` [N, d_in] with
    metric gradients `g` [N, d_in] (float32 results on `x`'s device)."""
    with torch.inference_mode():
        inputs = x.to(sae.dtype)
        latents = sae.encode(inputs)
        rescaled = sae.config.normalize_activations == "constant_norm_rescale"
        x_hat = sae.decode(latents, inputs.norm(dim=-1) if rescaled else None)
        scale = token_scale(sae, inputs)
        directions = unit_directions(sae)
        bias = scale * (g.float() @ unit_bias(sae))
        return TokenAttribution(
            latents=latents.float(),
            attribution=feature_attribution(latents, directions, scale, g),
            bias=bias,
            error=error_attribution(inputs, x_hat, g),
            total=(inputs.float() * g.float()).sum(dim=-1),
        )
