"""Where a corpus comes from and how it is tokenized and packed into windows."""

import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.ids import make_id
from actstore.schemas.model import ModelConfig

SourceKind = Literal["text", "jsonl", "parquet", "hf", "pydocs"]


class CorpusConfig(BaseModel):
    """A corpus source plus the tokenization that turns it into a token table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: SourceKind = "pydocs"
    """`text` (files, one document per file, or per blank-line paragraph with `split_paragraphs`), `jsonl`,
    `parquet`, `hf` (a Hugging Face dataset, streamed) or `pydocs` (the standard library's docstrings)."""
    paths: tuple[str, ...] = ()
    """Files or directories (text/jsonl/parquet); globs are expanded."""
    hf_name: str | None = None
    """Dataset name on the hub (`hf` source), e.g. `NeelNanda/pile-10k`."""
    hf_config: str | None = None
    """Dataset configuration name (`hf` source)."""
    hf_split: str = "train"
    """Dataset split (`hf` source)."""
    text_field: str = "text"
    """Column or JSON field holding the document text."""
    split_paragraphs: bool = False
    """For `text` files: one document per blank-line separated paragraph instead of per file."""
    tokenizer: ModelConfig = Field(default_factory=ModelConfig)
    """Whose tokenizer; the harvest model must share its vocabulary."""
    ctx_len: int = Field(default=128, ge=2)
    """Tokens per window; every window is full (the tail shorter than a window is dropped)."""
    add_bos: bool = True
    """Put the BOS token at the start of every window, when the tokenizer has one."""
    separator: Literal["eos", "bos", "none"] = "eos"
    """Token appended after each document before packing (skipped when the tokenizer lacks it)."""
    holdout_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    """Share of documents, chosen by a hash of their text, marked `holdout` instead of `train`."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Stop after this many tokens (rounded down to whole windows)."""
    max_docs: int | None = Field(default=None, gt=0)
    """Stop after this many documents."""

    @model_validator(mode="after")
    def _source_has_input(self) -> "CorpusConfig":
        if self.source in ("text", "jsonl", "parquet") and not self.paths:
            raise UserError(f"corpus source '{self.source}' needs at least one path: pass --path FILE")
        if self.source == "hf" and not self.hf_name:
            raise UserError("corpus source 'hf' needs a dataset name: pass --hf-name NAME")
        return self

    def readable(self) -> str:
        """Readable fragment for the corpus id."""
        what = {"hf": self.hf_name or "hf", "pydocs": "pydocs"}.get(self.source, self.source)
        from actstore.schemas.ids import slug

        return f"{slug(what, 24)}-{self.tokenizer.short_name()}-c{self.ctx_len}"

    def corpus_identity(self) -> dict[str, Any]:
        """What the corpus id hashes: the config, plus the Python version for `pydocs` (its text comes from it)."""
        identity: dict[str, Any] = self.model_dump(mode="json")
        if self.source == "pydocs":
            identity["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
        return identity

    def corpus_id(self) -> str:
        """`corpus-<source>-<tokenizer>-c<ctx_len>-<hash>`: the same config gives the same id, so ingest resumes."""
        return make_id("corpus", self.readable(), self.corpus_identity())
