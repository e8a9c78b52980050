"""How far a second model's activations moved from a first's, and whether the first model's SAE still reads them.

Two harvests of one corpus at one site (say a base model A and its fine-tune B) are joined row by row on the
global token index `tok`. `PairStats` streams per-token cosine and Euclidean distance; `FeatureCorrelation`
streams, per SAE latent, the Pearson correlation between A's SAE on A's activations and on B's. Sums are float64,
so every statistic is independent of how the tokens were batched (up to float64 rounding); per-token moments are
merged with Chan et al.'s parallel update so they stay accurate when a mean dwarfs its spread (cosines near 1).
"""

from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor

from actstore.schemas.errors import UserError
from actstore.transforms.logit_weights import logit_weights

DIST_LOG_RANGE = (1e-4, 1e5)
"""Smallest and largest finite edge of the default Euclidean-distance histogram (log-spaced): distances between
two models' activations span from ~0 (an untouched early layer) to thousands (massive activations), so a fixed
log grid fits every site and keeps the histogram independent of batching."""

CHUNK_ELEMENTS = 1 << 22
"""Latent values scanned at a time by `FeatureCorrelation`, so wide SAEs with dense batches stay bounded."""


class Histogram(NamedTuple):
    """Counts of a per-token statistic in fixed bins."""

    edges: np.ndarray
    """[bins + 1] float64 bin edges; every bin is [left, right) except the last, which includes its right edge."""
    counts: np.ndarray
    """[bins] int64 tokens per bin."""
    overflow: int
    """Tokens above the last edge (never for cosine, whose range is [-1, 1])."""


class PairHistograms(NamedTuple):
    """The two histograms of a `PairStats`."""

    cosine: Histogram
    """Cosine similarity, equal-width bins on [-1, 1]."""
    euclid: Histogram
    """Euclidean distance: equal-width bins on [0, dist_max] if given, else [0, 1e-4) then log-spaced to 1e5."""


class FeatureCorrelationResult(NamedTuple):
    """Per-latent agreement between an SAE's latents on model A and on model B over the same tokens."""

    r: np.ndarray
    """[d_sae] float64 Pearson correlation; NaN where the latent is constant (e.g. dead) on either side."""
    count_a: np.ndarray
    """[d_sae] int64 tokens where the latent is nonzero on A's activations."""
    count_b: np.ndarray
    """[d_sae] int64 tokens where the latent is nonzero on B's activations."""
    tokens: int
    """Tokens compared."""


