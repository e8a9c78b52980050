"""Site names: TransformerLens form (`blocks.6.hook_resid_post`) or a raw module path of the HF model."""

import re
from typing import Literal, NamedTuple

HookName = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]
HOOK_NAMES: tuple[HookName, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
SITE_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")


class Site(NamedTuple):
    """A parsed site name."""

    name: str
    """The name as given, used as the array name in the store."""
    layer: int | None
    """Block index for TransformerLens names; None for raw module paths."""
    hook: HookName | None
    """Which residual-stream quantity; None for raw module paths (the module's output is stored)."""


def parse_site(name: str) -> Site:
    """Parse `blocks.L.hook_X`; anything else is taken as a raw module path (validated against the model)."""
    m = SITE_PATTERN.match(name)
    if m:
        return Site(name, int(m.group(1)), m.group(2))  # type: ignore[arg-type]
    return Site(name, None, None)


def tl_site_names(n_layers: int) -> list[str]:
    """All TransformerLens-form site names of a model with `n_layers` blocks."""
    return [f"blocks.{layer}.hook_{hook}" for layer in range(n_layers) for hook in HOOK_NAMES]
