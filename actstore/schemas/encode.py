"""What an encode computes: one SAE applied to one site of one harvest, stored as sparse triples."""

from pydantic import BaseModel, ConfigDict, Field

from actstore.schemas.features import ValueDtype


class EncodeConfig(BaseModel):
    """Everything that determines a feature store's bytes; `features/<sae_id>/<harvest_id>/` holds one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae_id: str
    """SAE in the store (`store/saes/<sae_id>`); `actstore encode --sae PATH` imports a checkpoint first."""
    harvest_id: str
    """Harvest whose activations are encoded."""
    site: str
    """Site of the harvest the SAE reads (defaults to the SAE's recorded hook when the harvest has it)."""
    value_dtype: ValueDtype = "float16"
    """Dtype of stored activation values."""
    top_k: int = Field(default=32, ge=0)
    """Top examples per feature kept in the summary table."""


class EncodeRuntime(BaseModel):
    """How to run an encode; none of it changes what is stored."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu."""
    batch_tokens: int = Field(default=4096, gt=0)
    """Rows encoded at once (bounds the dense latent matrix: batch_tokens x d_sae floats)."""
    threads: int | None = Field(default=None, gt=0)
    """torch intra-op threads on CPU (Dask workers start with 1; set it explicitly)."""
    allow_mismatch: bool = False
    """Encode even when the SAE's recorded model or hook differ from the harvest (transfer experiments)."""
    progress: bool = True
    """Show a progress bar."""
