"""Directions in activation space and the interventions that use them.

A direction is the difference in means of a site's activations between two labelled token sets of a harvest
(`store/directions/<direction_id>/`). An intervention applies one at chosen sites of a forward pass; a harvest
with interventions is a new harvest with its own id."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.ids import make_id, slug

DIRECTION_FILE = "direction.safetensors"
"""`direction` (r = mean(positive) - mean(negative)), `unit` (r / ||r||), `mean_positive`, `mean_negative`,
`mean` (both sets pooled), float32."""


class DirectionConfig(BaseModel):
    """Two token sets of one harvest site, each a SQL filter on the token table (`pos > 0 AND doc < 100`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harvest_id: str
    """Harvest whose activations are averaged."""
    site: str
    """Site of that harvest."""
    positive: str
    """SQL filter on the token table (tok, doc, seq, pos, token_id, split) selecting the positive set."""
    negative: str
    """SQL filter selecting the negative set; a token in both sets is an error."""
    split: Literal["train", "holdout", "all"] = "train"
    """Tokens the means are taken over; held-out tokens stay unseen for probing the result."""

    def direction_id(self) -> str:
        return make_id("direction", slug(self.site.replace("hook_", "").replace("blocks.", "L"), 24), self)


class Intervention(BaseModel):
    """A direction applied at sites during a forward pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ablate", "add"]
    """`ablate`: x - r̂ r̂ᵀ x (directional ablation); `add`: x + alpha r (activation addition)."""
    direction_id: str
    """Direction in the store (`actstore direction`)."""
    sites: tuple[str, ...] = Field(min_length=1)
    """Sites whose activations are changed (TransformerLens names or module paths)."""
    alpha: float = 1.0
    """Scale of the added direction (`add` only)."""

    @model_validator(mode="after")
    def _alpha_for_add_only(self) -> "Intervention":
        if self.kind == "ablate" and self.alpha != 1.0:
            raise UserError(f"intervention ablate takes no alpha (got {self.alpha}): use add, or drop the alpha")
        return self