class _Moments:
    """Count, mean and centred second moment per column, merged batch by batch in float64 (Chan et al. 1979)."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Merge float64 rows `x` [N, width]."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean += delta * (n_b / total)
        self.m2 += (x - mean_b).pow(2).sum(dim=0) + delta.pow(2) * (self.n * n_b / total)
        self.n = total

    def std(self) -> Tensor:
        """Population standard deviation (NaN before any row)."""
        return (self.m2 / self.n).sqrt() if self.n else torch.full_like(self.m2, float("nan"))


class PairStats:
    """Per-token cosine similarity and Euclidean distance between two models' activations at one site.

    A token where either vector is all zeros has no cosine: it is NaN in `update`'s output and left out of the
    cosine statistics (`cos_tokens` counts the others); its distance still counts.
    """

    def __init__(self, ctx_len: int, cos_bins: int = 200, dist_bins: int = 200, dist_max: float | None = None) -> None:
        if ctx_len < 1 or cos_bins < 1 or dist_bins < 2:
            raise ValueError("PairStats needs ctx_len >= 1, cos_bins >= 1 and dist_bins >= 2")
        if dist_max is not None and not dist_max > 0:
            raise UserError(
                f"dist_max={dist_max} is not a positive distance: pass a value > 0, or none for log-spaced bins"
            )
        self.ctx_len = ctx_len
        self.cos_edges = np.linspace(-1.0, 1.0, cos_bins + 1)
        if dist_max is None:
            low, high = DIST_LOG_RANGE
            self.dist_edges = np.concatenate([[0.0], np.logspace(np.log10(low), np.log10(high), dist_bins)])
        else:
            self.dist_edges = np.linspace(0.0, dist_max, dist_bins + 1)
        self._cos = _Moments(1)
        self._dist = _Moments(3)  # euclid, |a|, |b|
        self._cos_counts = np.zeros(cos_bins, dtype=np.int64)
        self._dist_counts = np.zeros(len(self.dist_edges) - 1, dtype=np.int64)
        self._dist_overflow = 0
        self._pos_n = np.zeros(ctx_len, dtype=np.int64)
        self._pos_cos_n = np.zeros(ctx_len, dtype=np.int64)
        self._pos_cos_sum = np.zeros(ctx_len, dtype=np.float64)
        self._pos_dist_sum = np.zeros(ctx_len, dtype=np.float64)

    def update(self, tok: np.ndarray, a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Add tokens `tok` [N] with A's rows `a` and B's rows `b` ([N, d] each, same tokens in the same order);
        returns their per-token cosine and distance ([N] float64 each)."""
        if a.shape != b.shape or a.ndim != 2:
            raise UserError(
                f"model A's activations have shape {list(a.shape)} but model B's have {list(b.shape)}: "
                "compare two harvests of the same site over the same tokens, with the same width"
            )
        tok = np.asarray(tok, dtype=np.int64)
        if tok.shape != (a.shape[0],):
            raise ValueError(f"tok has shape {tok.shape}, expected ({a.shape[0]},) to match the activation rows")
        a64 = a.detach().to("cpu", torch.float64)
        b64 = b.detach().to("cpu", torch.float64)
        norm_a, norm_b = a64.norm(dim=-1), b64.norm(dim=-1)
        defined = (norm_a > 0) & (norm_b > 0)
        cos = torch.where(defined, (a64 * b64).sum(dim=-1) / (norm_a * norm_b), float("nan")).clamp(-1.0, 1.0)
        euclid = (a64 - b64).norm(dim=-1)
        self._cos.update(cos[defined].unsqueeze(1))
        self._dist.update(torch.stack([euclid, norm_a, norm_b], dim=1))

        cos_np, euclid_np, defined_np = cos.numpy(), euclid.numpy(), defined.numpy()
        self._cos_counts += np.histogram(cos_np[defined_np], self.cos_edges)[0]
        inside = euclid_np <= self.dist_edges[-1]
        self._dist_counts += np.histogram(euclid_np[inside], self.dist_edges)[0]
        self._dist_overflow += int((~inside).sum())
        pos = tok % self.ctx_len
        self._pos_n += np.bincount(pos, minlength=self.ctx_len)
        self._pos_cos_n += np.bincount(pos[defined_np], minlength=self.ctx_len)
        self._pos_cos_sum += np.bincount(pos[defined_np], weights=cos_np[defined_np], minlength=self.ctx_len)
        self._pos_dist_sum += np.bincount(pos, weights=euclid_np, minlength=self.ctx_len)
        return cos_np, euclid_np

    def result(self) -> dict[str, float | int]:
        """`tokens`, `cos_tokens` (tokens with a defined cosine), `cos_mean`, `cos_std`, `euclid_mean`,
        `euclid_std` (means over all tokens, population standard deviations), `norm_a_mean`, `norm_b_mean`."""
        if self._dist.n == 0:
            raise UserError(
                "no tokens were compared: the two harvests share no token index; harvest both models "
                "over the same corpus with the same context length"
            )
        dist_std = self._dist.std()
        return {
            "tokens": self._dist.n,
            "cos_tokens": self._cos.n,
            "cos_mean": float(self._cos.mean[0]) if self._cos.n else float("nan"),
            "cos_std": float(self._cos.std()[0]),
            "euclid_mean": float(self._dist.mean[0]),
            "euclid_std": float(dist_std[0]),
            "norm_a_mean": float(self._dist.mean[1]),
            "norm_b_mean": float(self._dist.mean[2]),
        }

    def per_position(self) -> pl.DataFrame:
        """One row per position in the context seen at least once: `pos`, `n`, `cos_mean`, `euclid_mean`."""
        seen = np.flatnonzero(self._pos_n)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos_mean = self._pos_cos_sum[seen] / self._pos_cos_n[seen]
        return pl.DataFrame(
            {
                "pos": seen.astype(np.int64),
                "n": self._pos_n[seen],
                "cos_mean": cos_mean,
                "euclid_mean": self._pos_dist_sum[seen] / self._pos_n[seen],
            }
        )

    def histograms(self) -> PairHistograms:
        """Cosine and distance histograms of every token so far."""
        return PairHistograms(
            Histogram(self.cos_edges.copy(), self._cos_counts.copy(), 0),
            Histogram(self.dist_edges.copy(), self._dist_counts.copy(), self._dist_overflow),
        )


