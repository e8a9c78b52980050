"""Directions and interventions: diff-in-means against numpy, ablation and addition against their formulas, and
concept erasure measured with a held-out linear probe on synthetic data and on the embedded SmolLM2."""

import random

import numpy as np
import pytest
import torch

from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelConfig
from actstore.transforms.capture import Capture
from actstore.transforms.directions import (
    DiffInMeans,
    LeaceErasure,
    LinearProbe,
    StreamingMedian,
    activation_addition,
    chance_accuracy,
    directional_ablation,
    mean_ablation,
    median_ablation,
)
from actstore.transforms.models import embedded_default_gguf, load_tokenizer
from actstore.transforms.sites import resolve_sites
from tests.tiny_models import embedded_model
from tests.transforms.test_models import assert_one_line_user_error

HIGH = 0.9
"""Held-out probe accuracy that counts as "the concept is linearly readable"."""
CHANCE_TOLERANCE = 0.05
"""How far above the majority-class rate a held-out probe may land and still count as chance: about three binomial
standard deviations for the test sets used here (1000 to 1300 tokens)."""


def labelled(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed float32 activations with 0/1 labels, the positive set shifted."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, d, generator=g) + 2.0 * y[:, None], y


def test_diff_in_means_equals_numpy_means() -> None:
    x, y = labelled(300, 7, seed=0)
    dim = DiffInMeans(7)
    dim.update(x, y.bool())
    xs, ys = x.double().numpy(), y.numpy()
    pos, neg = xs[ys == 1].mean(0), xs[ys == 0].mean(0)
    np.testing.assert_allclose(dim.mean_positive.numpy(), pos, rtol=1e-12)
    np.testing.assert_allclose(dim.mean_negative.numpy(), neg, rtol=1e-12)
    np.testing.assert_allclose(dim.mean.numpy(), xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(dim.direction.numpy(), pos - neg, rtol=1e-12)
    np.testing.assert_allclose(dim.unit.numpy(), (pos - neg) / np.linalg.norm(pos - neg), rtol=1e-12)
    assert dim.counts.tolist() == [int((ys == 0).sum()), int((ys == 1).sum())]


def test_diff_in_means_does_not_depend_on_batching_or_shape() -> None:
    x, y = labelled(240, 5, seed=1)
    whole = DiffInMeans(5)
    whole.update(x, y)
    batched = DiffInMeans(5)
    for rows in torch.tensor_split(torch.arange(240), [1, 17, 18, 120]):
        batched.update(x[rows], y[rows])
    shaped = DiffInMeans(5)
    shaped.update(x.reshape(12, 20, 5), y.reshape(12, 20))  # [batch, tokens, d] with [batch, tokens] labels
    for other in (batched, shaped):
        np.testing.assert_allclose(other.direction.numpy(), whole.direction.numpy(), rtol=1e-12)
        np.testing.assert_allclose(other.mean.numpy(), whole.mean.numpy(), rtol=1e-12)


def test_diff_in_means_user_errors() -> None:
    dim = DiffInMeans(3)
    dim.update(torch.ones(4, 3), torch.ones(4, dtype=torch.long))
    with pytest.raises(UserError) as err:
        _ = dim.direction
    assert_one_line_user_error(err, "no negative activations", "False/0")
    with pytest.raises(UserError) as err:
        dim.update(torch.ones(4, 3), torch.tensor([0, 1, 2, 1]))
    assert_one_line_user_error(err, "label 2", "[0, 2)")
    with pytest.raises(UserError) as err:
        dim.update(torch.ones(4, 3), torch.tensor([0, 1, 1]))
    assert_one_line_user_error(err, "3 labels for 4 activation rows")
    with pytest.raises(UserError) as err:
        dim.update(torch.ones(4, 5), torch.tensor([0, 1, 1, 0]))
    assert_one_line_user_error(err, "width 3", "[4, 5]")
    with pytest.raises(UserError) as err:
        dim.update(torch.ones(2, 3), torch.tensor([0.5, 1.0]))
    assert_one_line_user_error(err, "fractional")


def test_directional_ablation_removes_only_the_direction() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, generator=g)
    x = torch.randn(3, 5, 16, generator=g)
    out = directional_ablation(r)(x)
    xs, unit = x.double().numpy(), (r / r.norm()).double().numpy()
    want = xs - (xs @ unit)[..., None] * unit
    assert out.shape == x.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), want, atol=1e-5)
    assert np.abs(out.double().numpy() @ unit).max() < 1e-5
    np.testing.assert_allclose(directional_ablation(3 * r)(out).numpy(), out.numpy(), atol=1e-5)  # idempotent
    half = directional_ablation(r)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and np.abs(half.double().numpy() @ unit).max() < 0.05


