"""Reconstruction metrics, each checked against its formula written out here in float64 numpy."""

import numpy as np
import pytest
import torch

from actstore.schemas.errors import UserError
from actstore.schemas.sae import SAEConfig
from actstore.transforms.sae import SAE
from actstore.transforms.sae_eval import ReconstructionStats, density_histogram, evaluate, outlier_positions

N, D_IN, D_SAE = 240, 12, 20


def fixed_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations with a large non-zero mean, an imperfect reconstruction, and latents with dead, rare and
    dense columns."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(N, D_IN)) + np.linspace(2.0, 5.0, D_IN)).astype(np.float32)
    x_hat = (0.9 * x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    density = np.concatenate([[0.0, 0.0, 0.003], np.linspace(0.005, 0.5, D_SAE - 4), [0.9]])
    fired = rng.random((N, D_SAE)) < density
    fired[0, 2] = True  # the 0.3% column fires at least once: density 1/240 < 1%
    latents = np.where(fired, rng.exponential(size=fired.shape), 0.0).astype(np.float32)
    return x, x_hat, latents


def run(x: np.ndarray, x_hat: np.ndarray, latents: np.ndarray, sizes: list[int]) -> ReconstructionStats:
    stats = ReconstructionStats(D_IN, D_SAE)
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        stats.update(torch.from_numpy(x[rows]), torch.from_numpy(x_hat[rows]), torch.from_numpy(latents[rows]))
        start += size
    assert start == len(x)
    return stats


def test_every_metric_matches_numpy() -> None:
    x32, x_hat32, lat32 = fixed_data()
    stats = ReconstructionStats(D_IN, D_SAE)
    per_token = stats.update(torch.from_numpy(x32), torch.from_numpy(x_hat32), torch.from_numpy(lat32))
    result = stats.result()
    x, x_hat, lat = x32.astype(np.float64), x_hat32.astype(np.float64), lat32.astype(np.float64)

    sq_error = ((x_hat - x) ** 2).sum(axis=1)
    nmse = ((x_hat - x) ** 2).mean(axis=1) / (x**2).mean(axis=1)
    l0 = (lat != 0).sum(axis=1)
    x_norm, x_hat_norm = np.sqrt((x**2).sum(axis=1)), np.sqrt((x_hat**2).sum(axis=1))
    cosine = (x * x_hat).sum(axis=1) / (x_norm * x_hat_norm)
    for field, expected in [
        ("sq_error", sq_error),
        ("nmse", nmse),
        ("l0", l0),
        ("cosine", cosine),
        ("norm_ratio", x_hat_norm / x_norm),
        ("x_norm", x_norm),
    ]:
        value = getattr(per_token, field)
        assert value.dtype == np.float32 and value.shape == (N,)
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=field)

    explained = 1 - sq_error.sum() / ((x - x.mean(axis=0)) ** 2).sum()
    about_zero = 1 - sq_error.sum() / (x**2).sum()
    counts = (lat != 0).sum(axis=0)
    density = counts / N
    assert result["tokens"] == N
    assert result["explained_variance"] == pytest.approx(explained, rel=1e-9)
    assert result["fvu"] == pytest.approx(1 - explained, rel=1e-9)
    # The mean of x is far from zero, so variance about zero is much larger and would flatter the SAE.
    assert about_zero > 0.98 and explained < 0.9 and result["explained_variance"] != pytest.approx(about_zero)
    assert result["mse"] == pytest.approx(sq_error.sum() / N, rel=1e-9)
    assert result["nmse"] == pytest.approx(nmse.mean(), rel=1e-9)
    assert result["l0"] == pytest.approx(l0.mean(), rel=1e-12)
    assert result["cosine"] == pytest.approx(cosine.mean(), rel=1e-9)
    assert result["norm_ratio"] == pytest.approx((x_hat_norm / x_norm).mean(), rel=1e-9)
    assert result["shrinkage"] == pytest.approx((x_hat**2).sum() / (x * x_hat).sum(), rel=1e-9)
    assert result["shrinkage"] < 1  # x_hat ~ 0.9 x
    assert result["dead"] == int((counts == 0).sum()) == 2
    assert result["dense_1pct"] == int((density > 0.01).sum())
    assert result["dense_10pct"] == int((density > 0.1).sum())
    assert 0 < result["dense_10pct"] < result["dense_1pct"] < D_SAE - result["dead"]

    assert stats.feature_counts.dtype == np.int64 and np.array_equal(stats.feature_counts, counts)
    assert stats.feature_value_sums.dtype == np.float64
    np.testing.assert_allclose(stats.feature_value_sums, lat.sum(axis=0), rtol=1e-12)
    assert stats.feature_max.dtype == np.float32 and np.array_equal(stats.feature_max, lat32.max(axis=0))


