"""What a harvest collects: one corpus, one model, many sites, optionally per-token loss."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.errors import UserError
from schemas.ids import make_id
from schemas.model import ModelConfig
from schemas.sites import parse_site

StoreDtype = Literal["model", "float32", "float16", "bfloat16"]

DEFAULT_CHUNK_TOKENS = 4096
"""Rows per Zarr chunk and per forward batch: >= 1 MiB per chunk for d_model >= 128 in fp16 (DESIGN.md)."""


class HarvestConfig(BaseModel):
    """Everything that determines the stored activations; its hash is the harvest id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus_id: str
    """The token table to read (`store/corpora/<corpus_id>`)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to run."""
    sites: tuple[str, ...]
    """Site names, TransformerLens form or raw module paths; all captured in one forward pass."""
    loss: bool = False
    """Also store per-token next-token cross-entropy (forces a full forward)."""
    store_dtype: StoreDtype = "model"
    """Dtype on disk; `model` keeps the model's own (bf16 is stored as uint16 bits)."""
    batch_windows: int | None = Field(default=None, gt=0)
    """Windows per forward batch = rows per chunk / ctx_len; default fills ~4096 tokens."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Harvest only the first tokens of the corpus (rounded down to whole windows)."""

    @field_validator("sites")
    @classmethod
    def _sites_nonempty_unique(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        if not sites:
            raise UserError("no sites given: pass --site blocks.L.hook_resid_post (one or more)")
        if len(set(sites)) != len(sites):
            raise UserError(f"sites repeated in {list(sites)}: give each site once")
        return sites

    def harvest_id(self) -> str:
        """`harvest-<model>-L<layers>-<hash>`; device and worker counts are not part of it."""
        layers = sorted({s.layer for s in map(parse_site, self.sites) if s.layer is not None})
        readable = self.model.short_name() + ("-L" + "-".join(map(str, layers)) if layers else "")
        return make_id("harvest", readable, self)


class HarvestRuntime(BaseModel):
    """How to run a harvest; none of it changes what is stored, so none of it is in the id."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu; or any torch device string."""
    queue_chunks: int = Field(default=2, ge=1)
    """Finished batches allowed to wait for the writer; bounds memory while compute and disk overlap."""
    threads: int | None = Field(default=None, gt=0)
    """torch intra-op threads on CPU (Dask workers default to 1; set it explicitly)."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