def test_activation_addition_adds_alpha_r() -> None:
    g = torch.Generator().manual_seed(1)
    r, x = torch.randn(8, generator=g), torch.randn(4, 8, generator=g)
    out = activation_addition(r, -2.5)(x)
    np.testing.assert_allclose(out.numpy(), x.numpy() - 2.5 * r.numpy()[None], rtol=1e-6)
    assert out.dtype == x.dtype


def test_mean_and_median_ablation_replace_every_token() -> None:
    value = torch.arange(6, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float16)
    for ablate in (mean_ablation(value), median_ablation(value)):
        out = ablate(x)
        assert out.shape == x.shape and out.dtype == torch.float16
        assert (out == torch.arange(6, dtype=torch.float16)).all()
        out += 1  # a replacement may be edited in place without touching the fitted vector
        assert (ablate(x) == torch.arange(6, dtype=torch.float16)).all()


def test_intervention_user_errors() -> None:
    with pytest.raises(UserError) as err:
        directional_ablation(torch.ones(4))(torch.ones(2, 5))
    assert_one_line_user_error(err, "width 4", "[2, 5]", "site it was fitted on")
    with pytest.raises(UserError) as err:
        directional_ablation(torch.zeros(4))
    assert_one_line_user_error(err, "zero or non-finite norm")
    with pytest.raises(UserError) as err:
        mean_ablation(torch.ones(2, 4))
    assert_one_line_user_error(err, "mean ablation", "[2, 4]")


def test_streaming_median_is_exact_within_capacity() -> None:
    x = torch.randn(501, 6, generator=torch.Generator().manual_seed(2))
    median = StreamingMedian(6, capacity=600)
    for rows in torch.tensor_split(x, 7):
        median.update(rows)
    np.testing.assert_allclose(median.median().numpy(), np.median(x.double().numpy(), axis=0), rtol=1e-12)
    median.update(x[:1])  # an even count takes the mean of the two middle values
    even = torch.cat([x, x[:1]]).double().numpy()
    np.testing.assert_allclose(median.median().numpy(), np.median(even, axis=0), rtol=1e-12)


def test_streaming_median_samples_independently_of_batching() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.0, -1.0, 4.0, 2.0])
    whole, batched = StreamingMedian(4, capacity=1024, seed=7), StreamingMedian(4, capacity=1024, seed=7)
    whole.update(x)
    for rows in torch.tensor_split(x, [3, 1000, 1001, 4000]):
        batched.update(rows)
    assert whole.seen == batched.seen == 5000 and whole.sample.shape == (1024, 4)
    assert torch.equal(whole.sample, batched.sample)
    # Every kept row is a real row, and the sample median is near the population's (SE ~ 1.25 sigma / 32).
    assert all((x == row).all(dim=1).any() for row in whole.sample[:50])
    np.testing.assert_allclose(whole.median().numpy(), [0.0, -1.0, 4.0, 2.0], atol=4 * 1.25 * 3.0 / 32)
    with pytest.raises(UserError) as err:
        StreamingMedian(4).median()
    assert_one_line_user_error(err, "saw no activations")


def probe_accuracies(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int
) -> dict[str, float]:
    """Held-out probe accuracy before any edit and after each edit fitted on the training split only."""
    d = x_train.shape[1]
    dim = DiffInMeans(d)
    dim.update(x_train, y_train)
    leace = LeaceErasure(d)
    leace.update(x_train, y_train)
    edits = {
        "none": lambda x: x,
        "diff_in_means": directional_ablation(dim.direction),
        "random": directional_ablation(torch.randn(d, generator=torch.Generator().manual_seed(seed))),
        "leace": leace.eraser(),
    }
    return {
        name: LinearProbe().fit(edit(x_train), y_train).accuracy(edit(x_test), y_test) for name, edit in edits.items()
    }


def assert_erased(acc: dict[str, float], chance: float) -> None:
    assert acc["none"] >= HIGH, acc
    assert acc["random"] >= HIGH, acc
    assert acc["diff_in_means"] <= chance + CHANCE_TOLERANCE, acc
    assert acc["leace"] <= chance + CHANCE_TOLERANCE, acc


def test_erasure_on_synthetic_linearly_encoded_label() -> None:
    d, n = 32, 5000
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(d, d, generator=g) * 0.3  # correlated, anisotropic noise
    concept = torch.randn(d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) @ mixing + y[:, None] * 2.0 * concept / concept.norm()
    acc = probe_accuracies(x[:4000], y[:4000], x[4000:], y[4000:], seed=1)
    assert_erased(acc, chance_accuracy(y[4000:]))
    # On the data it was fitted on, ablating r leaves the two classes with equal means.
    dim = DiffInMeans(d)
    dim.update(x[:4000], y[:4000])
    ablated = DiffInMeans(d)
    ablated.update(directional_ablation(dim.direction)(x[:4000]), y[:4000])
    assert ablated.direction.norm() < 1e-5 < 1.9 < dim.direction.norm()
    # LEACE also equalizes them, with a rank-1 edit for two classes, and moves the activations less than the
    # orthogonal ablation does (it is the least-squares smallest such edit).
    leace = LeaceErasure(d)
    leace.update(x[:4000], y[:4000])
    edit = (leace.eraser()(x[:4000]) - x[:4000]).double()
    erased = DiffInMeans(d)
    erased.update(x[:4000] + edit.float(), y[:4000])
    assert erased.direction.norm() < 1e-4
    assert torch.linalg.svdvals(edit)[1] < 1e-6 * torch.linalg.svdvals(edit)[0]
    ablation_edit = (directional_ablation(dim.direction)(x[:4000]) - x[:4000]).double()
    assert edit.pow(2).sum(1).mean() < 0.9 * ablation_edit.pow(2).sum(1).mean()


