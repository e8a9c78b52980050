"""Encode: stored triples equal an independent numpy encoding of the stored activations; kill-and-resume is
bit-identical; bad SAEs and missing inputs end in one line and leave the store unchanged."""

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from actstore.flows.encode import encode
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.encode import EncodeRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.schemas.sae import SAEConfig
from actstore.store.root import Store
from actstore.transforms.sae import SAE, save
from tests.helpers import cli, cli_popen, last_line, snapshot, write_text_corpus
from tests.tiny_models import build_tiny_model

SITE = "blocks.1.hook_resid_post"
D_SAE, K = 96, 6


def random_topk_sae(d_in: int, seed: int, hook: str | None = SITE, model: str | None = None) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=D_SAE, k=K, hook_name=hook, model_name=model)
    weights = {
        "W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in**0.5,
        "W_dec": torch.randn(D_SAE, d_in, generator=g) / d_in**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    return SAE(cfg, weights)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("encode")
    model_dir = build_tiny_model("llama", base / "llama")
    root = base / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 30)),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=16,
            max_tokens=1600,
        ),
    )
    config = HarvestConfig(
        corpus_id=corpus.id,
        model=ModelConfig(name=str(model_dir)),
        sites=(SITE, "blocks.0.hook_mlp_out"),
        batch_windows=4,
    )
    manifest = harvest(str(root), config, HarvestRuntime(progress=False, device="cpu"))
    sae_dir = base / "sae"
    save(random_topk_sae(32, seed=3, model=str(model_dir)), sae_dir)
    return {"base": base, "root": root, "harvest": manifest.id, "sae_dir": sae_dir, "corpus": corpus.id}


def numpy_topk_triples(x: np.ndarray, sae_dir: Path) -> pl.DataFrame:
    """SAELens TopK equations in float64 numpy, from the checkpoint file (not through our SAE class)."""
    from safetensors.numpy import load_file

    w = load_file(sae_dir / "sae_weights.safetensors")
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"].astype(np.float64) + w["b_enc"]
    top = np.argsort(-pre, axis=1, kind="stable")[:, :K]
    rows = np.repeat(np.arange(len(x)), K)
    feats = top.ravel()
    vals = np.maximum(pre[rows, feats], 0)
    keep = vals > 0
    return pl.DataFrame(
        {
            "feature": feats[keep].astype(np.int32),
            "tok": rows[keep].astype(np.int64),
            "value": vals[keep].astype(np.float16).astype(np.float32),
        }
    )


def test_encoded_triples_equal_independent_numpy(world: dict) -> None:
    manifest = encode(
        str(world["root"]), str(world["sae_dir"]), world["harvest"], runtime=EncodeRuntime(device="cpu", progress=False)
    )
    sae_id, harvest_id = manifest.id.split("/")
    assert manifest.extra["site"] == SITE  # chosen from the SAE's recorded hook
    store = Store(world["root"])
    x = store.activations(harvest_id, SITE)[:]
    expected = numpy_topk_triples(x, world["sae_dir"]).sort("feature", "tok")
    directory = store.features_dir(sae_id, harvest_id)
    by_feature = pl.read_parquet(directory / "by_feature" / "*.parquet")
    by_token = pl.read_parquet(directory / "by_token" / "*.parquet")
    got = by_feature.with_columns(pl.col("value").cast(pl.Float32)).sort("feature", "tok")
    assert got["feature"].to_list() == expected["feature"].to_list()
    assert got["tok"].to_list() == expected["tok"].to_list()
    assert np.allclose(got["value"].to_numpy(), expected["value"].to_numpy(), rtol=2e-3, atol=1e-3)
    assert by_feature["value"].dtype == pl.Float16 and manifest.counts["nnz"] == len(expected)
    # by_feature sorted by (feature, value desc); by_token by (tok, feature); both hold the same triples
    assert by_feature.equals(by_feature.sort(["feature", "value", "tok"], descending=[False, True, False]))
    assert by_token.equals(by_token.sort("tok", "feature"))
    assert by_token.sort("feature", "tok").equals(by_feature.sort("feature", "tok"))
    # the query API sees the same data
    hottest = int(expected.group_by("feature").len().sort("len", "feature", descending=[True, False])["feature"][0])
    top = store.features(sae_id, harvest_id).top_examples(hottest, k=5, context=2).collect()
    assert top["tok"].to_list() == (by_feature.filter(pl.col("feature") == hottest)["tok"].head(5).to_list())
    # re-running is a no-op with the same manifest
    again = encode(str(world["root"]), sae_id, harvest_id, runtime=EncodeRuntime(device="cpu", progress=False))
    assert again == manifest


