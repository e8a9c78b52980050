"""What a transfer analysis compares: two harvests of the same corpus and sites from two models, and their SAEs."""

from pydantic import BaseModel, ConfigDict, Field

from actstore.schemas.eval import EvalSplit
from actstore.schemas.ids import make_id


class TransferConfig(BaseModel):
    """Everything that determines a transfer analysis; its hash is the transfer id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harvest_a: str
    """Harvest of model A (e.g. the base model)."""
    harvest_b: str
    """Harvest of model B (e.g. its fine-tune) on the same corpus, tokens and sites."""
    sites: tuple[str, ...] = ()
    """Sites compared; empty compares every site the two harvests share."""
    sae_a: str | None = None
    """SAE trained on model A, applied to A and to B."""
    sae_b: str | None = None
    """SAE trained on model B, applied to B and to A."""
    split: EvalSplit = "holdout"
    """Tokens the SAEs are evaluated and correlated on (activation similarity always uses every token)."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Cap on the tokens of the split used for the SAE evaluations and feature correlations."""
    exclude_bos: bool = True
    """Leave position 0 out of the SAE numbers (as `actstore eval` does)."""
    ce_tokens: int = Field(default=4096, ge=0)
    """Tokens of downstream loss per SAE evaluation; 0 skips the spliced forwards."""

    def transfer_id(self) -> str:
        return make_id("transfer", _short(self.harvest_a) + "-vs-" + _short(self.harvest_b), self)


def _short(harvest_id: str) -> str:
    """The readable model part of a harvest id, bounded so ids stay path-friendly."""
    return harvest_id.removeprefix("harvest-").rsplit("-", 1)[0][:24].strip("-")
