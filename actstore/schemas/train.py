"""How to train an SAE on stored activations: architecture, sparsity, optimizer, schedule, initialization.

Defaults follow the papers the architectures come from: TopK with AuxK (Gao et al. 2024: tied init, unit-norm
decoder rows, AuxK coefficient 1/32, k_aux = d_in / 2, dead after 10M tokens without firing), BatchTopK
(Bussmann et al. 2024, exported as a JumpReLU with one global threshold as SAELens does), JumpReLU
(Rajamanoharan et al. 2024: log-threshold, rectangle-kernel pseudo-derivatives, bandwidth and initial
threshold 0.001 on inputs normalized to E||x|| = sqrt(d_in)), ReLU + L1 weighted by decoder norms (SAELens
`standard`). Loss scales follow SAELens (squared error summed over d_in, averaged over tokens), so SAELens'
coefficients carry over.
"""

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actstore.schemas.errors import UserError
from actstore.schemas.sae import SAEDtype

TrainArchitecture = Literal["topk", "batchtopk", "jumprelu", "standard"]
TRAIN_ARCHITECTURES: tuple[str, ...] = get_args(TrainArchitecture)
LrDecay = Literal["constant", "linear", "cosine"]
BDecInit = Literal["geometric_median", "mean", "zeros"]
TrainNormalize = Literal["none", "expected_average_only_in"]
JumpReLUSparsity = Literal["step", "tanh"]

RUNTIME_FIELDS = frozenset({"device", "autocast"})
"""Fields that change where and how fast training runs, not what it learns (beyond rounding): ids and the
resume check ignore them, so a run killed on one device may resume on another."""


