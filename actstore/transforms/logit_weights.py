"""Direct logit weights of residual-stream directions: `W_dec[i] · W_U`, with the final norm's gain folded in.

A feature written into the residual stream reaches the logits through the final norm and the unembedding. The
norm's per-channel gain is linear and part of that path, so it is folded into `W_U`; its division by the
token's RMS (or its centring, for LayerNorm) depends on the whole vector and is left out, as is usual for
direct logit attribution. Gemma-family norms scale by `1 + weight`, the others by `weight`.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from actstore.schemas.errors import UserError

_ONE_PLUS_WEIGHT = ("gemma", "gemma2", "gemma3_text", "gemma3")
"""`model_type`s whose RMSNorm multiplies by `1 + weight` rather than `weight`."""

_FINAL_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
)


class TopTokens(NamedTuple):
    """The tokens a direction promotes and suppresses most, per direction."""

    positive_ids: Tensor
    """[n, k] int64 token ids, largest logit weight first."""
    positive_values: Tensor
    """[n, k] float32 logit weights of those tokens."""
    negative_ids: Tensor
    """[n, k] int64 token ids, most negative logit weight first."""
    negative_values: Tensor
    """[n, k] float32 logit weights of those tokens."""


def unembedding(model: nn.Module) -> Tensor:
    """`[d_model, vocab]` float32 on CPU: the output embedding with the final norm's gain folded in."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"model {type(model).__name__} has no output embedding: logit weights need a causal LM head")
    w_u = head.weight.detach().to(torch.float32).cpu().T.clone()
    gain = _final_norm_gain(model)
    if gain is not None and gain.shape[0] == w_u.shape[0]:
        w_u *= gain[:, None]
    return w_u


def logit_weights(directions: Tensor, w_u: Tensor, batch: int = 1024) -> Tensor:
    """`[n, vocab]` float32: each row of `directions` ([n, d_model]) times `w_u`, in slices of `batch` rows."""
    if directions.shape[-1] != w_u.shape[0]:
        raise UserError(
            f"directions have width {directions.shape[-1]} but the unembedding expects {w_u.shape[0]}: "
            "use an SAE trained on this model's residual stream"
        )
    rows = directions.detach().to(torch.float32).cpu()
    return torch.cat([rows[i : i + batch] @ w_u for i in range(0, len(rows), batch)]) if len(rows) else rows @ w_u


def top_tokens(directions: Tensor, w_u: Tensor, k: int = 10, batch: int = 1024) -> TopTokens:
    """Top-k promoted and suppressed tokens of every direction, without keeping the full [n, vocab] matrix."""
    k = min(k, w_u.shape[1])
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, max(len(directions), 1), batch):
        weights = logit_weights(directions[start : start + batch], w_u)
        pos = weights.topk(k, dim=-1)
        neg = weights.topk(k, dim=-1, largest=False)
        parts.append((pos.indices, pos.values, neg.indices, neg.values))
    return TopTokens(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def _final_norm_gain(model: nn.Module) -> Tensor | None:
    modules = dict(model.named_modules())
    norm = next((modules[p] for p in _FINAL_NORM_PATHS if p in modules), None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    gain = weight.detach().to(torch.float32).cpu()
    model_type = getattr(model.config.get_text_config(), "model_type", "")
    return 1.0 + gain if model_type in _ONE_PLUS_WEIGHT else gain
