"""Synthetic activation sets with a known distribution, stored as harvests so every reader works on them.

A synthetic set is ground truth for the tools downstream: an SAE trained on a Gaussian mixture should find its
component means, one trained on a uniform cube has no structure to find. It is written as a corpus (windows of
token id 0; each window is one document) and a harvest with one float32 site, `synthetic`.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.harvest import DEFAULT_CHUNK_TOKENS
from actstore.schemas.ids import make_id

SyntheticKind = Literal["gaussian_mixture", "uniform_cube"]
SYNTHETIC_SITE = "synthetic"
"""Name of the one site array of a synthetic harvest."""

_SHORT = {"gaussian_mixture": "gmm", "uniform_cube": "cube"}
_MIXTURE_ONLY = ("components", "spread", "anisotropy")
_FLAGS = {"n_tokens": "--tokens", "d": "--d", "ctx_len": "--ctx-len", "chunk_tokens": "--chunk-tokens"}
"""The `actstore synthetic` option of each sized field, named in error messages."""


class SyntheticConfig(BaseModel):
    """What a synthetic activation set holds; its hash is the harvest id, so the same config resumes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SyntheticKind = "gaussian_mixture"
    """`gaussian_mixture`: equally likely components with diagonal covariances; `uniform_cube`: every coordinate
    uniform on [-scale, scale]."""
    n_tokens: int
    """Rows; a whole number of windows of `ctx_len`."""
    d: int
    """Columns (the activation width)."""
    seed: int = 0
    """Seed of the parameters and of every chunk's draws."""
    components: int = 16
    """Mixture components (gaussian_mixture)."""
    spread: float = 4.0
    """Std of each coordinate of the component means, drawn N(0, spread^2) (gaussian_mixture)."""
    scale: float = 1.0
    """gaussian_mixture: geometric-mean std of a component along each coordinate; uniform_cube: half the side."""
    anisotropy: float = 1.0
    """Largest over smallest per-coordinate std a component may have: stds are log-uniform in
    [scale / sqrt(anisotropy), scale * sqrt(anisotropy)]; 1 makes every component isotropic (gaussian_mixture)."""
    ctx_len: int = 128
    """Tokens per window of the corpus the set is laid out on."""
    holdout_fraction: float = 0.05
    """Share of windows marked `holdout` (by the same text-hash rule as real documents)."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """Rows per stored chunk and per generator draw; a whole number of windows. Part of the id: the draws of a
    chunk are seeded by its index."""

    @field_validator("n_tokens", "d", "ctx_len", "chunk_tokens")
    @classmethod
    def _positive(cls, value: int, info: ValidationInfo) -> int:
        if value <= 0:
            name = str(info.field_name)
            raise UserError(f"synthetic {name} must be positive, got {value}: pass {_FLAGS[name]} 1 or more")
        return value

    @field_validator("components")
    @classmethod
    def _one_component_at_least(cls, value: int) -> int:
        if value < 1:
            raise UserError(f"synthetic components must be >= 1, got {value}: pass --components 1 or more")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SyntheticConfig":
        if not self.scale > 0:
            raise UserError(f"synthetic scale must be > 0, got {self.scale}: pass --scale 1.0")
        if not self.spread >= 0:
            raise UserError(f"synthetic spread must be >= 0, got {self.spread}: pass --spread 4.0")
        if not self.anisotropy >= 1:
            raise UserError(f"synthetic anisotropy must be >= 1, got {self.anisotropy}: pass --anisotropy 1.0")
        if not 0 <= self.holdout_fraction <= 1:
            raise UserError(f"holdout fraction {self.holdout_fraction} is not a share: pass --holdout in [0, 1]")
        for name in ("n_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if value % self.ctx_len:
                whole = [
                    w for w in (value // self.ctx_len * self.ctx_len, -(-value // self.ctx_len) * self.ctx_len) if w > 0
                ]
                raise UserError(
                    f"synthetic {name} {value} is not a whole number of windows of ctx_len "
                    f"{self.ctx_len}: pass {_FLAGS[name]} {' or '.join(map(str, whole))}"
                )
        return self

    @property
    def n_seqs(self) -> int:
        """Windows of the corpus."""
        return self.n_tokens // self.ctx_len

    @property
    def model_name(self) -> str:
        """What stands where a harvest names its model (`synthetic:gaussian_mixture`)."""
        return f"synthetic:{self.kind}"

    def corpus_identity(self) -> dict[str, Any]:
        """What the corpus id hashes: only the layout, so every synthetic set of one shape shares its tokens."""
        return {
            "source": "synthetic",
            "n_tokens": self.n_tokens,
            "ctx_len": self.ctx_len,
            "holdout_fraction": self.holdout_fraction,
        }

    def corpus_id(self) -> str:
        return make_id("corpus", f"synthetic-c{self.ctx_len}", self.corpus_identity())

    def identity(self) -> dict[str, Any]:
        """The manifest config, hashed into the harvest id: the fields that shape the data (a cube has no
        mixture fields), plus `model`, `corpus_id` and `sites` as a real harvest's config has them."""
        fields = self.model_dump(mode="json")
        if self.kind != "gaussian_mixture":
            fields = {k: v for k, v in fields.items() if k not in _MIXTURE_ONLY}
        return {
            "synthetic": fields,
            "model": {"name": self.model_name},
            "corpus_id": self.corpus_id(),
            "sites": [SYNTHETIC_SITE],
        }

    def harvest_id(self) -> str:
        """`harvest-synthetic-gmm-d64-<hash>`."""
        return make_id("harvest", f"synthetic-{_SHORT[self.kind]}-d{self.d}", self.identity())
