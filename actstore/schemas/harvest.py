"""What a harvest collects: one corpus, one model, many sites, optionally per-token loss and its gradients."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actstore.schemas.directions import Intervention
from actstore.schemas.errors import UserError
from actstore.schemas.ids import OmitsDefaults, make_id
from actstore.schemas.model import ModelConfig
from actstore.schemas.sites import parse_site

StoreDtype = Literal["model", "float32", "float16", "bfloat16"]

GradientMetric = Literal["loss", "logit_diff"]
"""The per-token metric m whose gradient a harvest stores: next-token cross entropy, or logit[a] - logit[b]."""

GRADIENT_SUFFIX = ".grad"
"""A site's gradient array is `<site>.grad`, listed with the other arrays of the harvest manifest."""

DEFAULT_CHUNK_TOKENS = 4096
"""Rows per Zarr chunk and per forward batch: >= 1 MiB per chunk for d_model >= 128 in fp16 (DESIGN.md)."""


class HarvestConfig(OmitsDefaults):
    """Everything that determines the stored activations; its hash is the harvest id."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    omitted_at_default = ("gradient_metric", "logit_diff_tokens", "interventions")
    """A harvest without gradients or interventions dumps exactly as before they existed: same id."""

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
    gradient_metric: GradientMetric | None = None
    """Also store, per site, g = d(sum of m over a window's positions)/dx at every token (float32, array
    `<site>.grad`): what attribution patching over a prompt uses. `loss` sums the next-token cross entropy of
    every position but the last (it has no target); `logit_diff` sums logit[a] - logit[b] over all positions.
    Turns `loss` on. A batch's whole autograd graph is held for its backward: lower `batch_windows` if memory
    runs out."""
    logit_diff_tokens: tuple[int, int] | None = None
    """Token ids (a, b) of the `logit_diff` metric; only with it."""

    interventions: tuple[Intervention, ...] = ()
    """Directions ablated or added at sites during the forward pass (`actstore direction` makes them); the
    stored activations and loss are those of the intervened model."""

    @field_validator("sites")
    @classmethod
    def _sites_nonempty_unique(cls, sites: tuple[str, ...]) -> tuple[str, ...]:
        if not sites:
            raise UserError("no sites given: pass --site blocks.L.hook_resid_post (one or more)")
        if len(set(sites)) != len(sites):
            raise UserError(f"sites repeated in {list(sites)}: give each site once")
        return sites

    @model_validator(mode="before")
    @classmethod
    def _gradients_need_loss(cls, data: Any) -> Any:
        """A gradient harvest runs the full forward and stores the loss too; normalizing the flag here gives
        the same config (and id) whether or not the caller also asked for the loss."""
        if isinstance(data, dict) and data.get("gradient_metric") is not None:
            return {**data, "loss": True}
        return data

    @model_validator(mode="after")
    def _logit_diff_tokens_with_logit_diff(self) -> "HarvestConfig":
        if self.gradient_metric == "logit_diff" and self.logit_diff_tokens is None:
            raise UserError("gradient metric logit_diff needs two token ids: pass --logit-diff A B")
        if self.gradient_metric != "logit_diff" and self.logit_diff_tokens is not None:
            raise UserError(
                f"logit-diff tokens {list(self.logit_diff_tokens)} are given without the logit_diff "
                "metric: pass --gradients logit_diff or drop --logit-diff"
            )
        if self.logit_diff_tokens is not None and min(self.logit_diff_tokens) < 0:
            raise UserError(f"logit-diff token ids {list(self.logit_diff_tokens)} must be >= 0: pass vocabulary ids")
        clash = [s for s in self.sites if s.endswith(GRADIENT_SUFFIX)] if self.gradient_metric else []
        if clash:
            raise UserError(
                f"site {clash[0]!r} ends in {GRADIENT_SUFFIX}, the suffix of gradient arrays: "
                "harvest that module without --gradients"
            )
        return self

    def harvest_id(self) -> str:
        """`harvest-<model>-L<layers>-<hash>`; device and worker counts are not part of it."""
        layers = sorted({s.layer for s in map(parse_site, self.sites) if s.layer is not None})
        readable = self.model.short_name() + ("-L" + "-".join(map(str, layers)) if layers else "")
        readable += "".join(f"-{i.kind}" for i in self.interventions)
        return make_id("harvest", readable, self)


def gradient_array(site: str) -> str:
    """Name of the array holding the gradients of the metric at `site` (`blocks.3.hook_resid_post.grad`)."""
    return site + GRADIENT_SUFFIX


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
