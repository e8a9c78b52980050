"""What an evaluation measures: one SAE on one site of one harvest, reconstruction, latents and downstream loss."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from actstore.schemas.ids import make_id

EvalSplit = Literal["holdout", "train", "all"]


class EvalConfig(BaseModel):
    """Everything that determines an evaluation's numbers; its hash is the eval id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae_id: str
    """SAE in the store."""
    harvest_id: str
    """Harvest whose activations (and model, for the downstream loss) the SAE is evaluated on."""
    site: str
    """Site of the harvest the SAE reads."""
    split: EvalSplit = "holdout"
    """Tokens evaluated: the holdout split by default, so training tokens do not flatter the SAE."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Evaluate at most this many tokens of the split (in token order); None reads them all."""
    exclude_bos: bool = True
    """Leave position 0 out of the metrics and unreplaced in the spliced forward (BOS is a huge-norm outlier)."""
    outlier_factor: float | None = Field(default=None, gt=1)
    """Also exclude tokens whose activation norm exceeds this multiple of the median norm of the split."""
    ce_tokens: int = Field(default=4096, ge=0)
    """Tokens (of the split, in token order) for the downstream loss with the SAE spliced in; 0 skips it.
    Needs the harvest's model: four full forwards per window (clean, SAE, zero- and mean-ablated)."""
    histogram_bins: int = Field(default=50, gt=0)
    """Bins of the log10 feature-density histogram."""

    def eval_id(self) -> str:
        """`eval-<sae readable part>-<hash>`."""
        readable = self.sae_id.removeprefix("sae-").rsplit("-", 1)[0]
        return make_id("eval", readable, self)


class EvalRuntime(BaseModel):
    """How to run an evaluation; none of it changes the numbers."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu."""
    batch_tokens: int = Field(default=4096, gt=0)
    """Activation rows through the SAE at once."""
    ce_batch_windows: int = Field(default=8, gt=0)
    """Windows per forward in the downstream-loss pass (bounds logits memory: windows x ctx_len x vocab)."""
    threads: int | None = Field(default=None, gt=0)
    """torch intra-op threads on CPU (Dask workers start with 1; set it explicitly)."""
    allow_mismatch: bool = False
    """Evaluate even when the SAE was trained on another model or hook (transfer experiments)."""
    progress: bool = True
    """Show progress bars."""
