"""Map TransformerLens site names onto the modules of a Hugging Face causal LM.

`blocks.L.hook_resid_pre` is the input of decoder layer L and `hook_resid_post` its output, in every family.
`hook_attn_out` / `hook_mlp_out` are what attention / the MLP ADD to the residual stream, as in TransformerLens:
for pre-norm families (Llama and kin, GPT-2, GPT-NeoX) that is the attention / MLP module's output, for
"sandwich-norm" families (Gemma2, Gemma3, OLMo2) it is the output of the norm applied after the branch. Any
other name is taken as a raw module path (`model.layers.3.mlp.down_proj`) and captures that module's output.
"""

from collections.abc import Sequence
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig

from actstore.schemas.errors import UserError
from actstore.schemas.sites import HOOK_NAMES, parse_site

_PRE_NORM = ("self_attn", "mlp")
_SANDWICH_NORM = ("post_attention_layernorm", "post_feedforward_layernorm")

BRANCH_MODULES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "phi3",
            "olmo",
            "gemma",
            "starcoder2",
        ),
        _PRE_NORM,
    ),
    **dict.fromkeys(("gemma2", "gemma3_text", "olmo2"), _SANDWICH_NORM),
    "gpt2": ("attn", "mlp"),
    "gptj": ("attn", "mlp"),
    "gpt_neox": ("attention", "mlp"),
}
"""Per `model_type`: the modules, inside one decoder layer, whose outputs are added to the residual stream
(attention, MLP). Only families whose layout the tests check are listed; others get resid_pre/resid_post and
raw module paths."""

_LAYER_LIST_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)
"""Where families keep their decoder layers, tried in order before a search for a ModuleList of the right size."""

_PROBE_IDS = ((1, 2, 3), (4, 5, 6))
"""Token ids of the probe forward that measures raw modules (two rows, so a batch dimension shows)."""


class SiteSpec(NamedTuple):
    """Where and how to capture one site."""

    name: str
    """The site name as given; also the array name in the store."""
    module: str
    """Dotted path of the hooked module in `model.named_modules()`."""
    io: Literal["input", "output"]
    """Capture the module's input hidden states (forward pre-hook) or its output (first element of a tuple)."""
    block: int
    """Decoder block the site belongs to, for ordering and for where a forward may stop: L for `blocks.L.*` and
    for modules inside layer L; -1 for modules that run before the first layer; n_layers for those after the
    last one (final norm, lm_head)."""
    d: int
    """Width of one token's vector."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of the model's decoder layers."""
    modules = dict(model.named_modules())
    for path in _LAYER_LIST_PATHS:
        if isinstance(modules.get(path), nn.ModuleList):
            return path, modules[path]
    want = _text_config(model).num_hidden_layers
    found = [(p, m) for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == want]
    if len(found) != 1:
        raise UserError(
            f"cannot find the decoder layers of model type '{_model_type(model)}'; capture raw module paths "
            "of its layers instead (see `model.named_modules()`)"
        )
    return found[0]


def n_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model)[1])


def valid_site_names(model: nn.Module) -> list[str]:
    """Every TransformerLens-form site name this model supports, block by block."""
    hooks = _supported_hooks(model)
    return [f"blocks.{layer}.hook_{hook}" for layer in range(n_layers(model)) for hook in hooks]


def resolve_sites(model: nn.Module, names: Sequence[str]) -> list[SiteSpec]:
    """Resolve site names to hook points, in the order given; raw module paths are measured by a tiny probe."""
    layers_path, layers = decoder_layers(model)
    d_model = _text_config(model).hidden_size
    specs: list[SiteSpec | None] = []
    raw: list[str] = []
    modules = dict(model.named_modules())
    for index, name in enumerate(names):
        if name in names[:index]:
            raise UserError(f"site '{name}' is listed twice; list each site once")
        site = parse_site(name)
        if site.layer is not None and site.hook is not None:
            if site.layer >= len(layers) or site.hook not in _supported_hooks(model):
                raise UserError(_unknown_site_message(model, name))
            specs.append(_tl_spec(model, name, layers_path, site.layer, site.hook, d_model))
        elif name in modules and name != "":
            specs.append(None)
            raw.append(name)
        else:
            raise UserError(_unknown_site_message(model, name))
    measured = iter(_probe_raw_modules(model, raw, layers_path, len(layers)))
    return [spec if spec is not None else next(measured) for spec in specs]


