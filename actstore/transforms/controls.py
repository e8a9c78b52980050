"""Model controls: a copy of a model with its learned structure destroyed, same architecture, dtype and device.

An activation feature means something about training only if it is absent from a model that was never trained
(or whose weights were scrambled); these controls are that baseline. What each kind touches:

- `reinit`: every parameter, token embedding included, is drawn afresh by the model's own Hugging Face init
  scheme (`_init_weights`: Linear and Embedding weights normal with `initializer_range`, biases zero, norms
  back to ones, GPT-2's scaled residual projections, ...), so the copy is the model as `from_config` would
  build it. The embedding is re-initialised too because a kept embedding carries learned token structure into
  every layer through the residual stream; `keep_embeddings` keeps it (and the unembedding) for the weaker
  "all but embeddings" control. Buffers computed from the config (rotary frequencies) are recomputed, equal to
  before. A parameter the init scheme does not cover is refused rather than left trained.
- `permute`: the entries of every parameter tensor (embeddings, weights, biases, norm gains) are shuffled by a
  seeded permutation of their own: each tensor keeps its exact values, so norms and marginal distributions
  match the trained model, and only the arrangement training found is lost. Buffers are left alone.
- `perturb`: every parameter gets Gaussian noise with std `scale` x that tensor's own std, so its relative
  Frobenius distance from the trained tensor is about `scale` (for tensors whose mean is small against their
  std, which holds for weight matrices); a dose-response control between the trained model and noise.

Tied parameters are one tensor, changed once, and stay tied. Draws are seeded and made with CPU generators,
except `reinit`, which runs the model's init under `torch.manual_seed` on the model's own device: its weights
are a function of the seed, the architecture, the transformers version and the device type, so `load_model`
applies every control on the CPU before moving the model, and the same config gives the same weights
everywhere.
"""

import hashlib

import torch
from transformers import PreTrainedModel

from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelControl


def apply_control(model: PreTrainedModel, control: ModelControl) -> PreTrainedModel:
    """Change `model`'s parameters in place as `control` says and return it (same architecture, dtype, device)."""
    kept = _kept_parameters(model) if control.keep_embeddings else {}
    saved = {name: param.detach().clone() for name, param in kept.items()}
    with torch.no_grad():
        if control.kind == "reinit":
            _reinit(model, control.seed, skip=set(kept))
        else:
            for name, param in model.named_parameters():
                if name in kept:
                    continue
                generator = torch.Generator().manual_seed(_tensor_seed(control.seed, name))
                if control.kind == "permute":
                    _permute(param, generator)
                else:
                    _perturb(param, float(control.scale or 0.0), generator)
        for name, value in saved.items():
            kept[name].copy_(value)
    return model


def _kept_parameters(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The token embedding and unembedding, by their names in `named_parameters` (a tied pair is one name)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    ids = {id(module.weight) for module in wanted if module is not None and getattr(module, "weight", None) is not None}
    return {name: param for name, param in model.named_parameters() if id(param) in ids}


def _tensor_seed(seed: int, name: str) -> int:
    """A generator seed per (control seed, parameter name): a tensor's draws do not depend on the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _permute(param: torch.Tensor, generator: torch.Generator) -> None:
    order = torch.randperm(param.numel(), generator=generator).to(param.device)
    param.copy_(param.reshape(-1)[order].reshape(param.shape))


def _perturb(param: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """Add noise of std `scale * std(param)`, computed in float32 so half-precision tensors get the same draws."""
    values = param.detach().float()
    std = values.std(correction=0) if values.numel() else torch.tensor(0.0)
    noise = torch.randn(param.shape, generator=generator).to(param.device)
    param.copy_(values + noise * (scale * std))


def _reinit(model: PreTrainedModel, seed: int, skip: set[str]) -> None:
    """Run the model's own init over every module, with HF's "already loaded" marks cleared.

    Every parameter is first filled with NaN, so one the init scheme does not write is caught afterwards
    instead of silently keeping its trained values.
    """
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is not None:
                tensor.__dict__.pop("_is_hf_initialized", None)
    for name, param in model.named_parameters():
        if name not in skip and param.is_floating_point():
            param.fill_(float("nan"))
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.initialize_weights()
    untouched = [
        name
        for name, param in model.named_parameters()
        if name not in skip and param.is_floating_point() and torch.isnan(param).any()
    ]
    if untouched:
        raise UserError(
            f"the init scheme of {type(model).__name__} does not cover {', '.join(untouched[:3])}: "
            "use --control permute or --control perturb for this model"
        )
