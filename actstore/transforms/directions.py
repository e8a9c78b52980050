"""Directions in activation space and the interventions built on them: diff-in-means, ablation, addition, LEACE.

A concept labelled on tokens (two sets of activations) gives a direction r = mean(positive) − mean(negative).
Interventions are plain callables `[..., d] -> [..., d]` so any site's hook can use them as a replacement:
removing r̂ (directional ablation, Arditi et al. 2024), adding α·r (activation addition), replacing the whole
vector with a mean or median, or erasing every linear trace of the concept with LEACE (Belrose et al. 2023).
A linear probe measures how much of the concept an intervention left.

Statistics are streamed: sums are float64 on the CPU, so a fit does not depend on how the tokens were batched.
Interventions compute in at least float32 and return the input's dtype and device.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from concept_erasure import LeaceFitter
from torch import Tensor

from actstore.schemas.errors import UserError

Intervention = Callable[[Tensor], Tensor]
"""Maps activations [..., d] to replacements of the same shape, dtype and device."""


class DiffInMeans:
    """Running means of two labelled sets of activations; their difference is the concept's direction."""

    def __init__(self, d: int) -> None:
        if d < 1:
            raise ValueError("DiffInMeans needs d >= 1")
        self.d = d
        self.sums = torch.zeros(2, d, dtype=torch.float64)
        """Row 0: sum of negative activations, row 1: sum of positive ones."""
        self.counts = torch.zeros(2, dtype=torch.int64)
        """Rows seen per set (negative, positive)."""

    def update(self, x: Tensor, labels: Tensor) -> None:
        """Add activations `x` [..., d] labelled by `labels` [...]: True/1 for the positive set, False/0 else."""
        x = _rows(x, self.d, "diff-in-means")
        label = _class_labels(labels, x.shape[0], 2)
        self.sums.index_add_(0, label, x)
        self.counts += torch.bincount(label, minlength=2)

    @property
    def mean_negative(self) -> Tensor:
        """[d] float64 mean of the negative set."""
        return self._means()[0]

    @property
    def mean_positive(self) -> Tensor:
        """[d] float64 mean of the positive set."""
        return self._means()[1]

    @property
    def mean(self) -> Tensor:
        """[d] float64 mean of both sets pooled (what mean ablation replaces activations with)."""
        return self.sums.sum(dim=0) / self._check_counts().sum()

    @property
    def direction(self) -> Tensor:
        """[d] float64 r = mean(positive) − mean(negative)."""
        means = self._means()
        return means[1] - means[0]

    @property
    def unit(self) -> Tensor:
        """[d] float64 r̂ = r / ‖r‖."""
        return _unit(self.direction)

    def _check_counts(self) -> Tensor:
        for index, name in ((1, "positive"), (0, "negative")):
            if self.counts[index] == 0:
                raise UserError(
                    f"diff-in-means saw no {name} activations: label some tokens "
                    f"{'True/1' if index else 'False/0'} so both sets are non-empty"
                )
        return self.counts

    def _means(self) -> Tensor:
        return self.sums / self._check_counts()[:, None]


def directional_ablation(r: Tensor) -> Intervention:
    """x ← x − r̂ r̂ᵀ x: removes the component along r, leaves every orthogonal one untouched."""
    unit = _unit(r)

    def ablate(x: Tensor) -> Tensor:
        xw, u = _work(x, unit)
        return (xw - (xw @ u)[..., None] * u).to(x.dtype)

    return ablate


def activation_addition(r: Tensor, alpha: float) -> Intervention:
    """x ← x + α r (r as given, not normalized: α = 1 with a diff-in-means r moves negatives onto positives)."""
    r = _vector(r, "activation addition")

    def add(x: Tensor) -> Tensor:
        xw, v = _work(x, r)
        return (xw + alpha * v).to(x.dtype)

    return add


def mean_ablation(mean: Tensor) -> Intervention:
    """x ← mean, at every token (e.g. `DiffInMeans.mean`, or the site's mean over a corpus)."""
    return _constant(mean, "mean ablation")


def median_ablation(median: Tensor) -> Intervention:
    """x ← median, at every token (e.g. `StreamingMedian.median()`): robust to the outlier tokens that pull a
    residual-stream mean far from any real activation."""
    return _constant(median, "median ablation")