ANIMALS = (
    "cat dog horse cow sheep goat pig lion tiger bear wolf fox deer rabbit mouse eagle owl duck goose frog"
).split()
TOOLS = (
    "hammer saw drill wrench knife axe shovel rake chisel screwdriver pliers ladder rope nail bolt brush broom "
    "bucket spade file"
).split()


def word_sequences(n_seq: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of random animal and tool words, each token labelled 1 when its word is a tool."""
    tokenizer = load_tokenizer(ModelConfig(name=str(embedded_default_gguf())))
    rng = random.Random(0)
    ids, labels = [], []
    for _ in range(n_seq):
        seq: list[int] = []
        lab: list[int] = []
        while len(seq) < length:
            is_tool = rng.random() < 0.5
            word_ids = tokenizer(" " + rng.choice(TOOLS if is_tool else ANIMALS), add_special_tokens=False)["input_ids"]
            seq += word_ids
            lab += [int(is_tool)] * len(word_ids)
        ids.append(seq[:length])
        labels.append(lab[:length])
    return torch.tensor(ids), torch.tensor(labels)


def test_erasure_on_embedded_smollm2_layer_3() -> None:
    ids, labels = word_sequences(40, 64)
    model = embedded_model()
    with Capture(model, resolve_sites(model, ["blocks.3.hook_resid_post"]), loss=False) as cap:
        acts = cap(ids).acts["blocks.3.hook_resid_post"].float().reshape(40, 64, -1)
    # Position 0 is the attention sink, an outlier unrelated to the word; sequences split train / held out.
    x, y = acts[:, 1:], labels[:, 1:]
    train, test = slice(0, 24), slice(24, None)
    x_train, y_train = x[train].reshape(-1, x.shape[-1]), y[train].reshape(-1)
    x_test, y_test = x[test].reshape(-1, x.shape[-1]), y[test].reshape(-1)
    acc = probe_accuracies(x_train, y_train, x_test, y_test, seed=2)
    assert_erased(acc, chance_accuracy(y_test))


def test_leace_multiclass_and_user_errors() -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (3000,), generator=g)
    centres = torch.randn(3, 12, generator=g) * 2
    x = torch.randn(3000, 12, generator=g) + centres[y]
    leace = LeaceErasure(12, classes=3)
    for rows in torch.tensor_split(torch.arange(2000), 4):
        leace.update(x[rows], y[rows])
    erase = leace.eraser()
    before = LinearProbe().fit(x[:2000], y[:2000]).accuracy(x[2000:], y[2000:])
    after = LinearProbe().fit(erase(x[:2000]), y[:2000]).accuracy(erase(x[2000:]), y[2000:])
    assert before >= HIGH and after <= chance_accuracy(y[2000:]) + CHANCE_TOLERANCE
    # On the fitted data every class mean equals the overall mean after erasure.
    erased = erase(x[:2000]).double()
    for c in range(3):
        torch.testing.assert_close(erased[y[:2000] == c].mean(0), erased.mean(0), atol=1e-4, rtol=0)

    with pytest.raises(UserError) as err:
        LeaceErasure(12, classes=1)
    assert_one_line_user_error(err, "classes=1", "classes >= 2")
    single = LeaceErasure(12)
    single.update(x[:10], torch.zeros(10, dtype=torch.long))
    with pytest.raises(UserError) as err:
        single.eraser()
    assert_one_line_user_error(err, "1 of 2 concept classes")
    with pytest.raises(UserError) as err:
        LinearProbe().predict(x)
    assert_one_line_user_error(err, "not been fitted")
    with pytest.raises(UserError) as err:
        LinearProbe().fit(x[:0], y[:0])
    assert_one_line_user_error(err, "no training rows")


def test_probe_is_deterministic_and_chance_is_the_majority_rate() -> None:
    x, y = labelled(400, 6, seed=5)
    first, second = LinearProbe().fit(x, y), LinearProbe().fit(x, y)
    assert first.weight is not None and second.weight is not None and torch.equal(first.weight, second.weight)
    assert first.accuracy(x, y) >= HIGH
    assert chance_accuracy(torch.tensor([1, 1, 0, 1])) == 0.75
