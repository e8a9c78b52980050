"""Capture activations at resolved sites (and per-token loss) in one forward pass.

Without loss the forward stops as soon as the last requested site has been recorded: a private exception is
raised from the hook and caught here, so the layers after it never run. With loss the forward runs fully.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from actstore.transforms.hooks import RecordingHooks
from actstore.transforms.sites import SiteSpec, decoder_layers

LOSS_CHUNK_ELEMENTS = 1 << 24
"""Logits elements turned into float32 at a time by the loss (64 MiB), so memory stays bounded for big batches
and vocabularies."""


class CaptureResult(NamedTuple):
    """One batch's activations and loss."""

    acts: dict[str, torch.Tensor]
    """Site name -> [B*T, d] tensor on CPU, contiguous, in the model's dtype; row b*T + t is token t of row b.
    Created under inference mode: clone before using them in autograd."""
    loss: torch.Tensor | None
    """[B*T] float32 on CPU: at row b*T + t the cross entropy of predicting token t+1 from logits at t. The last
    position of every row has no next token in the window and is NaN. None when loss was not requested."""


class _StopForward(Exception):
    """Raised from a hook once every site is recorded, to end the forward pass early."""


class Capture(RecordingHooks):
    """Hooks registered once on a model; call with token ids to get that batch's activations.

    Hooks record only while a call is in progress, so other forwards of the same model are unaffected.
    """

    def __init__(self, model: nn.Module, specs: list[SiteSpec], loss: bool) -> None:
        if not specs and not loss:
            raise ValueError("Capture needs at least one site or loss=True")
        self.model = model
        self.specs = list(specs)
        self.loss = loss
        self._recorded: dict[str, torch.Tensor] = {}
        self._shape = (0, 0)
        self._register(model, self.specs)

    def __call__(self, input_ids: torch.Tensor) -> CaptureResult:
        """Run one batch `[B, T]` of token ids; activations of every site and, if requested, the loss."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(next(self.model.parameters()).device)
        self._recorded = {}
        self._shape = (ids.shape[0], ids.shape[1])
        self._active = True
        loss = None
        try:
            with torch.inference_mode():
                try:
                    output = self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    output = None
                if self.loss:
                    loss = per_token_loss(output.logits, ids).cpu()
        finally:
            self._active = False
        missing = [spec.name for spec in self.specs if spec.name not in self._recorded]
        if missing:
            raise RuntimeError(f"sites never ran in the forward pass: {missing}")
        acts = {spec.name: self._recorded[spec.name].cpu() for spec in self.specs}
        self._recorded = {}
        return CaptureResult(acts, loss)

    def _record(self, spec: SiteSpec, value: torch.Tensor | None) -> None:
        if value is None or tuple(value.shape) != (*self._shape, spec.d):
            shape = None if value is None else tuple(value.shape)
            raise RuntimeError(f"site {spec.name}: expected shape {(*self._shape, spec.d)}, got {shape}")
        if spec.name in self._recorded:
            raise RuntimeError(f"site {spec.name} ran twice in one forward pass")
        # A copy, because the model may reuse or modify the tensor later in the forward.
        self._recorded[spec.name] = value.detach().reshape(-1, spec.d).clone(memory_format=torch.contiguous_format)
        if not self.loss and len(self._recorded) == len(self.specs):
            raise _StopForward


def per_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B*T] float32 next-token cross entropy; the last position of each row is NaN (no target in the window).

    Computed a slice of tokens at a time so only LOSS_CHUNK_ELEMENTS logits are in float32 at once.
    """
    batch, tokens, vocab = logits.shape
    targets = input_ids.to(logits.device).roll(-1, dims=1)
    targets[:, -1] = -100
    flat_logits = logits.reshape(batch * tokens, vocab)
    flat_targets = targets.reshape(-1)
    loss = torch.empty(batch * tokens, dtype=torch.float32, device=logits.device)
    step = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    for start in range(0, batch * tokens, step):
        stop = start + step
        loss[start:stop] = F.cross_entropy(flat_logits[start:stop].float(), flat_targets[start:stop], reduction="none")
    loss.view(batch, tokens)[:, -1] = float("nan")
    return loss


def first_nonfinite(result: CaptureResult) -> tuple[str, int] | None:
    """The first (site, row) whose activation vector holds a NaN or inf, or None when all are finite.

    Capture keeps such values as they are (hiding them would corrupt the store silently); the harvest decides.
    The loss is not checked: its last position per row is NaN by definition.
    """
    for name, acts in result.acts.items():
        bad = ~torch.isfinite(acts).all(dim=1)
        if bool(bad.any()):
            return name, int(bad.nonzero()[0, 0])
    return None


def truncated_forward(model: PreTrainedModel, input_ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """A bare forward (no hooks) through the embeddings and the first `n_blocks` decoder layers only.

    The benchmark baseline for a harvest that stops at the same layer. The decoder layer list is sliced for the
    call and restored after, so the model must not be used from another thread meanwhile. Returns the base
    model's last hidden state: the final norm applied to the output of layer `n_blocks - 1`.
    """
    path, layers = decoder_layers(model)
    if not 1 <= n_blocks <= len(layers):
        raise ValueError(f"n_blocks must be in 1..{len(layers)}, got {n_blocks}")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList(list(layers)[:n_blocks]))
    try:
        with torch.inference_mode():
            ids = input_ids.to(next(model.parameters()).device)
            return model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        setattr(parent, attr, layers)