class TrainConfig(BaseModel):
    """One SAE training run on one activation site; `d_in` comes from the data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: TrainArchitecture = "topk"
    """topk (per-token TopK + AuxK), batchtopk (TopK over the whole batch), jumprelu, standard (ReLU + L1)."""
    d_sae: int | None = Field(default=None, gt=0)
    """Number of latents; give this or `expansion_factor`."""
    expansion_factor: int | None = Field(default=None, gt=0)
    """Latents per input dimension (d_sae = expansion_factor * d_in); give this or `d_sae`."""
    k: int | float | None = None
    """topk: latents kept per token (an integer); batchtopk: mean latents per token over a batch."""
    auxk_coefficient: float = Field(default=1 / 32, ge=0)
    """Weight of the AuxK loss (dead latents reconstructing the residual), topk and batchtopk only."""
    auxk_k: int | None = Field(default=None, gt=0)
    """Dead latents per token the AuxK loss uses; default d_in // 2 (Gao et al. appendix B.1)."""
    dead_tokens: int = Field(default=10_000_000, gt=0)
    """A latent that has not fired for this many training tokens counts as dead (AuxK and the dead count)."""
    batchtopk_threshold_lr: float = Field(default=0.01, gt=0, le=1)
    """Weight of each batch's minimum positive activation in the running mean that becomes the threshold."""
    l1_coefficient: float = Field(default=5.0, ge=0)
    """standard: weight of sum_i f_i * ||W_dec[i]|| (SAELens' L1, scaled like the summed squared error)."""
    l0_coefficient: float = Field(default=1.0, ge=0)
    """jumprelu: weight of the L0 penalty (step mode) or of its tanh surrogate."""
    jumprelu_sparsity: JumpReLUSparsity = "step"
    """jumprelu penalty: `step` counts active latents through the rectangle-kernel estimator (DeepMind);
    `tanh` sums tanh(scale * f_i * ||W_dec[i]||) (Anthropic)."""
    jumprelu_tanh_scale: float = Field(default=4.0, gt=0)
    """Scale inside the tanh penalty."""
    jumprelu_bandwidth: float = Field(default=0.001, gt=0)
    """Width of the rectangle kernel of the threshold's pseudo-derivatives."""
    jumprelu_init_threshold: float = Field(default=0.001, gt=0)
    """Threshold of every latent at init (trained as its log, so it stays positive)."""
    sparsity_warmup_steps: int = Field(default=0, ge=0)
    """Ramp the L1 / L0 coefficient linearly from 0 over this many steps."""
    unit_norm_decoder: bool = True
    """Keep decoder rows at unit norm (renormalized after every step, their parallel gradient removed);
    off, `standard` learns row norms as Anthropic's April 2024 update does, with rows starting at 0.1."""
    lr: float = Field(default=2e-4, gt=0)
    """Peak Adam learning rate."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    """Adam beta2."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """Adam epsilon (Gao et al. use 6.25e-10)."""
    warmup_steps: int = Field(default=1000, ge=0)
    """Linear learning-rate warmup from lr / warmup_steps to lr."""
    decay: LrDecay = "linear"
    """Learning-rate decay to 0 over the last `decay_fraction` of the steps: linear, cosine, or none."""
    decay_fraction: float = Field(default=0.2, ge=0, le=1)
    """Share of the steps, at the end, over which the lr decays (1.0 with cosine: the classic cosine)."""
    total_tokens: int = Field(gt=0)
    """Training tokens; steps = total_tokens // batch_size."""
    batch_size: int = Field(default=4096, gt=0)
    """Tokens per step."""
    seed: int = 0
    """Seeds the weight init; the data order is the shard reader's own seed."""
    b_dec_init: BDecInit = "geometric_median"
    """Initial decoder bias from the first batches: geometric median (Weiszfeld), mean, or zeros."""
    init_tokens: int = Field(default=65_536, gt=0)
    """Tokens the flow reads from the start of the stream for `init_from_data` (b_dec and scaling factor)."""
    normalize_activations: TrainNormalize = "expected_average_only_in"
    """`expected_average_only_in` (SAELens): inputs times sqrt(d_in) / E||x|| estimated on the init tokens,
    the factor saved with the SAE so inference undoes it; `none` trains on raw activations."""
    dtype: SAEDtype = "float32"
    """Dtype of the exported SAE; training keeps float32 weights and optimizer state."""
    autocast: bool = False
    """Run the encoder (and dense decoder) matmuls under bfloat16 autocast; cuda only."""
    device: str = "cpu"
    """Torch device to train on (`cuda`, `cuda:1`, `cpu`); the flow resolves `auto` before building this."""

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if (self.d_sae is None) == (self.expansion_factor is None):
            raise UserError(
                "give exactly one of d_sae and expansion_factor (got "
                f"d_sae={self.d_sae}, expansion_factor={self.expansion_factor})"
            )
        arch, k = self.architecture, self.k
        if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise UserError(f"topk training needs an integer k >= 1 (latents per token), got k={k!r}: set k")
        if arch == "batchtopk" and (k is None or k <= 0 or int(k * self.batch_size) < 1):
            raise UserError(
                f"batchtopk training needs k > 0 with k * batch_size >= 1, got k={k!r} and "
                f"batch_size={self.batch_size}: set k (mean latents per token)"
            )
        if arch in ("jumprelu", "standard") and k is not None:
            raise UserError(f"k={k!r} is set for {arch} training: only topk and batchtopk use k; remove it")
        if self.total_tokens < self.batch_size:
            raise UserError(
                f"total_tokens={self.total_tokens} is less than one batch of {self.batch_size}: "
                "raise total_tokens or lower batch_size"
            )
        if self.autocast and not self.device.startswith("cuda"):
            raise UserError(
                f"autocast=True runs bfloat16 matmuls on cuda, but device={self.device!r}: "
                "drop autocast or train on cuda"
            )
        return self

    @property
    def steps(self) -> int:
        """Optimizer steps in the run."""
        return self.total_tokens // self.batch_size

    def latents(self, d_in: int) -> int:
        """d_sae for activations of width `d_in`, checked against k."""
        d_sae = self.d_sae if self.d_sae is not None else int(self.expansion_factor or 0) * d_in
        if self.k is not None and self.k > d_sae:
            raise UserError(f"k={self.k} exceeds d_sae={d_sae}: lower k or widen the SAE")
        return d_sae
