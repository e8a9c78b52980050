"""One SAE training run in memory: `init_from_data`, a `step` per batch, then `export` an inference `SAE`.

    trainer = Trainer(cfg, d_in)
    trainer.init_from_data(first_batches)      # b_dec and input scale; or trainer.load_state(dir) to resume
    for batch in batches:                      # float32 [batch_size, d_in]
        metrics = trainer.step(batch)
    save(trainer.export(hook_name=site, model_name=model), path)

The trainer owns float32 trainable parameters in SAELens' names (plus `log_threshold` for jumprelu) and builds
a fresh inference `SAE` on export, so the inference module stays frozen and the trained weights are never
aliased by it. Everything that decides the next step (weights, Adam moments, step count, dead-latent counters,
BatchTopK threshold, input scale, RNG; the lr schedule is a function of the step) is in `save_state`, so a
killed run resumes bit-identically on CPU.
Training happens in normalized units (inputs times the scale); exported SAEs carry the scale as SAELens'
`expected_average_only_in`, so they read and write raw activations.
"""

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from actstore.schemas.errors import UserError
from actstore.schemas.sae import SAEConfig
from actstore.schemas.train import RUNTIME_FIELDS, TrainConfig
from actstore.transforms.sae import SAE
from actstore.transforms.sae_init import check_width, initial_b_dec, initial_weights, scaling_factor, stack_batches
from actstore.transforms.sae_train_ops import (
    Selection,
    decode_sparse,
    gather_pre,
    jumprelu,
    select_batch_topk,
    select_dead,
    select_topk,
    step,
)
from actstore.transforms.sae_train_state import STATE_FORMAT, STATE_JSON, read_state, write_state


class StepMetrics(NamedTuple):
    """What one optimizer step did; losses are in the normalized units trained on."""

    loss: float
    """Total loss minimized: mse + auxk_loss + sparsity_loss."""
    mse: float
    """Squared reconstruction error summed over d_in, averaged over tokens."""
    auxk_loss: float
    """Weighted AuxK loss (topk, batchtopk); 0 while no latent is dead."""
    sparsity_loss: float
    """Weighted L1 (standard) or L0 / tanh (jumprelu) penalty; 0 for topk and batchtopk."""
    l0: float
    """Mean active latents per token in the training forward pass."""
    fvu: float
    """Fraction of variance unexplained: squared error / squared distance to the batch mean."""
    dead: int
    """Latents that have not fired in the last `dead_tokens` tokens, after this step."""
    lr: float
    """Learning rate this step used."""


class _Forward(NamedTuple):
    recon: Tensor
    fired: Tensor
    active: Tensor
    auxk_loss: Tensor
    sparsity_loss: Tensor
    min_positive: Tensor | None