def test_result_does_not_depend_on_batching() -> None:
    x, x_hat, lat = fixed_data(seed=1)
    whole = run(x, x_hat, lat, [N])
    split = run(x, x_hat, lat, [1, 0, 53, 7, 96, 20, N - 177])
    for key, value in whole.result().items():
        assert split.result()[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert np.array_equal(whole.feature_counts, split.feature_counts)
    assert np.array_equal(whole.feature_max, split.feature_max)
    np.testing.assert_allclose(whole.feature_value_sums, split.feature_value_sums, rtol=1e-13)


def test_zero_input_tokens_are_undefined_for_relative_metrics_and_skipped() -> None:
    x, x_hat, lat = fixed_data(seed=2)
    x[5] = 0.0
    x_hat[7] = 0.0
    stats = ReconstructionStats(D_IN, D_SAE)
    per_token = stats.update(torch.from_numpy(x), torch.from_numpy(x_hat), torch.from_numpy(lat))
    for field in ("nmse", "cosine", "norm_ratio"):
        values = getattr(per_token, field)
        assert np.isnan(values[5]) and np.isfinite(np.delete(values, 5)).all()
        assert stats.result()[field] == pytest.approx(np.delete(values, 5).astype(np.float64).mean(), rel=1e-6)
    assert per_token.cosine[7] == 0.0 and per_token.norm_ratio[7] == 0.0
    assert per_token.sq_error[5] == pytest.approx((x_hat[5].astype(np.float64) ** 2).sum(), rel=1e-6)


def test_density_histogram_matches_numpy() -> None:
    _, _, lat = fixed_data()
    counts = (lat != 0).sum(axis=0).astype(np.int64)
    edges, hist = density_histogram(counts, N, bins=10)
    expected, expected_edges = np.histogram(np.log10(counts[counts > 0] / N), bins=10, range=(np.log10(1 / N), 0))
    assert np.array_equal(hist, expected)
    np.testing.assert_allclose(edges, expected_edges)
    assert hist.sum() == D_SAE - 2  # the two dead latents are not in it
    edges, hist = density_histogram(np.array([0, 1, N]), N, bins=4)
    assert edges[0] == pytest.approx(-np.log10(N)) and edges[-1] == 0.0
    assert hist.tolist() == [1, 0, 0, 1]  # the rarest possible latent in the first bin, always-on in the last


def test_density_histogram_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="tokens must be positive"):
        density_histogram(np.array([1]), 0)
    with pytest.raises(ValueError, match="counts must lie in"):
        density_histogram(np.array([5]), 4)


def test_outlier_positions_use_the_batch_median() -> None:
    norms = torch.tensor([[40.0, 1.0, 1.2, 0.9], [1.1, 3.5, 1.0, 1.3]])
    mask = outlier_positions(norms, 3.0)
    median = np.sort(norms.numpy().ravel())[3]  # lower median of 8 values
    assert torch.equal(mask, norms > 3.0 * float(median))
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert not outlier_positions(torch.empty(0), 2.0).any()
    with pytest.raises(ValueError, match="factor must be positive"):
        outlier_positions(norms, 0.0)


def random_sae(seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_IN, generator=g),
    }
    return SAE(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE), weights)


def test_evaluate_keeps_the_train_flow_keys_and_adds_the_new_ones() -> None:
    sae = random_sae(3)
    x32, _, _ = fixed_data(seed=3)
    result = evaluate(sae, [torch.from_numpy(x32[:100]), torch.from_numpy(x32[100:]).reshape(20, 7, D_IN)])
    w = {name: p.detach().numpy().astype(np.float64) for name, p in sae.named_parameters()}
    x = x32.astype(np.float64)
    latents = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)
    x_hat = latents @ w["W_dec"] + w["b_dec"]
    error = ((x_hat - x) ** 2).sum()
    assert result["tokens"] == N
    assert result["fvu"] == pytest.approx(error / ((x - x.mean(axis=0)) ** 2).sum(), rel=1e-5)
    assert result["mse"] == pytest.approx(error / N, rel=1e-5)
    assert result["l0"] == pytest.approx((latents != 0).sum() / N)
    assert result["dead"] == int((~(latents != 0).any(axis=0)).sum())
    assert result["shrinkage"] == pytest.approx((x_hat**2).sum() / (x * x_hat).sum(), rel=1e-5)
    assert {"explained_variance", "nmse", "cosine", "norm_ratio", "dense_1pct", "dense_10pct"} <= result.keys()


def test_evaluate_errors_the_user_can_fix() -> None:
    sae = random_sae(4)
    with pytest.raises(UserError, match=r"^no held-out activations to evaluate the SAE on"):
        evaluate(sae, [])
    with pytest.raises(UserError, match=r"^activations of shape \(4, 5\) given to an SAE that reads d_in=12"):
        evaluate(sae, [torch.zeros(4, 5)])


def test_update_rejects_mismatched_shapes() -> None:
    stats = ReconstructionStats(D_IN, D_SAE)
    with pytest.raises(ValueError, match="expected x and x_hat"):
        stats.update(torch.zeros(3, D_IN), torch.zeros(2, D_IN), torch.zeros(3, D_SAE))
    with pytest.raises(ValueError, match="expected x and x_hat"):
        stats.update(torch.zeros(3, D_IN), torch.zeros(3, D_IN), torch.zeros(3, D_SAE + 1))
    with pytest.raises(UserError, match=r"^no held-out activations"):
        stats.result()