def _tl_spec(model: nn.Module, name: str, layers_path: str, layer: int, hook: str, d_model: int) -> SiteSpec:
    layer_path = f"{layers_path}.{layer}"
    if hook == "resid_pre":
        return SiteSpec(name, layer_path, "input", layer, d_model)
    if hook == "resid_post":
        return SiteSpec(name, layer_path, "output", layer, d_model)
    attn, mlp = BRANCH_MODULES[_model_type(model)]
    branch = attn if hook == "attn_out" else mlp
    return SiteSpec(name, f"{layer_path}.{branch}", "output", layer, d_model)


def _probe_raw_modules(model: nn.Module, paths: list[str], layers_path: str, n: int) -> list[SiteSpec]:
    """Run a two-row forward to learn each raw module's width and position relative to the decoder layers.

    Widths cannot be read off module attributes in general (GPT-2's Conv1D, modules returning tuples), and a
    module that runs twice or never, or whose output is not one vector per token, cannot be stored: say so now,
    not halfway through a harvest.
    """
    if not paths:
        return []
    modules = dict(model.named_modules())
    layers = modules[layers_path]
    finished = 0
    seen: dict[str, list[tuple[torch.Size, int]]] = {p: [] for p in paths}

    def count_layer(_module: nn.Module, _args: object, _output: object) -> None:
        nonlocal finished
        finished += 1

    def record(path: str, _module: nn.Module, _args: object, output: object) -> None:
        value = first_tensor(output)
        seen[path].append((value.shape if value is not None else torch.Size(), finished))

    handles = [layer.register_forward_hook(count_layer) for layer in layers]
    handles += [modules[path].register_forward_hook(partial(record, path)) for path in paths]
    ids = torch.tensor(_PROBE_IDS, device=_device(model)).clamp_max(_text_config(model).vocab_size - 1)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    specs = []
    for path in paths:
        calls = seen[path]
        if len(calls) != 1:
            raise UserError(
                f"site '{path}': the module runs {len(calls)} times per forward pass, not once; "
                "pick a module that runs once (e.g. one decoder layer or its submodule)"
            )
        shape, done = calls[0]
        if len(shape) != 3 or tuple(shape[:2]) != ids.shape:
            raise UserError(
                f"site '{path}': the module's output has shape {tuple(shape)}, not [batch, tokens, d]; "
                "pick a module that outputs one vector per token"
            )
        specs.append(SiteSpec(path, path, "output", _raw_block(path, layers_path, done, n), int(shape[-1])))
    return specs


def _raw_block(path: str, layers_path: str, finished_layers: int, n: int) -> int:
    prefix = layers_path + "."
    if path.startswith(prefix):
        return int(path[len(prefix) :].split(".")[0])
    if finished_layers == 0:
        return -1
    return n if finished_layers == n else finished_layers - 1


def first_tensor(output: object) -> torch.Tensor | None:
    """The hidden states in a module's output: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if isinstance(output, dict) and output:
        return first_tensor(next(iter(output.values())))
    return None


def _supported_hooks(model: nn.Module) -> tuple[str, ...]:
    if _model_type(model) in BRANCH_MODULES:
        return HOOK_NAMES
    return ("resid_pre", "resid_post")


def _unknown_site_message(model: nn.Module, name: str) -> str:
    layers_path, layers = decoder_layers(model)
    n = len(layers)
    hooks = ",".join(_supported_hooks(model))
    example = f"{layers_path}.{min(3, n - 1)}"
    branches = BRANCH_MODULES.get(_model_type(model))
    if branches:
        example += f".{branches[1]}"
    return (
        f"unknown site '{name}' for {_model_type(model)} with {n} layers: valid sites are "
        f"blocks.0-{n - 1}.hook_{{{hooks}}} or a module path such as {example}"
    )


def _text_config(model: nn.Module) -> PretrainedConfig:
    config = model.config  # type: ignore[union-attr]
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_type(model: nn.Module) -> str:
    return str(_text_config(model).model_type)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