class FeatureCorrelation:
    """Per-latent Pearson correlation between an SAE's latents on model A's and model B's activations, streamed.

    SAE latents are mostly zeros, so only the entries nonzero on either side are gathered and their float64 sums
    (x, x², a·b per latent) accumulated: the cost is a few dense comparisons plus work in proportion to the
    active entries. Raw sums are exact enough here: a sparse latent's variance is large next to its squared mean,
    and a latent is constant on a side (r is NaN) exactly when its running minimum equals its maximum.
    Runs on the latents' device when it is CPU or CUDA (only [d_sae] vectors are kept), else on the CPU.
    """

    def __init__(self, d_sae: int) -> None:
        if d_sae < 1:
            raise ValueError("FeatureCorrelation needs d_sae >= 1")
        self.d_sae = d_sae
        self.tokens = 0
        self._device: torch.device | None = None

    def _start(self, device: torch.device) -> None:
        self._device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        self._sums = torch.zeros(self.d_sae, 5, dtype=torch.float64, device=self._device)  # a, b, a², b², ab
        self._counts = torch.zeros(2, self.d_sae, dtype=torch.int64, device=self._device)
        self._min = torch.full((2, self.d_sae), float("inf"), dtype=torch.float64, device=self._device)
        self._max = torch.full((2, self.d_sae), float("-inf"), dtype=torch.float64, device=self._device)

    def update(self, fa: Tensor, fb: Tensor) -> None:
        """Add latents `fa` (A's SAE on A's activations) and `fb` (the same SAE on B's), [N, d_sae] each, the same
        tokens in the same order."""
        if fa.shape != fb.shape or fa.ndim != 2 or fa.shape[1] != self.d_sae:
            raise UserError(
                f"latents on A have shape {list(fa.shape)} and on B {list(fb.shape)}, expected "
                f"[N, {self.d_sae}] each: encode both harvests with the same SAE over the same tokens"
            )
        if self._device is None:
            self._start(fa.device)
        rows = max(1, CHUNK_ELEMENTS // self.d_sae)
        for start in range(0, fa.shape[0], rows):
            a = fa[start : start + rows].detach().to(self._device)
            b = fb[start : start + rows].detach().to(self._device)
            flat = a.ne(0).logical_or_(b.ne(0)).view(-1).nonzero().squeeze(1)
            col = flat % self.d_sae
            va = a.reshape(-1).index_select(0, flat).to(torch.float64)
            vb = b.reshape(-1).index_select(0, flat).to(torch.float64)
            self._counts[0] += torch.bincount(col[va != 0], minlength=self.d_sae)
            self._counts[1] += torch.bincount(col[vb != 0], minlength=self.d_sae)
            self._sums.index_add_(0, col, torch.stack([va, vb, va * va, vb * vb, va * vb], dim=1))
            values = torch.stack([va, vb])
            index = col.expand(2, -1)
            self._min.scatter_reduce_(1, index, values, "amin")
            self._max.scatter_reduce_(1, index, values, "amax")
            self.tokens += a.shape[0]

    def result(self) -> FeatureCorrelationResult:
        if self._device is None or self.tokens == 0:
            raise UserError(
                "no latents were compared: the two harvests share no token index; encode both "
                "harvests of the same corpus with the same SAE"
            )
        n = self.tokens
        sum_a, sum_b, sum_aa, sum_bb, sum_ab = self._sums.unbind(dim=1)
        has_zero = self._counts < n  # zeros are values too: they bound the minimum and maximum
        low = torch.where(has_zero, self._min.clamp(max=0.0), self._min)
        high = torch.where(has_zero, self._max.clamp(min=0.0), self._max)
        constant = (low == high).any(dim=0)
        var_a, var_b = sum_aa - sum_a * sum_a / n, sum_bb - sum_b * sum_b / n
        r = ((sum_ab - sum_a * sum_b / n) / (var_a * var_b).sqrt()).clamp(-1.0, 1.0)
        r = torch.where(constant, float("nan"), r)
        counts = self._counts.cpu().numpy()
        return FeatureCorrelationResult(r.cpu().numpy(), counts[0], counts[1], n)


def log_density_correlation(
    counts_a: np.ndarray | Tensor, counts_b: np.ndarray | Tensor, tokens_a: int, tokens_b: int
) -> float:
    """Pearson correlation of log10 firing densities (count / tokens) of the same latents on two models.

    Only latents that fired at least once on both sides count: a dead latent has density 0 and no logarithm, and
    dropping it from one side only would compare different sets. NaN when fewer than two such latents remain or
    the densities are equal across all of them on a side (no spread to correlate).
    """
    a, b = _as_numpy(counts_a).astype(np.float64), _as_numpy(counts_b).astype(np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise UserError(
            f"firing counts on A have shape {list(a.shape)} and on B {list(b.shape)}: pass one count "
            "per latent of the same SAE on each side"
        )
    if tokens_a <= 0 or tokens_b <= 0:
        raise UserError(
            f"token totals must be positive (got A: {tokens_a}, B: {tokens_b}): pass the number of "
            "tokens each side's counts were taken over"
        )
    alive = (a > 0) & (b > 0)
    log_a, log_b = np.log10(a[alive] / tokens_a), np.log10(b[alive] / tokens_b)
    if alive.sum() < 2 or np.ptp(log_a) == 0 or np.ptp(log_b) == 0:
        return float("nan")
    log_a, log_b = log_a - log_a.mean(), log_b - log_b.mean()
    return float(np.clip((log_a @ log_b) / np.sqrt((log_a @ log_a) * (log_b @ log_b)), -1.0, 1.0))


def logit_weight_similarity(
    w_dec: Tensor, w_u_a: Tensor, w_u_b: Tensor, vocab: int | None = None, batch: int = 256
) -> Tensor:
    """[d_sae] float32 cosine, per latent, between its logit weights through model A's unembedding and through
    model B's (`W_dec[i] · W_U`, see `logit_weights`); NaN where either logit-weight vector is zero.

    Both unembeddings must index the same tokens; a fine-tune that appended tokens can be compared over the
    shared ids with `vocab` (the first `vocab` columns of each). Rows are processed `batch` at a time so the
    [d_sae, vocab] matrices are never held whole.
    """
    if vocab is not None:
        if not 0 < vocab <= min(w_u_a.shape[1], w_u_b.shape[1]):
            raise UserError(
                f"vocab={vocab} is not within both vocabularies ({w_u_a.shape[1]} and "
                f"{w_u_b.shape[1]} tokens): pass at most the smaller one"
            )
        w_u_a, w_u_b = w_u_a[:, :vocab], w_u_b[:, :vocab]
    if w_u_a.shape != w_u_b.shape:
        raise UserError(
            f"unembeddings differ in shape ({list(w_u_a.shape)} vs {list(w_u_b.shape)}): compare models "
            "with the same tokenizer, or pass vocab=<shared token count> when one appended tokens"
        )
    parts = []
    for start in range(0, w_dec.shape[0], batch):
        rows = w_dec[start : start + batch]
        la = logit_weights(rows, w_u_a).to(torch.float64)
        lb = logit_weights(rows, w_u_b).to(torch.float64)
        norms = la.norm(dim=-1) * lb.norm(dim=-1)
        cos = torch.where(norms > 0, (la * lb).sum(dim=-1) / norms, float("nan")).clamp(-1.0, 1.0)
        parts.append(cos.to(torch.float32))
    return torch.cat(parts) if parts else torch.zeros(0)


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
