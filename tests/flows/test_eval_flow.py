"""`actstore eval` end to end on a tiny Llama: every stored number against an independent numpy / hand-hook
computation from the stored activations, the harvest's own loss, and the SAE checkpoint file."""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from actstore.flows.eval import evaluate
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.saes import publish_sae
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.schemas.sae import SAEConfig
from actstore.store.files import TMP_MARK
from actstore.store.root import Store
from actstore.transforms.sae import SAE, save
from tests.helpers import cli, cli_popen, last_line, snapshot, write_text_corpus
from tests.tiny_models import build_tiny_model

SITE = "blocks.1.hook_resid_post"
D, D_SAE, K, CTX = 32, 96, 6, 16
RUNTIME = EvalRuntime(device="cpu", progress=False, ce_batch_windows=3)


def topk_sae(seed: int, d_in: int = D, hook: str = SITE) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=D_SAE, k=K, hook_name=hook)
    return SAE(
        cfg,
        {
            "W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in**0.5,
            "W_dec": torch.randn(D_SAE, d_in, generator=g) / d_in**0.5,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
        },
    )


def identity_sae() -> SAE:
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, a perfect reconstruction."""
    eye = torch.eye(D)
    cfg = SAEConfig(architecture="standard", d_in=D, d_sae=2 * D, hook_name=SITE)
    return SAE(
        cfg,
        {
            "W_enc": torch.cat([eye, -eye], dim=1),
            "W_dec": torch.cat([eye, -eye], dim=0),
            "b_enc": torch.zeros(2 * D),
            "b_dec": torch.zeros(D),
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("eval")
    model_dir = build_tiny_model("llama", base / "llama")
    root = base / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 40)),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=CTX,
            holdout_fraction=0.3,
            max_tokens=2400,
        ),
    )
    made = harvest(
        str(root),
        HarvestConfig(
            corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=(SITE,), loss=True, batch_windows=5
        ),
        HarvestRuntime(progress=False, device="cpu"),
    )
    saes = {
        name: publish_sae(str(root), sae, source=name).id
        for name, sae in (("topk", topk_sae(3)), ("identity", identity_sae()))
    }
    return {"base": base, "root": root, "harvest": made.id, "corpus": corpus.id, "model_dir": model_dir, **saes}


def chosen_tokens(world: dict) -> pl.DataFrame:
    """Holdout tokens of the harvest in token order, straight from the token table."""
    n = len(Store(world["root"]).activations(world["harvest"], SITE))
    return (
        Store(world["root"])
        .tokens(world["corpus"])
        .filter((pl.col("tok") < n) & (pl.col("split") == "holdout"))
        .select("tok", "pos", "seq")
        .collect()
    )


def numpy_topk(x: np.ndarray, sae_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Latents and reconstruction from the checkpoint file in float64 (SAELens TopK equations)."""
    w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae_weights.safetensors").items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    latents = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1, kind="stable")[:, :K]
    rows = np.arange(len(x))[:, None]
    latents[rows, top] = np.maximum(pre[rows, top], 0)
    return latents, latents @ w["W_dec"] + w["b_dec"]