class StreamingMedian:
    """Per-dimension median of streamed activations, exact over a uniform sample of at most `capacity` rows.

    Each row draws a key from a seeded generator in arrival order and the `capacity` rows with the smallest keys
    are kept (bottom-k reservoir sampling), so the sample, and the median, do not depend on batching. With no
    more rows than `capacity` the sample is every row and the median is exact; beyond it the median's standard
    error is about 1.25·σ/√capacity per dimension for Gaussian-like data. Rows are kept in float32.
    """

    def __init__(self, d: int, capacity: int = 8192, seed: int = 0) -> None:
        if d < 1 or capacity < 1:
            raise ValueError("StreamingMedian needs d >= 1 and capacity >= 1")
        self.d = d
        self.capacity = capacity
        self.seen = 0
        """Rows offered so far."""
        self._rng = np.random.default_rng(seed)
        self._keys = np.zeros(0, dtype=np.float64)
        self._rows = torch.zeros(0, d, dtype=torch.float32)

    def update(self, x: Tensor) -> None:
        """Offer activations `x` [..., d] to the sample."""
        rows = x.detach().reshape(-1, x.shape[-1]) if x.ndim else x
        _check_width(rows, self.d, "the streaming median")
        keys = np.concatenate([self._keys, self._rng.random(rows.shape[0])])
        self.seen += rows.shape[0]
        keep = np.argsort(keys, kind="stable")[: self.capacity]
        candidates = torch.cat([self._rows, rows.to("cpu", torch.float32)])
        self._keys, self._rows = keys[keep], candidates[torch.from_numpy(keep)]

    @property
    def sample(self) -> Tensor:
        """[min(seen, capacity), d] float32 rows kept, in key order."""
        return self._rows

    def median(self) -> Tensor:
        """[d] float64 median of the sample (the mean of the two middle values for an even count, as numpy)."""
        n = self._rows.shape[0]
        if n == 0:
            raise UserError("the streaming median saw no activations: stream some tokens through it first")
        ordered = self._rows.to(torch.float64).sort(dim=0).values
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


class LeaceErasure:
    """LEACE (Belrose et al. 2023): the least-squares-smallest affine edit after which no linear classifier can
    predict the concept better than a constant, fitted from streamed (x, label) batches.

    The fit is concept-erasure's `LeaceFitter` in float64 (streaming covariances, closed-form eraser). Labels are
    class ids in [0, classes); two classes use a single 0/1 column, more use one-hot columns. With
    `constrain_cov_trace` the eraser is mixed toward an orthogonal projection so the activations' total variance
    never grows (safer when erasing at many layers at once) at the cost of the exact guarantee; off by default.
    """

    def __init__(self, d: int, classes: int = 2, constrain_cov_trace: bool = False) -> None:
        if d < 1:
            raise ValueError("LeaceErasure needs d >= 1")
        if classes < 2:
            raise UserError(f"LEACE needs at least 2 concept classes, got classes={classes}: pass classes >= 2")
        self.d = d
        self.classes = classes
        self.counts = torch.zeros(classes, dtype=torch.int64)
        """Rows seen per class."""
        self._fitter = LeaceFitter(
            d, 1 if classes == 2 else classes, dtype=torch.float64, constrain_cov_trace=constrain_cov_trace
        )

    def update(self, x: Tensor, labels: Tensor) -> None:
        """Add activations `x` [..., d] with class ids `labels` [...] (bool or ints in [0, classes))."""
        x = _rows(x, self.d, "LEACE")
        label = _class_labels(labels, x.shape[0], self.classes)
        z = label[:, None].to(torch.float64) if self.classes == 2 else F.one_hot(label, self.classes).to(x.dtype)
        self._fitter.update(x, z)
        self.counts += torch.bincount(label, minlength=self.classes)

    def eraser(self) -> Intervention:
        """x ← x − L R (x − mean): the fitted eraser, as an intervention."""
        present = int((self.counts > 0).sum())
        if present < 2:
            raise UserError(
                f"LEACE saw {present} of {self.classes} concept classes: label tokens of at least two "
                "classes before fitting"
            )
        fitted = self._fitter.eraser
        left, right = fitted.proj_left, fitted.proj_right
        bias = fitted.bias if fitted.bias is not None else torch.zeros(self.d, dtype=torch.float64)

        def erase(x: Tensor) -> Tensor:
            xw, mean = _work(x, bias)
            lw, rw = left.to(xw.device, xw.dtype), right.to(xw.device, xw.dtype)
            return (xw - ((xw - mean) @ rw.mT) @ lw.mT).to(x.dtype)

        return erase


