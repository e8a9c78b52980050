"""Sparse autoencoders at inference: one module for the five SAELens architectures, plus load/save.

Equations follow SAELens (x' is the input after normalization, minus b_dec when `apply_b_dec_to_input`):
standard `relu(x' W_enc + b_enc)`; topk keeps the k largest pre-activations and applies ReLU to them;
jumprelu and batchtopk (a JumpReLU with its learned global threshold at inference) keep `pre` where
`pre > threshold` and `pre > 0`; gated `1[x' W_enc + b_gate > 0] * relu(x' (W_enc * exp(r_mag)) + b_mag)`;
decode `f W_dec + b_dec`, then the normalization undone. Two deliberate differences, both documented below:
TopK ties are broken toward the lower latent index (torch.topk leaves them to the device), and
`constant_norm_rescale` maps an all-zero row to zero instead of NaN.
"""

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from actstore.schemas.errors import UserError
from actstore.schemas.ids import slug
from actstore.schemas.sae import SAE_DTYPES, SAEConfig
from actstore.transforms.sae_loaders import read_checkpoint, validate_weights, write_saelens


class SAE(nn.Module):
    """Encoder/decoder of one SAE; parameters carry SAELens' names, so `state_dict()` is SAELens' too.

    The parameters share storage with `weights` and do not require grad (this is the inference path; a
    trainer may call `requires_grad_()`). Which of them exist depends on the architecture."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    b_enc: nn.Parameter
    threshold: nn.Parameter
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter

    def __init__(self, cfg: SAEConfig, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        validate_weights(cfg, dict(weights), "the given weights")
        self._cfg = cfg
        for name in cfg.tensor_shapes():
            setattr(self, name, nn.Parameter(weights[name].detach(), requires_grad=False))

    @property
    def config(self) -> SAEConfig:
        """The config, with dtype and device as the weights are now (after any `.to()`)."""
        return self._cfg.model_copy(
            update={"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device)}
        )

    @property
    def architecture(self) -> str:
        return self._cfg.architecture

    @property
    def d_in(self) -> int:
        return self._cfg.d_in

    @property
    def d_sae(self) -> int:
        return self._cfg.d_sae

    @property
    def hook_name(self) -> str | None:
        return self._cfg.hook_name

    @property
    def model_name(self) -> str | None:
        return self._cfg.model_name

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., d_sae] of activations [..., d_in] (cast to the SAE's dtype)."""
        x = self._normalize_in(x.to(self.dtype))
        if self._cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        arch = self._cfg.architecture
        if arch == "gated":
            # x'(W_enc * exp(r_mag)) == (x' W_enc) * exp(r_mag): one matmul serves both paths.
            hidden = x @ self.W_enc
            gate = hidden + self.b_gate > 0
            return gate * torch.relu(hidden * self.r_mag.exp() + self.b_mag)
        pre = x @ self.W_enc + self.b_enc
        if arch == "standard":
            return torch.relu(pre)
        if arch == "topk":
            if self._cfg.rescale_acts_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            return topk_relu(pre, int(self._cfg.k))  # type: ignore[arg-type]
        return torch.relu(pre) * (pre > self.threshold)  # jumprelu, batchtopk

    def decode(self, f: Tensor, x_norm: Tensor | None = None) -> Tensor:
        """Reconstruction [..., d_in] of latents [..., d_sae].

        `constant_norm_rescale` SAEs scale each input row to norm sqrt(d_in), so undoing it needs the
        original row norms: pass `x_norm=x.norm(dim=-1)` (`forward` does)."""
        f = f.to(self.dtype)
        if self._cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        out = f @ self.W_dec + self.b_dec
        if self._cfg.normalize_activations == "expected_average_only_in":
            return out / self._cfg.scaling_factor  # type: ignore[operator]
        if self._cfg.normalize_activations == "constant_norm_rescale":
            if x_norm is None:
                raise ValueError(
                    "a constant_norm_rescale SAE decodes with the input row norms: decode(f, x_norm=x.norm(dim=-1))"
                )
            return out * (x_norm.to(out.dtype) / math.sqrt(self.d_in)).unsqueeze(-1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of `x` through the latents."""
        rescaled = self._cfg.normalize_activations == "constant_norm_rescale"
        return self.decode(self.encode(x), x.to(self.dtype).norm(dim=-1) if rescaled else None)

    def _normalize_in(self, x: Tensor) -> Tensor:
        mode = self._cfg.normalize_activations
        if mode == "expected_average_only_in":
            return x * self._cfg.scaling_factor
        if mode == "constant_norm_rescale":
            # A zero row is divided by 1, not 0: it stays zero instead of becoming NaN as in SAELens.
            scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
            return x / torch.where(scale > 0, scale, 1.0)
        return x

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.dtype}"


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """ReLU of the k largest entries of each row, zero elsewhere; ties at the k-th value go to lower indices.

    torch.topk picks among equal values in a device-dependent way; the feature store must give the same
    latents for the same activations on any device. A tie matters only when the (k+1)-th largest value
    equals a positive k-th, which the k+1 largest values show without another pass over the row."""
    if k >= pre.shape[-1]:
        return torch.relu(pre)
    values, indices = pre.topk(k + 1, dim=-1, sorted=True)
    out = torch.zeros_like(pre).scatter_(-1, indices[..., :k], values[..., :k].relu())
    kth = values[..., k - 1 : k]
    tied = (values[..., k] == kth[..., 0]) & (kth[..., 0] > 0)
    if bool(tied.any()):  # rare for real activations; only these rows pay for ranking by index
        rows, row_kth = pre[tied], kth[tied]
        above, equal = rows > row_kth, rows == row_kth
        room = k - above.sum(dim=-1, keepdim=True)  # kept values are >= kth > 0: no ReLU needed
        out[tied] = torch.where(above | (equal & (equal.cumsum(dim=-1) <= room)), rows, 0.0)
    return out


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> SAE:
    """Load a SAELens directory, a sparsify directory or a Gemma Scope `params.npz` (never a pickle).

    `dtype` overrides the checkpoint's (SAELens casts to the config's dtype the same way)."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in SAE_DTYPES:
            raise UserError(f"SAE dtype {dtype!r} is not supported: use one of {', '.join(SAE_DTYPES)}")
        dtype = getattr(torch, dtype.removeprefix("torch."))
    cfg, weights = read_checkpoint(path)
    return SAE(cfg, weights).to(device=device, dtype=dtype)