def test_reconstruction_and_latent_numbers_equal_numpy(world: dict) -> None:
    store = Store(world["root"])
    manifest = evaluate(
        str(world["root"]),
        EvalConfig(sae_id=world["topk"], harvest_id=world["harvest"], site=SITE, ce_tokens=0),
        RUNTIME,
    )
    summary = store.eval_table(manifest.id, "summary").collect().row(0, named=True)
    tokens = chosen_tokens(world)
    counted = tokens.filter(pl.col("pos") > 0)
    x = np.asarray(store.activations(world["harvest"], SITE)[:], dtype=np.float64)[counted["tok"].to_numpy()]
    latents, x_hat = numpy_topk(x, store.sae_dir(world["topk"]))
    err = ((x - x_hat) ** 2).sum(axis=1)
    assert summary["tokens"] == len(counted) and summary["excluded_tokens"] == len(tokens) - len(counted)
    assert summary["explained_variance"] == pytest.approx(1 - err.sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)
    assert summary["explained_variance"] != pytest.approx(1 - err.sum() / (x**2).sum(), rel=1e-3)
    assert summary["mse"] == pytest.approx(err.mean(), rel=1e-4)
    assert summary["nmse"] == pytest.approx(np.mean(((x - x_hat) ** 2).mean(1) / (x**2).mean(1)), rel=1e-4)
    assert summary["l0"] == pytest.approx((latents > 0).sum(1).mean(), rel=1e-6)
    cos = (x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert summary["cosine"] == pytest.approx(cos.mean(), rel=1e-4)
    assert summary["shrinkage"] == pytest.approx((x_hat**2).sum(1).mean() / (x * x_hat).sum(1).mean(), rel=1e-4)
    counts = (latents > 0).sum(0)
    assert summary["dead"] == int((counts == 0).sum())
    assert summary["dense_1pct"] == int((counts / len(x) > 0.01).sum())
    assert summary["ce_clean"] is None
    per_feature = store.eval_table(manifest.id, "per_feature").collect().sort("feature")
    np.testing.assert_array_equal(per_feature["count"].to_numpy(), counts)
    np.testing.assert_allclose(per_feature["max_value"].to_numpy(), latents.max(0), rtol=1e-4)
    per_token = store.eval_table(manifest.id, "per_token").collect()
    assert per_token["tok"].to_list() == tokens["tok"].to_list()
    assert per_token.filter(~pl.col("excluded"))["tok"].to_list() == counted["tok"].to_list()
    np.testing.assert_allclose(per_token.filter(~pl.col("excluded"))["sq_error"].to_numpy(), err, rtol=1e-3)
    hist = store.eval_table(manifest.id, "density_histogram").collect()
    assert int(hist["n_features"].sum()) == int((counts > 0).sum())
    assert len(store.evals().filter(pl.col("eval_id") == manifest.id).collect()) == 1


def hooked_ce(model_dir: Path, ids: np.ndarray, replace: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Per-token CE with a hand-written forward hook on decoder layer 1 (the site), position 0 left alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[:, 1:] = replace(hidden[:, 1:])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits
    finally:
        handle.remove()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), torch.from_numpy(ids[:, 1:]).reshape(-1), reduction="none"
    ).reshape(len(ids), -1)
    return ce.numpy()


