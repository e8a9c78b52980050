"""The config of an SAE checkpoint, with SAELens' field names so its `cfg.json` reads both ways.

Field names and meanings follow SAELens (`d_in`, `d_sae`, `apply_b_dec_to_input`, `normalize_activations`,
`k`, `hook_name`, `model_name`); the file names below are the three on-disk layouts `transforms.sae` reads.
"""

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actstore.schemas.errors import UserError

SAEArchitecture = Literal["standard", "topk", "batchtopk", "jumprelu", "gated"]
ARCHITECTURES: tuple[str, ...] = get_args(SAEArchitecture)

NormalizeActivations = Literal["none", "expected_average_only_in", "constant_norm_rescale"]
NORMALIZATIONS: tuple[str, ...] = get_args(NormalizeActivations)

SAEDtype = Literal["float32", "float16", "bfloat16", "float64"]
SAE_DTYPES: tuple[str, ...] = get_args(SAEDtype)

SAELENS_WEIGHTS = "sae_weights.safetensors"
"""SAELens weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec and per-architecture extras."""
SAELENS_CFG = "cfg.json"
"""SAELens (and sparsify) config file next to the weights."""
SAELENS_SCALER = "activation_scaler.json"
"""SAELens' `{"scaling_factor": f}` for `expected_average_only_in` checkpoints whose factor is not folded."""
SPARSIFY_WEIGHTS = "sae.safetensors"
"""EleutherAI sparsify weights: encoder.weight [n, d_in], encoder.bias, W_dec [n, d_in], b_dec."""
GEMMA_SCOPE_PARAMS = "params.npz"
"""Gemma Scope JumpReLU weights: W_enc, W_dec, b_enc, b_dec, threshold (SAELens orientation)."""
ACTSTORE_KEY = "actstore"
"""Key in `cfg.json` under which actstore keeps what SAELens has no field for; other tools ignore it."""


class SAEConfig(BaseModel):
    """What an SAE computes, independent of where its weights came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: SAEArchitecture
    """Encoder non-linearity: ReLU, per-token TopK, BatchTopK (a JumpReLU at inference), JumpReLU, gated."""
    d_in: int = Field(gt=0)
    """Width of the activations the SAE reads (d_model of the site)."""
    d_sae: int = Field(gt=0)
    """Number of latents."""
    dtype: SAEDtype = "float32"
    """Dtype of the weights; inputs are cast to it before encoding."""
    device: str = "cpu"
    """Device the weights were on when saved; informational, `load` takes the device to use."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens default; Gemma Scope does not)."""
    normalize_activations: NormalizeActivations = "none"
    """`expected_average_only_in`: inputs times `scaling_factor`, outputs divided by it;
    `constant_norm_rescale`: each input row scaled to norm sqrt(d_in), its output scaled back."""
    scaling_factor: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """sqrt(d_in) / E||x|| for `expected_average_only_in`; kept in SAELens' `activation_scaler.json`."""
    k: int | float | None = None
    """topk: latents kept per token; batchtopk: mean latents per token it was trained for (recorded only,
    inference uses the stored threshold)."""
    rescale_acts_by_decoder_norm: bool = False
    """topk only (SAELens): rank and emit pre-activations times ||W_dec row||, divide back before decoding."""
    hook_name: str | None = None
    """Site the SAE was trained on (TransformerLens name), when the checkpoint records it."""
    model_name: str | None = None
    """Model the SAE was trained on, when the checkpoint records it."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """actstore's own JSON metadata (ids, training run), written under `cfg.json["actstore"]`."""

    @model_validator(mode="after")
    def _consistent(self) -> "SAEConfig":
        if self.architecture == "topk":
            if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise UserError(
                    f"topk SAE needs an integer k in [1, d_sae={self.d_sae}], got k={self.k!r}: set k in cfg.json"
                )
        elif self.architecture == "batchtopk":
            if self.k is not None and not 0 < self.k <= self.d_sae:
                raise UserError(f"batchtopk SAE has k={self.k!r} outside (0, d_sae={self.d_sae}]: fix k in cfg.json")
        elif self.k is not None:
            raise UserError(
                f"k={self.k!r} is set for a {self.architecture} SAE: only topk and batchtopk use "
                "k; remove it or fix the architecture"
            )
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise UserError(
                f"rescale_acts_by_decoder_norm is set for a {self.architecture} SAE: only topk "
                "supports it; fold the decoder norms into W_enc/b_enc/W_dec instead"
            )
        scaled = self.normalize_activations == "expected_average_only_in"
        if scaled and self.scaling_factor is None:
            raise UserError(
                "normalize_activations=expected_average_only_in needs its scaling factor: write "
                f'{{"scaling_factor": F}} to {SAELENS_SCALER} next to the weights, or fold it in'
            )
        if not scaled and self.scaling_factor is not None:
            raise UserError(
                f"scaling_factor is given but normalize_activations="
                f"{self.normalize_activations}: set normalize_activations="
                "expected_average_only_in or drop the factor"
            )
        return self

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every weight this architecture needs, in SAELens' names and orientation."""
        shapes: dict[str, tuple[int, ...]] = {
            "W_enc": (self.d_in, self.d_sae),
            "W_dec": (self.d_sae, self.d_in),
            "b_dec": (self.d_in,),
        }
        if self.architecture == "gated":
            return shapes | {"b_gate": (self.d_sae,), "r_mag": (self.d_sae,), "b_mag": (self.d_sae,)}
        shapes["b_enc"] = (self.d_sae,)
        if self.architecture in ("jumprelu", "batchtopk"):
            shapes["threshold"] = (self.d_sae,)
        return shapes
