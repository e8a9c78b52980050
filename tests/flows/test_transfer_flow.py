"""`actstore transfer`: the embedded default against a slightly perturbed copy and against its randomized
control. The global mean cosine is near 1 for the perturbed copy and far lower for the control, each equal to a
direct numpy computation from the stored arrays; the SAE-transfer tables are produced for both, and their
per-feature correlations equal numpy's on latents computed from the checkpoint file."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.train import train
from actstore.flows.transfer import transfer
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.eval import EvalRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig, ModelControl
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.schemas.transfer import TransferConfig
from actstore.store.root import Store
from actstore.transforms.sae import load
from tests.helpers import cli, last_line, snapshot

SITE = "blocks.3.hook_resid_post"
CTX = 64
RUNTIME = EvalRuntime(device="cpu", progress=False, ce_batch_windows=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("transfer") / "store"
    corpus = ingest(str(root), CorpusConfig(source="pydocs", ctx_len=CTX, max_tokens=6144, holdout_fraction=0.25))
    harvests = {}
    for name, control in (
        ("base", None),
        ("perturbed", ModelControl(kind="perturb", scale=0.02, seed=1)),
        ("reinit", ModelControl(kind="reinit", seed=0)),
    ):
        config = HarvestConfig(corpus_id=corpus.id, model=ModelConfig(control=control), sites=(SITE,))
        harvests[name] = harvest(str(root), config, HarvestRuntime(progress=False, device="cpu")).id
    cfg = TrainConfig(
        architecture="topk",
        d_sae=1152,
        k=16,
        total_tokens=1024 * 12,
        batch_size=1024,
        lr=2e-3,
        warmup_steps=2,
        init_tokens=2048,
    )
    sae = train(
        str(root),
        TrainRun(harvest_id=harvests["base"], site=SITE, train=cfg, buffer_tokens=4096, eval_tokens=1024),
        progress=False,
    ).id
    return {"root": root, "corpus": corpus.id, "sae": sae, **harvests}


def direct_cosine(store: Store, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(store.activations(a, SITE)[:], dtype=np.float64)
    y = np.asarray(store.activations(b, SITE)[:], dtype=np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return cos, np.linalg.norm(x - y, axis=1)


def latents(x: np.ndarray, sae_dir: Path) -> np.ndarray:
    """The SAE's latents (its encoder is tested against numpy elsewhere; here the token choice and the
    correlation are under test)."""
    with torch.inference_mode():
        return load(sae_dir).encode(torch.from_numpy(x).float()).double().numpy()


def test_perturbed_copy_is_near_one_and_the_randomized_control_far_lower(world: dict) -> None:
    root, store = str(world["root"]), Store(world["root"])
    results = {}
    for other in ("perturbed", "reinit"):
        config = TransferConfig(
            harvest_a=world["base"], harvest_b=world[other], sae_a=world["sae"], ce_tokens=256, max_tokens=1024
        )
        manifest = transfer(root, config, RUNTIME)
        summary = store.transfer_table(manifest.id, "summary").collect().row(0, named=True)
        cos, dist = direct_cosine(store, world["base"], world[other])
        assert summary["tokens"] == len(cos)
        assert summary["cos_mean"] == pytest.approx(cos.mean(), abs=1e-5)
        assert summary["euclid_mean"] == pytest.approx(dist.mean(), rel=1e-4)
        per_position = store.transfer_table(manifest.id, "per_position").collect().sort("pos")
        pos = np.arange(len(cos)) % CTX
        np.testing.assert_allclose(
            per_position["cos_mean"].to_numpy(), [cos[pos == p].mean() for p in range(CTX)], atol=1e-5
        )
        hist = store.transfer_table(manifest.id, "histograms").collect()
        assert int(hist.filter(pl.col("measure") == "cosine")["count"].sum()) == len(cos)
        per_token = store.transfer_table(manifest.id, "per_token").collect().sort("tok")
        np.testing.assert_allclose(per_token["cosine"].to_numpy(), cos, atol=1e-5)
        saes = store.transfer_table(manifest.id, "sae_transfer").collect()
        assert sorted(saes["direction"].to_list()) == ["a_on_a", "a_on_b"]
        assert saes["explained_variance"].is_not_null().all() and saes["ce_delta"].is_not_null().all()
        results[other] = (
            summary["cos_mean"],
            saes.filter(pl.col("direction") == "a_on_b").row(0, named=True),
            manifest.id,
        )
    assert results["perturbed"][0] > 0.95, results
    assert results["reinit"][0] < 0.5 and results["reinit"][0] < results["perturbed"][0] - 0.45, results
    # the SAE carries over to the perturbed copy far better than to the randomized control
    assert results["perturbed"][1]["explained_variance"] > results["reinit"][1]["explained_variance"] + 0.3

    # per-feature activation correlation on the same holdout tokens (BOS left out), from the checkpoint file
    features = store.transfer_table(results["perturbed"][2], "feature_transfer").collect().sort("feature")
    tokens = store.tokens(world["corpus"]).filter(pl.col("split") == "holdout").head(1024).collect()
    rows = tokens.filter(pl.col("pos") > 0)["tok"].to_numpy()  # max_tokens caps the split, then BOS is left out
    fa = latents(np.asarray(store.activations(world["base"], SITE)[:])[rows], store.sae_dir(world["sae"]))
    fb = latents(np.asarray(store.activations(world["perturbed"], SITE)[:])[rows], store.sae_dir(world["sae"]))
    both = [f for f in range(fa.shape[1]) if fa[:, f].std() > 0 and fb[:, f].std() > 0][:50]
    expected = [np.corrcoef(fa[:, f], fb[:, f])[0, 1] for f in both]
    np.testing.assert_allclose(features["act_corr"].to_numpy()[both], expected, atol=2e-3)
    assert features["logit_cos"].is_not_null().all()


def test_transfer_cli_refuses_harvests_of_different_tokens(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    other_corpus = ingest(str(root), CorpusConfig(source="pydocs", ctx_len=CTX, max_tokens=2048))
    other = harvest(
        str(root), HarvestConfig(corpus_id=other_corpus.id, sites=(SITE,)), HarvestRuntime(progress=False, device="cpu")
    ).id
    before = snapshot(root)
    for args, fragment in (
        ((world["base"], other), "different tokens"),
        ((world["base"], "harvest-missing-00000000"), "harvest-missing-00000000"),
    ):
        result = cli(
            "transfer",
            "--store",
            str(root),
            "--harvest-a",
            args[0],
            "--harvest-b",
            args[1],
            "--no-progress",
            check=False,
        )
        line = last_line(result.stderr)
        assert result.returncode == 2 and line.startswith("error: ") and fragment in line, result.stderr[-2000:]
    result = cli(
        "transfer",
        "--store",
        str(root),
        "--harvest-a",
        world["base"],
        "--harvest-b",
        world["reinit"],
        "--site",
        "blocks.9.hook_resid_post",
        "--no-progress",
        check=False,
    )
    assert result.returncode == 2 and "blocks.9.hook_resid_post" in last_line(result.stderr)
    assert snapshot(root) == before
