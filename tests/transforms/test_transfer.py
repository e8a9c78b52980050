"""Transfer statistics between two models, checked against numpy formulas written out independently."""

import numpy as np
import pytest
import torch

import actstore.transforms.transfer as transfer_module
from actstore.schemas.errors import UserError
from actstore.transforms.transfer import (
    FeatureCorrelation,
    PairStats,
    log_density_correlation,
    logit_weight_similarity,
)
from tests.transforms.test_models import assert_one_line_user_error

CTX = 8


def pair(n: int = 400, d: int = 16, seed: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Token ids and two correlated activation matrices (B = A + noise), float32."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=(n, 1))
    b = a + rng.normal(scale=0.7, size=(n, d))
    tok = rng.permutation(n * 3)[:n].astype(np.int64)
    return tok, torch.from_numpy(a).float(), torch.from_numpy(b).float()


def numpy_cos_euclid(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a64, b64 = a.double().numpy(), b.double().numpy()
    cos = np.einsum("nd,nd->n", a64, b64) / (np.sqrt((a64**2).sum(1)) * np.sqrt((b64**2).sum(1)))
    return cos, np.sqrt(((a64 - b64) ** 2).sum(1))


def test_pair_stats_match_numpy() -> None:
    tok, a, b = pair()
    stats = PairStats(CTX, dist_max=3.0, dist_bins=30)
    cos, euclid = stats.update(tok, a, b)
    want_cos, want_euclid = numpy_cos_euclid(a, b)
    np.testing.assert_allclose(cos, want_cos, rtol=1e-12)
    np.testing.assert_allclose(euclid, want_euclid, rtol=1e-12)

    result = stats.result()
    assert result["tokens"] == result["cos_tokens"] == len(tok)
    np.testing.assert_allclose(result["cos_mean"], want_cos.mean(), rtol=1e-12)
    np.testing.assert_allclose(result["cos_std"], want_cos.std(), rtol=1e-10)
    np.testing.assert_allclose(result["euclid_mean"], want_euclid.mean(), rtol=1e-12)
    np.testing.assert_allclose(result["euclid_std"], want_euclid.std(), rtol=1e-10)
    np.testing.assert_allclose(result["norm_a_mean"], np.linalg.norm(a.double().numpy(), axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(result["norm_b_mean"], np.linalg.norm(b.double().numpy(), axis=1).mean(), rtol=1e-12)

    table = stats.per_position()
    positions = tok % CTX
    assert table["pos"].to_list() == sorted(set(positions.tolist()))
    for row in table.iter_rows(named=True):
        at = positions == row["pos"]
        assert row["n"] == at.sum()
        np.testing.assert_allclose(row["cos_mean"], want_cos[at].mean(), rtol=1e-12)
        np.testing.assert_allclose(row["euclid_mean"], want_euclid[at].mean(), rtol=1e-12)

    hist = stats.histograms()
    cos_counts, cos_edges = np.histogram(want_cos, bins=200, range=(-1, 1))
    np.testing.assert_array_equal(hist.cosine.counts, cos_counts)
    np.testing.assert_allclose(hist.cosine.edges, cos_edges)
    dist_counts, dist_edges = np.histogram(want_euclid[want_euclid <= 3], bins=30, range=(0, 3))
    np.testing.assert_array_equal(hist.euclid.counts, dist_counts)
    np.testing.assert_allclose(hist.euclid.edges, dist_edges)
    assert hist.euclid.overflow == (want_euclid > 3).sum() > 0


def test_default_distance_bins_are_log_spaced_from_zero() -> None:
    tok, a, b = pair()
    stats = PairStats(CTX, dist_bins=91)
    _, euclid = stats.update(tok, a * 1e3, b * 1e3)  # distances in the thousands
    stats.update(tok, a, a)  # and exact zeros
    hist = stats.histograms().euclid
    edges = np.array([0.0, *(10.0 ** (np.arange(91) / 10 - 4))])  # 1e-4 .. 1e5, 10 bins a decade
    np.testing.assert_allclose(hist.edges, edges, rtol=1e-12)
    assert hist.counts[0] == len(tok) and hist.overflow == 0
    np.testing.assert_array_equal(hist.counts[1:], np.histogram(euclid, edges[1:])[0])


def test_pair_stats_do_not_depend_on_batching() -> None:
    tok, a, b = pair(n=600)
    whole = PairStats(CTX)
    whole.update(tok, a, b)
    batched = PairStats(CTX)
    order = np.random.default_rng(1).permutation(len(tok))
    for rows in np.array_split(order, [1, 2, 50, 51, 300]):
        batched.update(tok[rows], a[rows], b[rows])
    for key, value in whole.result().items():
        np.testing.assert_allclose(batched.result()[key], value, rtol=1e-12)
    for left, right in zip(whole.histograms(), batched.histograms(), strict=True):
        np.testing.assert_array_equal(left.counts, right.counts)
        assert left.overflow == right.overflow
    assert whole.per_position().select("pos", "n").equals(batched.per_position().select("pos", "n"))
    np.testing.assert_allclose(whole.per_position()["cos_mean"], batched.per_position()["cos_mean"], rtol=1e-12)


def test_identical_pair_gives_cosine_one_and_distance_zero() -> None:
    tok, a, _ = pair()
    stats = PairStats(CTX)
    cos, euclid = stats.update(tok, a, a.clone())
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    assert (euclid == 0).all()
    result = stats.result()
    assert abs(result["cos_mean"] - 1) < 1e-12 and result["cos_std"] < 1e-7
    assert result["euclid_mean"] == 0 and result["euclid_std"] == 0
    hist = stats.histograms()
    assert hist.cosine.counts[-1] == len(tok) and hist.euclid.counts[0] == len(tok)


def test_random_pair_is_near_orthogonal_in_high_dimension() -> None:
    d = 4096
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, d, generator=g), torch.randn(300, d, generator=g)
    stats = PairStats(CTX)
    stats.update(np.arange(300), a, b)
    result = stats.result()
    # Two independent Gaussian vectors: cosine has mean 0 and standard deviation 1/sqrt(d); distance ~ sqrt(2d).
    assert abs(result["cos_mean"]) < 4 / np.sqrt(d * 300)
    assert abs(result["cos_std"] * np.sqrt(d) - 1) < 0.15
    assert abs(result["euclid_mean"] / np.sqrt(2 * d) - 1) < 0.01


def test_zero_vectors_have_no_cosine_but_count_for_distance() -> None:
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 4.0]])
    stats = PairStats(4)
    cos, euclid = stats.update(np.array([0, 1, 2]), a, b)
    assert np.isnan(cos[0]) and cos[1] == 0 and cos[2] == pytest.approx(1)
    np.testing.assert_allclose(euclid, [np.sqrt(2), np.sqrt(5), 0])
    result = stats.result()
    assert result["tokens"] == 3 and result["cos_tokens"] == 2 and result["cos_mean"] == pytest.approx(0.5)
    assert stats.histograms().cosine.counts.sum() == 2
    assert np.isnan(stats.per_position()["cos_mean"][0])


