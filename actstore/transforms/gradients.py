"""Activations at resolved sites together with the gradient of a per-token metric with respect to them.

One forward with autograd and one backward per batch. The metric m is summed over every position of every
window of the batch before differentiating, so the gradient stored at token t is d(sum_t' m_t')/dx_t: the
effect of changing token t's activation on the whole window's metric (windows are independent, so summing over
the batch is the same as summing per window). That is the gradient attribution patching uses over a prompt.

Only the sites' activations need a gradient, not the weights: the model's parameters stay frozen (as
`transforms.models.load_model` leaves them) and the first site to run is made a leaf that requires grad, so no
weight gradient is ever computed or stored.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from actstore.schemas.errors import UserError
from actstore.schemas.harvest import GradientMetric
from actstore.transforms.capture import per_token_loss
from actstore.transforms.hooks import RecordingHooks
from actstore.transforms.sites import SiteSpec


class GradientResult(NamedTuple):
    """One batch's activations, gradients and loss; row b*T + t is token t of window b."""

    acts: dict[str, Tensor]
    """Site name -> [B*T, d] activations on CPU, in the model's dtype (as `transforms.capture` gives them)."""
    grads: dict[str, Tensor]
    """Site name -> [B*T, d] float32 on CPU: d(sum of the metric over the window's positions)/d(activation)."""
    loss: Tensor
    """[B*T] float32 next-token cross entropy; the last position of each window is NaN (no target)."""
    metric: Tensor
    """[B*T] float32 per-token metric that was differentiated (the loss itself for `loss`; NaN where it has no
    value, i.e. the last position for `loss`)."""


def check_logit_diff_tokens(model: nn.Module, tokens: tuple[int, int]) -> None:
    """Refuse logit-diff token ids the model has no logit for."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if max(tokens) >= vocab or min(tokens) < 0:
        raise UserError(
            f"logit-diff tokens {list(tokens)} are outside the model's vocabulary of {vocab} tokens: "
            f"pass ids in 0..{vocab - 1}"
        )


class GradientCapture(RecordingHooks):
    """Hooks registered once on a model; call with token ids to get that batch's activations and gradients.

    Hooks record only while a call is in progress, so other forwards of the same model are unaffected."""

    def __init__(
        self,
        model: nn.Module,
        specs: list[SiteSpec],
        metric: GradientMetric,
        logit_diff_tokens: tuple[int, int] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("GradientCapture needs at least one site")
        if metric == "logit_diff":
            if logit_diff_tokens is None:
                raise UserError("gradient metric logit_diff needs two token ids: pass --logit-diff A B")
            check_logit_diff_tokens(model, logit_diff_tokens)
        self.model = model
        self.specs = list(specs)
        self.metric = metric
        self.logit_diff_tokens = logit_diff_tokens
        self._recorded: dict[str, Tensor] = {}
        self._register(model, self.specs)

    def __call__(self, input_ids: Tensor) -> GradientResult:
        """Run one batch `[B, T]` of token ids forward and backward."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(next(self.model.parameters()).device)
        self._recorded = {}
        self._active = True
        try:
            with torch.inference_mode(False), torch.enable_grad():
                logits = self.model(input_ids=ids, use_cache=False).logits
                self._active = False
                missing = [spec.name for spec in self.specs if spec.name not in self._recorded]
                if missing:
                    raise RuntimeError(f"sites never ran in the forward pass: {missing}")
                loss = per_token_loss(logits, ids)
                metric = loss if self.metric == "loss" else self._logit_diff(logits)
                values = [self._recorded[spec.name] for spec in self.specs]
                grads = torch.autograd.grad(metric.nansum(), values, allow_unused=True)
        finally:
            self._active = False
            self._recorded = {}
        acts, out = {}, {}
        for spec, value, grad in zip(self.specs, values, grads, strict=True):
            acts[spec.name] = value.detach().reshape(-1, spec.d).cpu().clone(memory_format=torch.contiguous_format)
            # A site the metric does not depend on (none in a causal LM's residual stream) has zero gradient.
            grad = torch.zeros_like(value) if grad is None else grad
            out[spec.name] = grad.detach().reshape(-1, spec.d).to(device="cpu", dtype=torch.float32).contiguous()
        return GradientResult(acts, out, loss.detach().cpu(), metric.detach().cpu())

    def _logit_diff(self, logits: Tensor) -> Tensor:
        a, b = self.logit_diff_tokens  # type: ignore[misc]
        return (logits[..., a].float() - logits[..., b].float()).reshape(-1)

    def _record(self, spec: SiteSpec, value: Tensor | None) -> None:
        if value is None or value.ndim != 3 or value.shape[-1] != spec.d:
            shape = None if value is None else tuple(value.shape)
            raise RuntimeError(f"site {spec.name}: expected [batch, tokens, {spec.d}], got {shape}")
        if spec.name in self._recorded:
            raise RuntimeError(f"site {spec.name} ran twice in one forward pass")
        if not value.requires_grad:
            # Nothing before this site requires grad (frozen weights): it becomes the leaf gradients start from.
            value.requires_grad_()
        # The tensor itself, not a copy: the gradient must be taken with respect to what the model goes on using.
        self._recorded[spec.name] = value
