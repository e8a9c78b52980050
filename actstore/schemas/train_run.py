"""A training run in the store: which activations an SAE learns from, and how often it checkpoints."""

from pydantic import BaseModel, ConfigDict, Field

from actstore.schemas.ids import make_id, slug
from actstore.schemas.train import RUNTIME_FIELDS, TrainConfig


class TrainRun(BaseModel):
    """One SAE trained on one site of one harvest; its hash (runtime fields aside) is the SAE id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harvest_id: str
    """Harvest whose activations are the training data."""
    site: str
    """Site of that harvest."""
    train: TrainConfig
    """Architecture, sparsity, optimizer and schedule."""
    buffer_tokens: int = Field(default=65_536, gt=0)
    """Shuffle buffer of the shard reader: rows mixed across chunks and documents."""
    drop_bos: bool = True
    """Leave out position 0 of every window (BOS: a huge-norm outlier that wastes latents)."""
    checkpoint_every: int = Field(default=100, gt=0)
    """Steps between checkpoints (trainer state + reader position); a killed run resumes from the last."""
    eval_tokens: int = Field(default=65_536, gt=0)
    """Holdout-split tokens the final evaluation reads."""

    def sae_id(self, d_in: int) -> str:
        identity = self.model_dump(mode="json", exclude={"checkpoint_every"})
        identity["train"] = {k: v for k, v in identity["train"].items() if k not in RUNTIME_FIELDS}
        hook = slug(self.site.replace("hook_", "").replace("blocks.", "L"), 24)
        return make_id("sae", f"{self.train.architecture}-{self.train.latents(d_in)}-{hook}", identity)