def test_pair_stats_user_errors() -> None:
    stats = PairStats(CTX)
    with pytest.raises(UserError) as err:
        stats.result()
    assert_one_line_user_error(err, "no tokens were compared", "same corpus")
    with pytest.raises(UserError) as err:
        stats.update(np.arange(3), torch.zeros(3, 4), torch.zeros(3, 5))
    assert_one_line_user_error(err, "[3, 4]", "[3, 5]", "same width")
    with pytest.raises(UserError) as err:
        PairStats(CTX, dist_max=0.0)
    assert_one_line_user_error(err, "dist_max=0.0", "positive")


def sparse_latents(n: int, d_sae: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU latents of one SAE on two models: B's pre-activations are A's plus noise; feature 0 is dead on A,
    feature 1 is constant (dead) on B, feature 2 is dead on both."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, d_sae, generator=g, dtype=torch.float64) - 0.8
    fa = pre.relu()
    fb = (pre + 0.5 * torch.randn(n, d_sae, generator=g, dtype=torch.float64)).relu()
    fa[:, 0] = 0
    fb[:, 1] = 0
    fa[:, 2] = fb[:, 2] = 0
    return fa.float(), fb.float()


def test_feature_correlation_matches_corrcoef() -> None:
    fa, fb = sparse_latents(500, 12, seed=0)
    corr = FeatureCorrelation(12)
    corr.update(fa, fb)
    result = corr.result()
    a, b = fa.double().numpy(), fb.double().numpy()
    assert result.tokens == 500
    np.testing.assert_array_equal(result.count_a, np.count_nonzero(a, axis=0))
    np.testing.assert_array_equal(result.count_b, np.count_nonzero(b, axis=0))
    assert np.isnan(result.r[:3]).all()
    want = [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(3, 12)]
    np.testing.assert_allclose(result.r[3:], want, rtol=1e-10)
    assert (result.r[3:] > 0.5).all()


def test_feature_correlation_does_not_depend_on_batching_or_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    fa, fb = sparse_latents(300, 10, seed=1)
    whole = FeatureCorrelation(10)
    whole.update(fa, fb)
    monkeypatch.setattr(transfer_module, "CHUNK_ELEMENTS", 70)  # 7 rows a chunk
    batched = FeatureCorrelation(10)
    for rows in torch.tensor_split(torch.arange(300), [1, 33, 34, 200]):
        batched.update(fa[rows], fb[rows])
    left, right = whole.result(), batched.result()
    np.testing.assert_allclose(right.r, left.r, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(right.count_a, left.count_a)
    np.testing.assert_array_equal(right.count_b, left.count_b)


def test_constant_nonzero_latent_has_no_correlation() -> None:
    fa = torch.tensor([[2.5, 1.0], [2.5, 2.0], [2.5, 0.0]])
    fb = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    corr = FeatureCorrelation(2)
    corr.update(fa, fb)
    result = corr.result()
    assert np.isnan(result.r[0]) and result.r[1] == pytest.approx(1.0)


def test_feature_correlation_user_errors() -> None:
    corr = FeatureCorrelation(4)
    with pytest.raises(UserError) as err:
        corr.result()
    assert_one_line_user_error(err, "no latents were compared")
    with pytest.raises(UserError) as err:
        corr.update(torch.zeros(3, 4), torch.zeros(3, 5))
    assert_one_line_user_error(err, "[3, 4]", "[3, 5]", "[N, 4]", "same SAE")


def test_log_density_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    counts_a = rng.integers(0, 1000, size=200)
    counts_b = np.maximum(counts_a + rng.integers(-200, 200, size=200), 0)
    counts_a[:5] = 0
    counts_b[3:8] = 0
    alive = (counts_a > 0) & (counts_b > 0)
    want = np.corrcoef(np.log10(counts_a[alive] / 5000), np.log10(counts_b[alive] / 7000))[0, 1]
    assert log_density_correlation(counts_a, counts_b, 5000, 7000) == pytest.approx(want, rel=1e-12)
    assert log_density_correlation(torch.from_numpy(counts_a), torch.from_numpy(counts_b), 5000, 7000) == pytest.approx(
        want, rel=1e-12
    )
    # Scaling one side's token total shifts every log density equally: the correlation is unchanged.
    assert log_density_correlation(counts_a, counts_b, 5000, 1) == pytest.approx(want, rel=1e-12)
    assert np.isnan(log_density_correlation(np.array([0, 4, 0]), np.array([3, 4, 0]), 10, 10))
    assert np.isnan(log_density_correlation(np.array([4, 4]), np.array([1, 3]), 10, 10))


def test_log_density_correlation_user_errors() -> None:
    with pytest.raises(UserError) as err:
        log_density_correlation(np.ones(3), np.ones(4), 10, 10)
    assert_one_line_user_error(err, "[3]", "[4]", "one count per latent")
    with pytest.raises(UserError) as err:
        log_density_correlation(np.ones(3), np.ones(3), 0, 10)
    assert_one_line_user_error(err, "A: 0", "positive")


def test_logit_weight_similarity_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(9, 6, generator=g)
    w_dec[4] = 0
    w_u_a = torch.randn(6, 30, generator=g)
    w_u_b = w_u_a + 0.5 * torch.randn(6, 30, generator=g)
    got = logit_weight_similarity(w_dec, w_u_a, w_u_b, batch=4)
    la, lb = w_dec.double().numpy() @ w_u_a.double().numpy(), w_dec.double().numpy() @ w_u_b.double().numpy()
    with np.errstate(invalid="ignore"):
        want = (la * lb).sum(1) / (np.linalg.norm(la, axis=1) * np.linalg.norm(lb, axis=1))
    assert got.shape == (9,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, equal_nan=True)
    assert got[4].isnan() and (got.nan_to_num(0) > 0.3).sum() == 8
    same = logit_weight_similarity(w_dec, w_u_a, w_u_a.clone())
    np.testing.assert_allclose(same[~same.isnan()].numpy(), 1.0, atol=1e-6)

    appended = torch.cat([w_u_b, torch.randn(6, 3, generator=g)], dim=1)  # a fine-tune that added 3 tokens
    np.testing.assert_allclose(
        logit_weight_similarity(w_dec, w_u_a, appended, vocab=30).numpy(), want, rtol=1e-5, equal_nan=True
    )


def test_logit_weight_similarity_user_errors() -> None:
    w_dec, w_u = torch.zeros(2, 4), torch.zeros(4, 10)
    with pytest.raises(UserError) as err:
        logit_weight_similarity(w_dec, w_u, torch.zeros(4, 12))
    assert_one_line_user_error(err, "[4, 10]", "[4, 12]", "vocab=")
    with pytest.raises(UserError) as err:
        logit_weight_similarity(w_dec, w_u, torch.zeros(4, 12), vocab=11)
    assert_one_line_user_error(err, "vocab=11", "10 and 12")
    with pytest.raises(UserError) as err:
        logit_weight_similarity(torch.zeros(2, 5), w_u, w_u)
    assert_one_line_user_error(err, "width 5", "expects 4")
