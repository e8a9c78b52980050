"""Synthetic activation sets: the stored rows have the stated distribution (checked with numpy against the stored
ground truth and the config), the corpus follows the real corpora's rules, a resumed write gives identical bytes,
and train and encode run on a synthetic harvest unchanged."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from actstore.flows.encode import encode
from actstore.flows.synthetic import GROUND_TRUTH, synthetic
from actstore.flows.train import train
from actstore.schemas.encode import EncodeRuntime
from actstore.schemas.errors import UserError
from actstore.schemas.sites import parse_site
from actstore.schemas.synthetic import SYNTHETIC_SITE, SyntheticConfig
from actstore.schemas.tables import TOKEN_SCHEMA
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.store.activations import array_path
from actstore.store.root import Store
from actstore.store.shards import ShardReader
from actstore.transforms.sae import load

MIXTURE = SyntheticConfig(
    kind="gaussian_mixture",
    n_tokens=32768,
    d=8,
    components=4,
    spread=6.0,
    scale=1.0,
    anisotropy=4.0,
    ctx_len=64,
    chunk_tokens=4096,
    seed=5,
    holdout_fraction=0.25,
)


def log_likelihoods(x: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """`[rows, components]` Gaussian log densities (diagonal covariances), up to a shared constant."""
    z = (x[:, None, :] - means[None]) / stds[None]
    return -0.5 * (z**2).sum(-1) - np.log(stds).sum(-1)[None]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "store"


@pytest.fixture(scope="module")
def mixture(root: Path) -> str:
    return synthetic(str(root), MIXTURE, progress=False).id


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"d": 0}, "d must be positive, got 0: pass --d 1"),
        ({"d": -3}, "synthetic d must be positive"),
        ({"components": 0}, "components must be >= 1"),
        ({"n_tokens": 0}, "n_tokens must be positive"),
        ({"n_tokens": 1000}, "pass --tokens 896 or 1024"),
        ({"n_tokens": 100}, "pass --tokens 128$"),
        ({"chunk_tokens": 100}, "chunk_tokens 100 is not a whole number"),
        ({"scale": 0.0}, "scale must be > 0"),
        ({"spread": -1.0}, "spread must be >= 0"),
        ({"anisotropy": 0.5}, "anisotropy must be >= 1"),
        ({"holdout_fraction": 1.5}, "pass --holdout in"),
    ],
)
def test_bad_config_is_a_one_line_user_error(fields: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle) as info:
        SyntheticConfig(**{"n_tokens": 1024, "d": 4, **fields})
    assert "\n" not in str(info.value)


def test_ids_name_the_kind_and_hash_only_what_shapes_the_data() -> None:
    config = SyntheticConfig(n_tokens=1024, d=16)
    assert config.harvest_id().startswith("harvest-synthetic-gmm-d16-")
    assert config.model_copy(update={"seed": 1}).harvest_id() != config.harvest_id()
    cube = SyntheticConfig(kind="uniform_cube", n_tokens=1024, d=16)
    assert cube.harvest_id().startswith("harvest-synthetic-cube-d16-")
    assert cube.model_copy(update={"components": 3, "spread": 1.0}).harvest_id() == cube.harvest_id()
    # one layout, one corpus: sets of the same shape share their tokens (and can be read side by side)
    assert cube.corpus_id() == config.corpus_id() != config.model_copy(update={"ctx_len": 64}).corpus_id()
    assert parse_site(SYNTHETIC_SITE).layer is None
    assert config.identity()["model"]["name"] == "synthetic:gaussian_mixture"


# --- distribution -----------------------------------------------------------------------------------------------


def test_mixture_rows_have_the_stated_distribution(root: Path, mixture: str) -> None:
    store = Store(root)
    x = store.activations(mixture, SYNTHETIC_SITE)[:]
    assert x.dtype == np.float32 and x.shape == (MIXTURE.n_tokens, MIXTURE.d)
    with np.load(store.harvest_dir(mixture) / GROUND_TRUTH, allow_pickle=False) as truth:
        weights, means, stds = truth["weights"], truth["means"].astype(np.float64), truth["stds"].astype(np.float64)
    k, d = MIXTURE.components, MIXTURE.d
    assert means.shape == stds.shape == (k, d) and np.allclose(weights, 1 / k)
    # the parameters follow the config: stds log-uniform within the anisotropy band, means spread ~ N(0, 6^2)
    band = np.sqrt(MIXTURE.anisotropy)
    assert stds.min() >= MIXTURE.scale / band - 1e-6 and stds.max() <= MIXTURE.scale * band + 1e-6
    assert 0.6 < means.std() / MIXTURE.spread < 1.4
    # components are far apart against their widths, so the most likely component is the true one
    label = log_likelihoods(x.astype(np.float64), means, stds).argmax(1)
    counts = np.bincount(label, minlength=k)
    n = len(x)
    assert np.all(np.abs(counts / n - 1 / k) < 5 * np.sqrt((1 / k) * (1 - 1 / k) / n))
    for c in range(k):
        rows = x[label == c].astype(np.float64)
        assert np.all(np.abs(rows.mean(0) - means[c]) < 5 * stds[c] / np.sqrt(len(rows)))
        cov = np.cov(rows, rowvar=False)
        # sample variance of n normals has relative std sqrt(2 / n); off-diagonal covariances are 0
        assert np.all(np.abs(np.diag(cov) / stds[c] ** 2 - 1) < 5 * np.sqrt(2 / len(rows)))
        off = cov / np.outer(stds[c], stds[c]) - np.eye(d)
        assert np.abs(off).max() < 5 / np.sqrt(len(rows))


def test_cube_rows_are_uniform_in_the_cube(root: Path) -> None:
    config = SyntheticConfig(kind="uniform_cube", n_tokens=16384, d=6, scale=2.5, ctx_len=32, chunk_tokens=2048)
    manifest = synthetic(str(root), config, progress=False)
    assert manifest.extra["synthetic"] == {"kind": "uniform_cube", "bounds": [-2.5, 2.5]}
    assert not (Store(root).harvest_dir(manifest.id) / GROUND_TRUTH).exists()
    x = Store(root).activations(manifest.id, SYNTHETIC_SITE)[:].astype(np.float64)
    n = len(x)
    assert x.min() >= -2.5 and x.max() <= 2.5 and x.min() < -2.49 and x.max() > 2.49
    assert np.all(np.abs(x.mean(0)) < 5 * (2.5 / np.sqrt(3)) / np.sqrt(n))
    cov = np.cov(x, rowvar=False)
    assert np.all(np.abs(np.diag(cov) / (2.5**2 / 3) - 1) < 0.05)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 5 * (2.5**2 / 3) / np.sqrt(n)
    # Kolmogorov-Smirnov against U(-2.5, 2.5), per coordinate, at the 0.1% level
    for column in x.T:
        ecdf = np.arange(1, n + 1) / n
        assert np.abs(ecdf - (np.sort(column) + 2.5) / 5).max() < 1.95 / np.sqrt(n)


# --- corpus and harvest layout ----------------------------------------------------------------------------------


def test_corpus_and_manifest_are_shaped_like_real_ones(root: Path, mixture: str) -> None:
    store = Store(root)
    harvest = store.manifest("harvest", mixture)
    corpus_id = harvest.extra["corpus_id"]
    corpus = store.manifest("corpus", corpus_id)
    assert harvest.config["model"]["name"] == "synthetic:gaussian_mixture" and harvest.extra["ctx_len"] == 64
    assert harvest.extra["arrays"] == {SYNTHETIC_SITE: {"d": 8, "dtype": "float32", "module": SYNTHETIC_SITE}}
    assert harvest.counts["n_chunks"] == 8 and harvest.counts["chunk_tokens"] == 4096
    assert corpus.extra["ctx_len"] == 64 and corpus.counts["n_tokens"] == MIXTURE.n_tokens
    assert corpus.counts["n_seqs"] == corpus.counts["n_docs"] == MIXTURE.n_tokens // 64
    parts = sorted(store.corpus_dir(corpus_id).glob("part-*.parquet"))
    assert parts and all(pq.read_schema(p).remove_metadata() == TOKEN_SCHEMA for p in parts)
    tokens = store.tokens(corpus_id).collect()
    assert tokens["tok"].to_list() == list(range(MIXTURE.n_tokens))
    assert (tokens["doc"] == tokens["seq"]).all() and (tokens["token_id"] == 0).all()
    assert (tokens["pos"] == tokens["tok"] % 64).all()
    # the split of window s is the text-hash rule applied to its text, the same for every token of the window
    windows = tokens.group_by("seq").agg(pl.col("split").cast(pl.String).unique()).sort("seq")
    expected = [
        "holdout"
        if int(hashlib.sha256(f"synthetic-window-{s}".encode()).hexdigest()[:8], 16) / 2**32 < 0.25
        else "train"
        for s in range(MIXTURE.n_seqs)
    ]
    assert windows["split"].to_list() == [[s] for s in expected]
    assert 0.1 < corpus.counts["tokens_by_split.holdout"] / MIXTURE.n_tokens < 0.4
    # a shard reader takes the train split only
    reader = ShardReader(store, [(mixture, SYNTHETIC_SITE)], batch_size=1024, split="train")
    assert reader.n_rows == corpus.counts["tokens_by_split.train"]
    assert sum(len(b) for b in reader) == reader.n_rows


def test_resume_after_losing_chunks_gives_identical_bytes(tmp_path: Path) -> None:
    config = SyntheticConfig(n_tokens=4096, d=5, components=3, ctx_len=32, chunk_tokens=512, seed=9)

    def chunk_bytes(store_root: Path, harvest_id: str) -> dict[str, bytes]:
        directory = array_path(Store(store_root).harvest_dir(harvest_id), SYNTHETIC_SITE)
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    reference = synthetic(str(tmp_path / "reference"), config, progress=False)
    expected = chunk_bytes(tmp_path / "reference", reference.id)
    assert len([k for k in expected if k.startswith("c/")]) == 8

    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    directory = Store(tmp_path / "resumed").harvest_dir(reference.id)
    (directory / "manifest.json").unlink()
    (directory / GROUND_TRUTH).unlink()
    for chunk in (2, 7):  # lost: marker and data gone
        (directory / "_progress" / f"chunk-{chunk:08d}.done").unlink()
        (array_path(directory, SYNTHETIC_SITE) / "c" / str(chunk) / "0").unlink()
    (directory / "_progress" / "chunk-00000004.done").unlink()  # torn: data garbled, never marked done
    (array_path(directory, SYNTHETIC_SITE) / "c" / "4" / "0").write_bytes(b"\0" * 100)
    resumed = synthetic(str(tmp_path / "resumed"), config, progress=False)
    assert resumed.id == reference.id and resumed.timings["tokens_this_run"] == 3 * 512
    assert chunk_bytes(tmp_path / "resumed", resumed.id) == expected
    with (
        np.load(directory / GROUND_TRUTH) as a,
        np.load(Store(tmp_path / "reference").harvest_dir(reference.id) / GROUND_TRUTH) as b,
    ):
        assert all(np.array_equal(a[k], b[k]) for k in ("weights", "means", "stds"))
    # a finished set is returned as it is
    assert synthetic(str(tmp_path / "resumed"), config, progress=False) == resumed


# --- train and encode -------------------------------------------------------------------------------------------


def test_train_and_encode_run_on_a_synthetic_harvest(root: Path, mixture: str) -> None:
    store = Store(root)
    train_cfg = TrainConfig(
        architecture="topk",
        d_sae=16,
        k=1,
        total_tokens=256 * 60,
        batch_size=256,
        lr=1e-2,
        warmup_steps=5,
        init_tokens=2048,
        seed=1,
    )
    run = TrainRun(
        harvest_id=mixture,
        site=SYNTHETIC_SITE,
        train=train_cfg,
        buffer_tokens=4096,
        drop_bos=False,
        checkpoint_every=100,
        eval_tokens=4096,
    )
    sae = train(str(root), run, progress=False)
    directory = store.sae_dir(sae.id)
    # the components' means carry ~97% of the variance (spread 6 against scale 1): one latent a token finds them
    assert sae.extra["eval_holdout"]["fvu"] < 0.2
    assert load(directory).model_name == "synthetic:gaussian_mixture"

    features = encode(str(root), sae.id, mixture, runtime=EncodeRuntime(device="cpu", progress=False))
    assert features.extra["site"] == SYNTHETIC_SITE and features.counts["n_tokens"] == MIXTURE.n_tokens
    by_token = pl.read_parquet(store.features_dir(sae.id, mixture) / "by_token" / "*.parquet").sort("tok")
    # independent TopK(k=1) in numpy from the checkpoint file
    w = load_file(directory / "sae_weights.safetensors")
    factor = json.loads((directory / "activation_scaler.json").read_text())["scaling_factor"]
    x = store.activations(mixture, SYNTHETIC_SITE)[:].astype(np.float64) * factor
    pre = (x - w["b_dec"]) @ w["W_enc"].astype(np.float64) + w["b_enc"]
    top = pre.argmax(1)
    value = pre[np.arange(len(x)), top]
    fired = value > 0
    assert by_token["tok"].to_list() == np.flatnonzero(fired).tolist()
    agree = (by_token["feature"].to_numpy() == top[fired]).mean()
    assert agree > 0.999  # float32 vs float64 may swap a near tie
    # each latent's tokens come from one component: the SAE recovered the mixture
    with np.load(store.harvest_dir(mixture) / GROUND_TRUTH) as truth:
        label = log_likelihoods(x / factor, truth["means"].astype(np.float64), truth["stds"].astype(np.float64))
    component = label.argmax(1)[by_token["tok"].to_numpy()]
    latent = by_token["feature"].to_numpy()
    purity = sum(np.bincount(component[latent == f]).max() for f in np.unique(latent)) / len(latent)
    assert purity > 0.95

    # the query command reads a synthetic feature store without a tokenizer
    from tests.helpers import cli

    feature = int(np.bincount(latent).argmax())
    result = cli("query", "--store", str(root), "--sae", sae.id, "--harvest", mixture, "--json", "top", str(feature))
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    expected = pre[latent_rows := np.flatnonzero(top == feature), feature].max()
    assert rows and rows[0]["context_text"].count("«") == 1 and len(latent_rows) > 0
    assert rows[0]["value"] == pytest.approx(expected, rel=2e-2)
