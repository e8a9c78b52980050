"""What a forecast fits: which runs and SAE evaluations of the store, the facts the store cannot know, the laws.

Empty selections mean "everything in the store"; the flow resolves them to the ids present before hashing, so
the forecast id names exactly the runs it was fitted to and a store that gained a harvest gets a new forecast.
"""

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalSplit
from actstore.schemas.ids import make_id, slug

LawName = Literal["loss_vs_params", "loss_vs_params_tokens", "loss_vs_position", "sae_nmse", "sae_ce_delta"]
LAWS: tuple[str, ...] = get_args(LawName)
"""`loss_vs_params`: mean loss L(N) = E + A/N^α over runs of one corpus (Kaplan et al.'s one-variable law);
`loss_vs_params_tokens`: Hoffmann et al.'s L(N, D) = E + A/N^α + B/D^β over runs whose D is known;
`loss_vs_position`: one harvest's per-position mean loss L(c) = E + A/c^α over the tokens c in context;
`sae_nmse`, `sae_ce_delta`: an SAE metric (normalized MSE; CE loss with the SAE spliced in minus clean CE)
L(n, s) = E + A/n^α + B/s^β over SAEs of one harvest site, n latents and sparsity s (`l0` or `k`)."""

LM_LAWS = ("loss_vs_params", "loss_vs_params_tokens", "loss_vs_position")
"""Laws of next-token loss in nats: their reducible part L - E reads as KL per token (see transforms/scaling)."""

SparsityMeasure = Literal["l0", "k"]

TARGET_VARIABLES = ("N", "D", "context", "n_latents", "l0", "k")
"""Variables a target may name: parameters, training tokens, tokens in context, SAE latents and sparsity."""


def law_variables(law: str, sae_sparsity: str) -> tuple[str, ...]:
    """The variables of `law`, in the order its fit names them."""
    return {"loss_vs_params": ("N",), "loss_vs_params_tokens": ("N", "D"), "loss_vs_position": ("context",)}.get(
        law, ("n_latents", sae_sparsity)
    )


class ForecastConfig(BaseModel):
    """Everything that determines a forecast's tables; its hash (selections resolved) is the forecast id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harvest_ids: tuple[str, ...] = ()
    """Harvests whose per-token loss builds the run tables; empty takes every harvest with a loss array."""
    eval_ids: tuple[str, ...] = ()
    """SAE evaluations for the SAE table; empty takes every finished evaluation."""
    split: EvalSplit = "all"
    """Tokens whose loss is averaged: `all` (a pretrained model never saw the corpus split) or one split."""
    params: dict[str, int] = {}
    """N per model, used instead of counting: keyed by the harvest's model name, its slug, or `name@revision`."""
    tokens_trained: dict[str, int] = {}
    """Training tokens D per model (same keys as `params`); the store cannot know them, Chinchilla needs them."""
    param_count: Literal["total", "non_embedding"] = "total"
    """N as every parameter (Hoffmann et al.) or without token/position embeddings and unembedding (Kaplan et al.)."""
    laws: tuple[LawName, ...] = ()
    """Laws to fit; empty fits every law the data supports and notes the others. A law named here that no
    group of points can support is an error."""
    targets: tuple[dict[str, float], ...] = ()
    """Points to forecast at, variable -> value; each applies to every fitted law whose variables it names."""
    extrapolate: tuple[float, ...] = (2.0, 4.0)
    """Also forecast every fitted law at these multiples of its largest observed sizes (of ctx_len for the
    position law: 2 and 4 forecast the loss at twice and four times the harvested context)."""
    sae_sparsity: SparsityMeasure = "l0"
    """SAE laws' sparsity variable: the measured mean active latents (any architecture) or the configured k."""
    n_boot: int = 400
    """Bootstrap replicates for every interval (mean losses by document, fits by point)."""
    level: float = 0.95
    """Coverage of every interval."""
    seed: int = 0
    """Seed of every bootstrap draw; the same seed gives the same tables."""

    @field_validator("laws", mode="before")
    @classmethod
    def _known_laws(cls, laws: Any) -> Any:
        for law in laws:
            if law not in LAWS:
                raise UserError(f"unknown law {law!r}: choose from {', '.join(LAWS)}")
        if len(set(laws)) != len(laws):
            raise UserError(f"laws repeated in {list(laws)}: name each law once")
        return laws

    @field_validator("params", "tokens_trained")
    @classmethod
    def _positive_counts(cls, counts: dict[str, int]) -> dict[str, int]:
        for model, count in counts.items():
            if count <= 0:
                raise UserError(f"count {count} given for model {model!r}: parameters and tokens must be positive")
        return counts

    @field_validator("targets")
    @classmethod
    def _known_target_variables(cls, targets: tuple[dict[str, float], ...]) -> tuple[dict[str, float], ...]:
        for target in targets:
            unknown = sorted(set(target) - set(TARGET_VARIABLES))
            if unknown or not target:
                raise UserError(
                    f"target {target} names {unknown or 'no variable'}: use {', '.join(TARGET_VARIABLES)}"
                    ", e.g. N=1e9,D=2e10"
                )
            bad = {name: value for name, value in target.items() if not (math.isfinite(value) and value > 0)}
            if bad:
                raise UserError(f"target {target} has non-positive values {bad}: a power law needs sizes > 0")
        return targets

    @field_validator("extrapolate")
    @classmethod
    def _positive_multiples(cls, multiples: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(m) and m > 0) for m in multiples):
            raise UserError(f"extrapolate {list(multiples)}: pass positive multiples of the largest size, e.g. 2 4")
        return multiples

    @model_validator(mode="after")
    def _bootstrap_args(self) -> "ForecastConfig":
        if self.n_boot < 2:
            raise UserError(f"n_boot={self.n_boot}: an interval needs at least 2 bootstrap replicates (hundreds)")
        if not 0 < self.level < 1:
            raise UserError(f"level={self.level}: pass the interval's coverage as a fraction in (0, 1), e.g. 0.95")
        return self

    def forecast_id(self) -> str:
        """`forecast-<harvest model, or run and evaluation counts>-<hash>`; resolve selections first."""
        if len(self.harvest_ids) == 1:
            readable = self.harvest_ids[0].removeprefix("harvest-").rsplit("-", 1)[0][:32]
        else:
            readable = f"{len(self.harvest_ids)}runs-{len(self.eval_ids)}evals"
        return make_id("forecast", slug(readable), self)