def learning_rate(cfg: TrainConfig, step_index: int) -> float:
    """lr of 0-based step `step_index`: linear warmup times the decay over the last `decay_fraction`."""
    factor = min(1.0, (step_index + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = round(cfg.decay_fraction * cfg.steps) if cfg.decay != "constant" else 0
    start = cfg.steps - decay_steps
    if decay_steps and step_index >= start:
        progress = min(1.0, (step_index - start) / decay_steps)
        factor *= 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * factor


class Trainer:
    """Parameters, Adam, schedule and dead-latent bookkeeping of one SAE training run."""

    def __init__(self, cfg: TrainConfig, d_in: int) -> None:
        self.cfg, self.d_in, self.d_sae = cfg, d_in, cfg.latents(d_in)
        self.device = torch.device(cfg.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        weights = initial_weights(cfg, d_in, self.d_sae, self.generator)
        self.params = nn.ParameterDict({name: nn.Parameter(t.to(self.device)) for name, t in weights.items()})
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
        self.tokens_since_fired = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        self.batchtopk_threshold = torch.zeros((), dtype=torch.float64, device=self.device)
        """Running mean of the smallest positive training activation per batch; the exported threshold."""
        self.scale = 1.0
        self.steps_done = 0
        self.tokens_seen = 0
        self.initialized = False

    def init_from_data(self, batches: Tensor | Iterable[Tensor]) -> None:
        """Set the input scale (if normalizing) and b_dec from the first activations of the stream."""
        x = stack_batches(batches, self.d_in)
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.scale = scaling_factor(x)
        with torch.no_grad():
            self.params["b_dec"].copy_(initial_b_dec(self.cfg, x * self.scale))
        self.initialized = True

    def step(self, batch: Tensor) -> StepMetrics:
        """One Adam step on a [tokens, d_in] batch; a non-finite loss raises UserError, state untouched."""
        if not self.initialized:
            raise RuntimeError("Trainer.step before init_from_data or load_state")
        check_width(batch, self.d_in)
        x = batch.to(self.device, torch.float32, non_blocking=True).reshape(-1, self.d_in) * self.scale
        lr = learning_rate(self.cfg, self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        warm = self.cfg.sparsity_warmup_steps
        sparsity_scale = min(1.0, (self.steps_done + 1) / warm) if warm else 1.0
        sparse = self.cfg.architecture in ("topk", "batchtopk")
        out = self._forward_sparse(x) if sparse else self._forward_dense(x)
        mse = (out.recon - x).pow(2).sum(dim=-1).mean()
        sparsity = sparsity_scale * out.sparsity_loss
        loss = mse + out.auxk_loss + sparsity
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise UserError(
                f"SAE training diverged at step {self.steps_done} (loss {loss_value}): lower lr "
                f"(now {self.cfg.lr}) or check the activations for nan/inf"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        w_dec = self.params["W_dec"]
        if self.cfg.unit_norm_decoder and w_dec.grad is not None:
            # Rows are unit norm: the radial part of their gradient would be undone by the renormalization.
            w_dec.grad -= (w_dec.grad * w_dec.data).sum(dim=-1, keepdim=True) * w_dec.data
        self.optimizer.step()
        with torch.no_grad():
            if self.cfg.unit_norm_decoder:
                w_dec /= w_dec.norm(dim=-1, keepdim=True)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[out.fired] = 0
            if out.min_positive is not None:  # BatchTopK: running mean of the smallest kept activation
                rate = self.cfg.batchtopk_threshold_lr
                self.batchtopk_threshold.mul_(1 - rate).add_(rate * out.min_positive.to(torch.float64))
            centered = (x - x.mean(dim=0)).pow(2).sum()
            fvu = float((out.recon - x).pow(2).sum() / centered) if centered > 0 else float("nan")
        self.steps_done += 1
        self.tokens_seen += x.shape[0]
        l0 = float(out.active) / x.shape[0]
        return StepMetrics(
            loss_value,
            float(mse.detach()),
            float(out.auxk_loss.detach()),
            float(sparsity.detach()),
            l0,
            fvu,
            self.dead_count(),
            lr,
        )

    def dead_count(self) -> int:
        """Latents that have not fired in the last `dead_tokens` training tokens."""
        return int((self.tokens_since_fired >= self.cfg.dead_tokens).sum())

    def _forward_sparse(self, x: Tensor) -> _Forward:
        """TopK / BatchTopK with AuxK: one dense encoder matmul, everything after it sparse."""
        p, cfg, n = self.params, self.cfg, x.shape[0]
        with torch.no_grad(), self._autocast():
            pre = torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"]).float()
        k = cfg.k or 0
        chosen = select_topk(pre, int(k)) if cfg.architecture == "topk" else select_batch_topk(pre, k)
        dead = self.tokens_since_fired >= cfg.dead_tokens
        n_dead = int(dead.sum()) if cfg.auxk_coefficient > 0 else 0
        k_aux = min(cfg.auxk_k or max(1, self.d_in // 2), self.d_sae)
        both = chosen
        if n_dead:
            aux = select_dead(pre, dead, min(k_aux, n_dead))
            both = Selection(torch.cat([chosen.rows, aux.rows]), torch.cat([chosen.cols, aux.cols]))
        values = gather_pre(x, p["b_dec"], p["W_enc"], p["b_enc"], pre, both).relu()
        kept = values[: chosen.rows.numel()]
        recon = decode_sparse(chosen, kept, p["W_dec"], n) + p["b_dec"]
        auxk_loss = recon.new_zeros(())
        if n_dead:
            # Gao et al.: the top dead latents reconstruct what the live ones missed; few dead, small weight.
            residual = (x - recon).detach()
            aux_recon = decode_sparse(aux, values[chosen.rows.numel() :], p["W_dec"], n)
            weight = cfg.auxk_coefficient * min(n_dead / k_aux, 1.0)
            auxk_loss = weight * (aux_recon - residual).pow(2).sum(dim=-1).mean()
        positive = kept.detach() > 0
        batch_wide = cfg.architecture == "batchtopk" and bool(positive.any())
        minimum = kept.detach()[positive].min() if batch_wide else None
        return _Forward(recon, chosen.cols[positive], positive.sum(), auxk_loss, recon.new_zeros(()), minimum)

    def _forward_dense(self, x: Tensor) -> _Forward:
        """JumpReLU (L0 or tanh penalty) and ReLU + decoder-norm-weighted L1."""
        p, cfg = self.params, self.cfg
        with self._autocast():
            pre = ((x - p["b_dec"]) @ p["W_enc"]).float() + p["b_enc"]
        norms = p["W_dec"].norm(dim=-1)
        if cfg.architecture == "jumprelu":
            threshold = p["log_threshold"].exp()
            acts = jumprelu(pre, threshold, cfg.jumprelu_bandwidth)
            if cfg.jumprelu_sparsity == "step":
                penalty = step(pre, threshold, cfg.jumprelu_bandwidth).sum(dim=-1).mean()
            else:
                penalty = torch.tanh(cfg.jumprelu_tanh_scale * acts * norms).sum(dim=-1).mean()
            coefficient = cfg.l0_coefficient
        else:
            acts = pre.relu()
            penalty, coefficient = (acts * norms).sum(dim=-1).mean(), cfg.l1_coefficient
        with self._autocast():
            recon = (acts @ p["W_dec"]).float() + p["b_dec"]
        active = acts.detach() != 0
        zero = recon.new_zeros(())
        return _Forward(recon, active.any(dim=0), active.sum(), zero, coefficient * penalty, None)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Inference latents [tokens, d_sae] of raw activations, as the exported SAE computes them."""
        p = self.params
        pre = (x.to(self.device, torch.float32) * self.scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        arch = self.cfg.architecture
        if arch == "topk":
            top = pre.topk(int(self.cfg.k), dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if arch == "standard":
            return pre.relu()
        threshold = self._threshold()
        return pre.relu() * (pre > threshold)

    def _threshold(self) -> Tensor:
        if self.cfg.architecture == "jumprelu":
            return self.params["log_threshold"].detach().exp()
        return self.batchtopk_threshold.to(torch.float32).expand(self.d_sae)

    def export(
        self, hook_name: str | None = None, model_name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> SAE:
        """A frozen inference SAE on CPU in `cfg.dtype`; batchtopk with its JumpReLU threshold, as SAELens."""
        cfg = self.cfg
        weights = {name: self.params[name].detach().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if cfg.architecture in ("jumprelu", "batchtopk"):
            weights["threshold"] = self._threshold().clone()
        normalized = cfg.normalize_activations == "expected_average_only_in"
        training = {"config": cfg.model_dump(mode="json"), "steps": self.steps_done, "tokens": self.tokens_seen}
        sae_cfg = SAEConfig(
            architecture=cfg.architecture,
            d_in=self.d_in,
            d_sae=self.d_sae,
            dtype=cfg.dtype,
            normalize_activations=cfg.normalize_activations,
            k=cfg.k,
            scaling_factor=self.scale if normalized else None,
            hook_name=hook_name,
            model_name=model_name,
            metadata=(metadata or {}) | {"training": training},
        )
        dtype = getattr(torch, cfg.dtype)
        return SAE(sae_cfg, {name: t.to("cpu", dtype) for name, t in weights.items()})

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors on CPU, JSON scalars): everything the next step depends on."""
        tensors = {f"param.{name}": p.detach() for name, p in self.params.items()}
        for name, p in self.params.items():
            tensors |= {f"adam.{name}.{key}": t for key, t in self.optimizer.state.get(p, {}).items()}
        tensors |= {
            "tokens_since_fired": self.tokens_since_fired,
            "rng": self.generator.get_state(),
            "batchtopk_threshold": self.batchtopk_threshold,
        }
        scalars = {
            "format": STATE_FORMAT,
            "config": self.cfg.model_dump(mode="json"),
            "d_in": self.d_in,
            "steps_done": self.steps_done,
            "tokens_seen": self.tokens_seen,
            "scale": self.scale,
            "initialized": self.initialized,
        }
        return {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}, scalars

    def load_state_dict(self, tensors: dict[str, Tensor], scalars: dict[str, Any], source: str = "state") -> None:
        """Restore a `state_dict()` of a run with the same config (runtime fields aside) and d_in."""
        ours, theirs = self.cfg.model_dump(mode="json"), scalars.get("config") or {}
        changed = sorted(
            k for k in ours.keys() | theirs.keys() if k not in RUNTIME_FIELDS and ours.get(k) != theirs.get(k)
        )
        if changed or scalars.get("d_in") != self.d_in:
            what = ", ".join(changed) if changed else f"d_in ({scalars.get('d_in')} vs {self.d_in})"
            raise UserError(
                f"{source} was written by a run with different {what}: resume with the same "
                "training config and site, or start a fresh run"
            )
        needed = {f"param.{name}" for name in self.params} | {"tokens_since_fired", "rng", "batchtopk_threshold"}
        if needed - tensors.keys():
            raise UserError(
                f"{source} lacks {', '.join(sorted(needed - tensors.keys()))}: the state is "
                "incomplete; resume from an earlier checkpoint or start a fresh run"
            )
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[f"param.{name}"])
        adam = self.optimizer.state_dict()
        per_param = (
            {key.rsplit(".", 1)[1]: t for key, t in tensors.items() if key.startswith(f"adam.{name}.")}
            for name in self.params
        )
        adam["state"] = {i: state for i, state in enumerate(per_param) if state}
        self.optimizer.load_state_dict(adam)  # moves the moments to the parameters' device
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.batchtopk_threshold.copy_(tensors["batchtopk_threshold"])
        self.generator.set_state(tensors["rng"])
        self.steps_done, self.tokens_seen = int(scalars["steps_done"]), int(scalars["tokens_seen"])
        self.scale, self.initialized = float(scalars["scale"]), bool(scalars["initialized"])

    def save_state(self, directory: str | os.PathLike[str]) -> None:
        """Write `state_dict()` to `directory` (see `transforms.sae_train_state` for the kill-safe layout)."""
        write_state(directory, *self.state_dict(), step=self.steps_done)

    def load_state(self, directory: str | os.PathLike[str]) -> None:
        """Resume from `save_state(directory)`; safetensors and JSON only, never a pickle."""
        tensors, scalars = read_state(directory)
        self.load_state_dict(tensors, scalars, source=str(Path(directory) / STATE_JSON))