def test_kill_and_resume_encode_is_bit_identical(world: dict) -> None:
    base = world["base"]
    reference_root = world["root"]
    # a reference encode of a second SAE, then the same encode in a copy of the store that gets SIGKILLed
    sae_dir = base / "sae-kill"
    save(random_topk_sae(32, seed=4), sae_dir)
    args = [
        "encode",
        "--sae",
        str(sae_dir),
        "--harvest",
        world["harvest"],
        "--site",
        SITE,
        "--no-progress",
        "--batch-tokens",
        "16",
        "--json",
    ]
    ref = json.loads(cli("encode", "--store", str(reference_root), *args[1:]).stdout.splitlines()[-1])
    reference_dir = Path(ref["path"])
    root = base / "killed"
    (root / "corpora").mkdir(parents=True)
    (root / "corpora" / world["corpus"]).symlink_to(reference_root / "corpora" / world["corpus"])
    (root / "activations").mkdir()
    (root / "activations" / world["harvest"]).symlink_to(reference_root / "activations" / world["harvest"])
    rng = random.Random(7)
    spill = root / "features"
    kills = 0
    for target in [None, *sorted(rng.sample(range(1, 20), 3))]:
        proc = cli_popen("encode", "--store", str(root), *args[1:])
        deadline = time.monotonic() + 120
        if target is None:
            time.sleep(rng.uniform(0.5, 3.0))  # during start-up or the SAE import
        else:
            while (
                len(list(spill.glob("*/*/_spill/chunk-*.npy"))) < target
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.001)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    assert not list(spill.glob("*/*/manifest.json"))  # every run was interrupted before publishing
    out = json.loads(cli("encode", "--store", str(root), *args[1:]).stdout.splitlines()[-1])
    resumed = Path(out["path"])
    files = sorted(str(p.relative_to(reference_dir)) for p in reference_dir.rglob("*.parquet"))
    assert files == sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*.parquet"))
    for name in files:
        assert (resumed / name).read_bytes() == (reference_dir / name).read_bytes(), name
    assert not list(resumed.rglob("*.npy"))  # spill removed


def refused(result, *fragments: str) -> None:
    line = last_line(result.stderr)
    assert result.returncode == 2 and line.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stderr


def test_bad_saes_and_inputs_leave_the_store_unchanged(world: dict) -> None:
    base, root = world["base"], world["root"]
    wrong = base / "sae-d16"
    save(random_topk_sae(16, seed=5), wrong)
    corrupt = base / "sae-corrupt"
    save(random_topk_sae(32, seed=6), corrupt)
    data = (corrupt / "sae_weights.safetensors").read_bytes()
    (corrupt / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    pickled = base / "sae.pt"
    torch.save({"W_enc": torch.zeros(2, 2)}, pickled)
    other_hook = base / "sae-other-hook"
    save(random_topk_sae(32, seed=8, hook="blocks.0.hook_resid_post"), other_hook)
    before = snapshot(root)
    cases = [
        ((str(wrong), world["harvest"], SITE), ("d_in",)),
        ((str(corrupt), world["harvest"], SITE), ("sae_weights.safetensors",)),
        ((str(pickled), world["harvest"], SITE), ("sae.pt",)),
        ((str(world["sae_dir"]), "harvest-missing-00000000", SITE), ("harvest-missing-00000000",)),
        ((str(other_hook), world["harvest"], SITE), ("--allow-mismatch",)),
    ]
    for (sae, harvest_id, site), fragments in cases:
        result = cli(
            "encode",
            "--store",
            str(root),
            "--sae",
            sae,
            "--harvest",
            harvest_id,
            "--site",
            site,
            "--no-progress",
            check=False,
        )
        refused(result, *fragments)
        assert snapshot(root) == before, sae


def test_query_cli_prints_top_examples(world: dict) -> None:
    manifest = encode(
        str(world["root"]), str(world["sae_dir"]), world["harvest"], runtime=EncodeRuntime(device="cpu", progress=False)
    )
    sae_id = manifest.id.split("/")[0]
    common = ["query", "--store", str(world["root"]), "--sae", sae_id, "--harvest", world["harvest"]]
    rows = json.loads(cli(*common, "--json", "density").stdout.splitlines()[-1])["rows"]
    counts = pl.read_parquet(Store(world["root"]).features_dir(sae_id, world["harvest"]) / "by_feature" / "*.parquet")
    assert rows[0]["count"] == counts.group_by("feature").len()["len"].max()  # densest first
    top = cli(*common, "--limit", "3", "top", str(rows[0]["feature"]))
    assert "«" in top.stdout and "»" in top.stdout and "top ·" in top.stdout