class LinearProbe:
    """Multinomial logistic regression on standardized inputs, fitted full-batch with L-BFGS.

    Starts from zero weights, so a fit is deterministic without a seed. The L2 penalty keeps weights finite on
    separable data. Inputs are standardized with the training set's mean and standard deviation (a constant
    dimension, such as an ablated one, is left unscaled).
    """

    def __init__(self, l2: float = 1e-3, max_iter: int = 200) -> None:
        self.l2 = l2
        self.max_iter = max_iter
        self.weight: Tensor | None = None
        """[d, classes] float64 weights on standardized inputs, after `fit`."""
        self.bias: Tensor | None = None
        self._shift: Tensor | None = None
        self._scale: Tensor | None = None

    def fit(self, x: Tensor, y: Tensor) -> "LinearProbe":
        """Fit on activations `x` [N, d] and class ids `y` [N] (bool or ints >= 0)."""
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        labels = _class_labels(y, x.shape[0], None)
        if len(labels) == 0:
            raise UserError("the probe got no training rows: pass activations with their labels to fit(x, y)")
        classes = max(2, int(labels.max()) + 1)
        self._shift = x.mean(dim=0)
        std = x.std(dim=0, correction=0)
        self._scale = torch.where(std > 0, std, torch.ones_like(std))
        inputs = (x - self._shift) / self._scale
        weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            optimizer.zero_grad()
            value = F.cross_entropy(inputs @ weight + bias, labels) + self.l2 * weight.pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def predict(self, x: Tensor) -> Tensor:
        """[N] int64 most likely class of each row of `x` [N, d]."""
        if self.weight is None or self.bias is None or self._shift is None or self._scale is None:
            raise UserError("the probe has not been fitted: call fit(x, y) before predicting")
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        _check_width(x, self.weight.shape[0], "the probe")
        return (((x - self._shift) / self._scale) @ self.weight + self.bias).argmax(dim=-1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Share of rows of `x` whose predicted class is `y`."""
        labels = _class_labels(y, x.reshape(-1, x.shape[-1]).shape[0], None)
        return float((self.predict(x) == labels).to(torch.float64).mean())


def chance_accuracy(y: Tensor) -> float:
    """Accuracy of always predicting the most frequent class of `y`: what a probe falls to once a concept is
    erased."""
    labels = _class_labels(y, y.numel(), None)
    return float(torch.bincount(labels).max()) / len(labels) if len(labels) else float("nan")


def _rows(x: Tensor, d: int, what: str) -> Tensor:
    """`x` as [N, d] float64 on the CPU."""
    rows = x.detach().reshape(-1, x.shape[-1]) if x.ndim else x
    _check_width(rows, d, what)
    return rows.to("cpu", torch.float64)


def _check_width(x: Tensor, d: int, what: str) -> None:
    if x.ndim == 0 or x.shape[-1] != d:
        raise UserError(
            f"{what} expects activations of width {d} but got shape {list(x.shape)}: use activations "
            "of the site it was fitted on"
        )


def _class_labels(labels: Tensor, n: int, classes: int | None) -> Tensor:
    """`labels` as [n] int64 class ids, checked to lie in [0, classes) (or be >= 0 when classes is None)."""
    label = torch.as_tensor(labels).detach().reshape(-1).to("cpu")
    if label.shape[0] != n:
        raise UserError(f"got {label.shape[0]} labels for {n} activation rows: pass one label per token")
    if label.is_floating_point() and not torch.equal(label, label.round()):
        raise UserError("labels must be class ids (bool or integers), got fractional values: round or threshold them")
    label = label.to(torch.int64)
    bad = (label < 0) | (label >= classes) if classes is not None else label < 0
    if bad.any():
        allowed = f"in [0, {classes})" if classes is not None else ">= 0"
        raise UserError(f"label {int(label[bad][0])} is not a class id {allowed}: relabel the tokens")
    return label


def _vector(v: Tensor, what: str) -> Tensor:
    v = torch.as_tensor(v).detach()
    if v.ndim != 1 or v.shape[0] == 0:
        raise UserError(f"{what} needs one vector of shape [d], got shape {list(v.shape)}")
    return v.to("cpu", torch.float64)


def _unit(r: Tensor) -> Tensor:
    r = _vector(r, "a direction")
    norm = r.norm()
    if not norm > 0 or not torch.isfinite(norm):
        raise UserError(
            "the direction has zero or non-finite norm (the two sets have equal means, or it holds "
            "NaN): label the sets so they differ"
        )
    return r / norm


def _work(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """`x` in at least float32 and `v` cast to match it, after checking the width."""
    _check_width(x, v.shape[0], "the intervention")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype), v.to(x.device, dtype)


def _constant(v: Tensor, what: str) -> Intervention:
    value = _vector(v, what)

    def replace(x: Tensor) -> Tensor:
        _, vw = _work(x, value)
        return vw.to(x.dtype).expand(x.shape).clone()

    return replace