def test_downstream_loss_against_the_harvest_loss_and_hand_hooks(world: dict) -> None:
    store = Store(world["root"])
    manifest = evaluate(
        str(world["root"]),
        EvalConfig(sae_id=world["identity"], harvest_id=world["harvest"], site=SITE, ce_tokens=150),
        RUNTIME,
    )
    summary = manifest.extra["summary"]
    assert summary["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert summary["ce_spliced"] == pytest.approx(summary["ce_clean"], abs=1e-5)
    assert summary["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert summary["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert summary["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert summary["ce_zero"] > summary["ce_clean"] + 0.01
    per_token = store.eval_table(manifest.id, "per_token").collect().filter(pl.col("ce_clean").is_not_null())
    assert 150 <= len(per_token) < 150 + CTX
    assert summary["ce_tokens"] == len(per_token)
    assert not per_token["excluded"].any() and (per_token["pos"] < CTX - 1).all()
    loss = np.asarray(store.activations(world["harvest"], "loss")[:])
    np.testing.assert_allclose(per_token["ce_clean"].to_numpy(), loss[per_token["tok"].to_numpy()], atol=1e-4)

    # zero and mean ablation against hand-written hooks on the same windows
    tokens = store.tokens(world["corpus"]).collect()
    seqs = sorted(set((per_token["tok"] // CTX).to_list()))
    ids = np.stack([tokens.filter(pl.col("seq") == s).sort("pos")["token_id"].to_numpy() for s in seqs])
    ids = ids.astype(np.int64)
    chosen = chosen_tokens(world).filter(pl.col("pos") > 0)
    mean = np.asarray(store.activations(world["harvest"], SITE)[:], dtype=np.float64)[chosen["tok"].to_numpy()].mean(0)
    for name, replace in (
        ("zero", torch.zeros_like),
        ("mean", lambda h: torch.from_numpy(mean).float().expand_as(h).clone()),
    ):
        expected = hooked_ce(world["model_dir"], ids, replace)
        row = np.searchsorted(seqs, per_token["tok"].to_numpy() // CTX)
        col = per_token["tok"].to_numpy() % CTX
        np.testing.assert_allclose(per_token[f"ce_{name}"].to_numpy(), expected[row, col], atol=2e-4)
        assert summary[f"ce_{name}"] == pytest.approx(float(expected[row, col].mean()), abs=1e-4)


def test_outlier_exclusion_is_recorded(world: dict) -> None:
    manifest = evaluate(
        str(world["root"]),
        EvalConfig(
            sae_id=world["topk"],
            harvest_id=world["harvest"],
            site=SITE,
            ce_tokens=0,
            exclude_bos=False,
            outlier_factor=1.05,
        ),
        RUNTIME,
    )
    threshold = manifest.extra["outlier_norm_threshold"]
    per_token = Store(world["root"]).eval_table(manifest.id, "per_token").collect()
    np.testing.assert_array_equal(per_token["excluded"].to_numpy(), per_token["x_norm"].to_numpy() > threshold)
    assert manifest.config["outlier_factor"] == 1.05
    assert manifest.counts["excluded_tokens"] == per_token["excluded"].sum()


def test_rerun_returns_the_published_eval_and_a_kill_leaves_nothing_readable(world: dict) -> None:
    root = world["root"]
    args = (
        "eval",
        "--store",
        str(root),
        "--sae",
        world["topk"],
        "--harvest",
        world["harvest"],
        "--ce-tokens",
        "300",
        "--device",
        "cpu",
        "--no-progress",
        "--json",
    )
    proc = cli_popen(*args)
    deadline = time.time() + 120
    evals = root / "evals"
    while time.time() < deadline and not any(TMP_MARK in p.name for p in evals.glob("*")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    published = Store(root).evals().filter(pl.col("sae_id") == world["topk"]).filter(pl.col("ce_tokens") > 0).collect()
    assert len(published) in (0, 1)  # never a half-written result
    first = cli(*args)
    second = cli(*args)
    assert last_line(first.stdout) == last_line(second.stdout)
    assert not [p for p in evals.glob("*") if TMP_MARK in p.name]


def test_bad_input_is_one_line_and_changes_nothing(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    wrong = tmp_path / "sae-d16"
    save(topk_sae(5, d_in=16), wrong)
    other_hook = tmp_path / "sae-other-hook"
    save(topk_sae(6, hook="blocks.0.hook_resid_post"), other_hook)
    before = snapshot(root)
    cases = [
        (("--sae", "sae-missing-00000000", "--harvest", world["harvest"]), "sae-missing-00000000"),
        (("--sae", world["topk"], "--harvest", "harvest-missing-00000000"), "harvest-missing-00000000"),
        (("--sae", str(wrong), "--harvest", world["harvest"], "--site", SITE), "d_in"),
        (("--sae", str(other_hook), "--harvest", world["harvest"], "--site", SITE), "--allow-mismatch"),
        (
            ("--sae", world["topk"], "--harvest", world["harvest"], "--site", "blocks.9.hook_resid_post"),
            "blocks.9.hook_resid_post",
        ),
    ]
    for args, fragment in cases:
        result = cli("eval", "--store", str(root), *args, "--device", "cpu", "--no-progress", check=False)
        line = last_line(result.stderr)
        assert result.returncode == 2 and line.startswith("error: ") and fragment in line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert snapshot(root) == before, args
