"""Replace a site's activations inside the forward pass, and measure what that does to the next-token predictions.

A `Splice` puts hooks on the sites once; `set` says what each site's activation becomes in the forwards that
follow. The hooks only compute, so a splice works under `torch.inference_mode()` (evaluation) and under
autograd alike (gradients through an SAE, or through an intervention such as a directional ablation
`x - r rᵀx`, reach whatever the replacement depends on). `downstream` is the evaluation: the clean forward once,
one spliced forward per variant, next-token cross entropy and KL(clean || variant) per token.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actstore.schemas.errors import UserError
from actstore.transforms.capture import LOSS_CHUNK_ELEMENTS
from actstore.transforms.hooks import SiteHooks
from actstore.transforms.sae import SAE
from actstore.transforms.sae_init import check_width
from actstore.transforms.sites import SiteSpec, first_tensor

Replacement = Callable[[Tensor], Tensor]
"""A site's activation [B, T, d] -> what the rest of the model sees instead, [B, T, d]."""

CLEAN = "clean"
"""Key of the unmodified forward in `downstream`'s result."""


class Splice(SiteHooks):
    """Hooks on one or more sites that replace their activations while replacements are set.

    Use as a context manager so the hooks are removed. `calls[name]` counts how often the site ran since the
    last `set`, so a caller can prove a replacement was applied exactly once per forward."""

    def __init__(self, model: nn.Module, specs: list[SiteSpec]) -> None:
        self.model = model
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise UserError(f"a site is listed twice in {[s.name for s in specs]}; list each site once")
        self.calls = dict.fromkeys(self.specs, 0)
        self._replacements: dict[str, Replacement] = {}
        self._keep: Tensor | None = None
        self._register(model, list(specs))

    def set(self, replacements: dict[str, Replacement | None], keep: Tensor | None = None) -> None:
        """Apply `replacements[site]` to that site's activation in the following forwards (None or absent:
        leave it clean); where `keep` [B, T] is True the original activation is kept (e.g. BOS or
        outlier-norm tokens, which SAEs are usually not trained on). Resets `calls`."""
        unknown = sorted(set(replacements) - set(self.specs))
        if unknown:
            raise UserError(
                f"cannot splice {unknown}: the splice hooks only {sorted(self.specs)}; "
                "list the site when creating the Splice"
            )
        if keep is not None and (keep.ndim != 2 or keep.dtype != torch.bool):
            raise UserError(
                f"keep must be a bool mask [batch, tokens], got {keep.dtype} of shape "
                f"{tuple(keep.shape)}: pass one bool per token of input_ids"
            )
        self._replacements = {name: fn for name, fn in replacements.items() if fn is not None}
        self._keep = keep
        self.calls = dict.fromkeys(self.specs, 0)

    def _on_input(
        self, spec: SiteSpec, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self.calls[spec.name] += 1
        if spec.name not in self._replacements:
            return None
        # HF passes the hidden states positionally in most families, by keyword in some.
        if args:
            return (self._replace(spec, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._replace(spec, kwargs["hidden_states"])}

    def _on_output(self, spec: SiteSpec, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        self.calls[spec.name] += 1
        if spec.name not in self._replacements:
            return None
        value = first_tensor(output)
        if value is None:
            raise RuntimeError(f"site {spec.name}: the module's output holds no tensor to replace")
        return _with_first_tensor(output, self._replace(spec, value))

    def _replace(self, spec: SiteSpec, value: Tensor) -> Tensor:
        replaced = self._replacements[spec.name](value)
        if replaced.shape != value.shape:
            raise UserError(
                f"the replacement at site {spec.name} returned shape {tuple(replaced.shape)} for an "
                f"activation of shape {tuple(value.shape)}: return a tensor shaped like its input"
            )
        replaced = replaced.to(value.device, value.dtype)
        if self._keep is None:
            return replaced
        if self._keep.shape != value.shape[:2]:
            raise UserError(
                f"keep has shape {tuple(self._keep.shape)} but site {spec.name} has "
                f"[batch, tokens] = {tuple(value.shape[:2])}: pass one bool per token of input_ids"
            )
        return torch.where(self._keep.to(value.device).unsqueeze(-1), value, replaced)


def _with_first_tensor(output: Any, value: Tensor) -> Any:
    """`output` with the tensor `first_tensor` finds in it swapped for `value`.

    Tuples are rebuilt; a dict (an HF ModelOutput) is updated in place, since rebuilding a ModelOutput from its
    fields is not uniform across classes and the object is the module's fresh return value anyway."""
    if isinstance(output, Tensor):
        return value
    if isinstance(output, (tuple, list)):
        items = (_with_first_tensor(output[0], value), *output[1:])
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)  # namedtuple or not
    first = next(iter(output))
    output[first] = _with_first_tensor(output[first], value)
    return output


class DownstreamTokens(NamedTuple):
    """One forward's effect on the next-token predictions, per token, float32 on CPU; row b*T + t is token t
    of row b, and the last position of each row (no next token in the window) is NaN."""

    ce: Tensor
    """[B*T] cross entropy of the next token from this forward's logits."""
    kl: Tensor
    """[B*T] KL(clean || this forward) of the next-token distributions, in nats; 0 for the clean forward."""


def downstream(
    model: nn.Module,
    specs: list[SiteSpec],
    input_ids: Tensor,
    variants: dict[str, dict[str, Replacement]],
    keep: Tensor | None = None,
) -> dict[str, DownstreamTokens]:
    """Cross entropy and KL per token of the clean forward (key "clean") and of one spliced forward per variant.

    `variants` maps a variant name to its replacements by site; `keep` [B, T] applies to every variant. The
    clean logits are kept while the variants run (KL needs them) and each variant's logits are dropped before
    the next, so at most two batches of logits exist at once, in the model's dtype; they are turned into float32
    log-probabilities a slice of tokens at a time (`LOSS_CHUNK_ELEMENTS`), which keeps vocabularies of 250k
    affordable."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if CLEAN in variants:
        raise UserError(f"a variant is named '{CLEAN}', which is the unmodified forward's key: rename the variant")
    ids = input_ids.to(next(model.parameters()).device)
    result = {}
    with Splice(model, specs) as splice, torch.inference_mode():
        clean_logits = model(input_ids=ids, use_cache=False).logits
        ce, _ = _token_losses(clean_logits, clean_logits, ids)
        result[CLEAN] = DownstreamTokens(ce, torch.where(ce.isnan(), ce, 0.0))
        for name, replacements in variants.items():
            splice.set(dict(replacements), keep)
            logits = model(input_ids=ids, use_cache=False).logits
            applied = {site for site, fn in replacements.items() if fn is not None}
            wrong = {site: n for site, n in splice.calls.items() if site in applied and n != 1}
            if wrong:
                raise RuntimeError(f"variant {name}: spliced sites ran {wrong} times in one forward, not once")
            result[name] = DownstreamTokens(*_token_losses(clean_logits, logits, ids))
            del logits
    return result


def _token_losses(clean_logits: Tensor, logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE of `logits` and KL(clean || logits), a slice of tokens at a time in float32."""
    batch, tokens, vocab = logits.shape
    targets = input_ids.roll(-1, dims=1).reshape(-1)
    clean_flat, flat = clean_logits.reshape(batch * tokens, vocab), logits.reshape(batch * tokens, vocab)
    ce = torch.empty(batch * tokens, dtype=torch.float32, device=logits.device)
    kl = torch.empty_like(ce)
    step = max(1, LOSS_CHUNK_ELEMENTS // vocab)
    for start in range(0, batch * tokens, step):
        rows = slice(start, start + step)
        log_q = F.log_softmax(flat[rows].float(), dim=-1)
        ce[rows] = F.nll_loss(log_q, targets[rows], reduction="none")
        if clean_logits is logits:
            continue
        log_p = F.log_softmax(clean_flat[rows].float(), dim=-1)
        p = log_p.exp()
        # p log(p / q), in place to spare a slice-sized temporary; 0 log 0 = 0, so a token the clean model rules
        # out (a -inf logit) adds nothing instead of NaN.
        kl[rows] = log_p.sub_(log_q).mul_(p).masked_fill_(p == 0, 0.0).sum(dim=-1)
    last = (slice(None), -1)
    ce.view(batch, tokens)[last] = float("nan")
    kl.view(batch, tokens)[last] = float("nan")
    return ce.cpu(), kl.cpu()


def ce_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """Share of the loss an ablation costs that the splice recovers: (ablated - spliced) / (ablated - clean).

    1 means the splice is as good as the clean model, 0 as bad as the ablation; NaN when the ablation costs
    nothing, as then there is nothing to recover."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else float("nan")


def sae_replacement(sae: SAE) -> Replacement:
    """x -> the SAE's reconstruction of x, computed in the SAE's dtype on its device, returned in x's."""
    rescaled = sae.config.normalize_activations == "constant_norm_rescale"

    def reconstruct(x: Tensor) -> Tensor:
        check_width(x, sae.d_in)
        flat = x.reshape(-1, sae.d_in).to(sae.device, sae.dtype)
        out = sae.decode(sae.encode(flat), flat.norm(dim=-1) if rescaled else None)
        return out.reshape(x.shape).to(x.device, x.dtype)

    return reconstruct


def zero_replacement() -> Replacement:
    """x -> 0: the zero ablation that `ce_recovered` usually measures against."""
    return torch.zeros_like


def mean_replacement(mean: Tensor) -> Replacement:
    """x -> `mean` [d] at every token: the mean ablation, which keeps the site's constant direction."""
    if mean.ndim != 1:
        raise UserError(
            f"the mean for a mean ablation must be one vector [d], got shape {tuple(mean.shape)}: "
            "average the site's activations over tokens"
        )

    def replace(x: Tensor) -> Tensor:
        if x.shape[-1] != mean.shape[0]:
            raise UserError(
                f"the mean has width {mean.shape[0]} but the site's activations have width "
                f"{x.shape[-1]}: take the mean of this site"
            )
        return mean.to(x.device, x.dtype).expand(x.shape).contiguous()

    return replace