def save(sae: SAE, path: str | os.PathLike[str]) -> None:
    """Write SAELens' layout (`sae_weights.safetensors` + `cfg.json`), which SAELens and `load` both read."""
    write_saelens(path, sae.config, dict(sae.named_parameters()))


def check_compatible(sae: SAE, d_in: int, site: str, model: str, allow_mismatch: bool) -> None:
    """Refuse to encode a harvest the SAE was not trained on, unless the user asks for a transfer.

    A width mismatch cannot be overridden. Models compare by slug (`google/gemma-2-2b` matches `gemma-2-2b`);
    an SAE that records no hook or model name is not checked on it."""
    if d_in != sae.d_in:
        raise UserError(
            f"SAE reads d_in={sae.d_in} but site {site} of {model} has width {d_in}: use an SAE trained on this site"
        )
    if allow_mismatch:
        return
    if sae.hook_name is not None and sae.hook_name != site:
        raise UserError(
            f"SAE was trained on {sae.hook_name}, not {site}: pick the matching site, or pass "
            "--allow-mismatch to transfer it deliberately"
        )
    if sae.model_name is not None and slug(sae.model_name) != slug(model):
        raise UserError(
            f"SAE was trained on model {sae.model_name}, not {model}: use the matching model, or "
            "pass --allow-mismatch to transfer it deliberately"
        )
