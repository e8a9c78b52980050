"""The train flow: SAE trained from the store, readable by SAELens with the same encodings, resumable after a
SIGKILL to bit-identical weights, logged to Parquet and evaluated on the holdout split."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.train import train
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.store.root import Store
from actstore.transforms.sae import load
from tests.helpers import cli, cli_popen, write_text_corpus
from tests.tiny_models import build_tiny_model

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("train")
    model_dir = build_tiny_model("llama", base / "llama")
    root = base / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 200)),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=16,
            holdout_fraction=0.2,
            max_tokens=16384,
        ),
    )
    manifest = harvest(
        str(root),
        HarvestConfig(corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=(SITE,), batch_windows=16),
        HarvestRuntime(progress=False, device="cpu"),
    )
    return {"base": base, "root": root, "harvest": manifest.id}


def run_config(harvest_id: str, tokens: int = 256 * 60) -> TrainRun:
    train_cfg = TrainConfig(
        architecture="topk",
        d_sae=128,
        k=4,
        total_tokens=tokens,
        batch_size=256,
        lr=3e-3,
        warmup_steps=5,
        init_tokens=2048,
        seed=1,
    )
    return TrainRun(
        harvest_id=harvest_id, site=SITE, train=train_cfg, buffer_tokens=2048, checkpoint_every=10, eval_tokens=4096
    )


def test_trained_sae_loads_in_saelens_with_equal_encodings(harvested: dict) -> None:
    manifest = train(str(harvested["root"]), run_config(harvested["harvest"]), progress=False)
    directory = Store(harvested["root"]).sae_dir(manifest.id)
    log = pl.read_parquet(directory / "training_log.parquet")
    assert log["step"].to_list() == list(range(1, 61))
    assert log["fvu"].tail(5).mean() < log["fvu"].head(5).mean()  # it learned
    evaluation = manifest.extra["eval_holdout"]
    assert 0 < evaluation["fvu"] < 1 and evaluation["tokens"] > 0 and evaluation["l0"] <= 4
    assert not list(directory.glob("_checkpoint-*")) and not (directory / "checkpoint.json").exists()

    from sae_lens import SAE as LensSAE

    ours = load(directory)
    lens = LensSAE.load_from_disk(str(directory), device="cpu")
    x = torch.from_numpy(Store(harvested["root"]).activations(harvested["harvest"], SITE)[:512])
    # SAELens applies the input scaling with its ActivationScaler, from activation_scaler.json beside the weights
    factor = json.loads((directory / "activation_scaler.json").read_text())["scaling_factor"]
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), lens.encode(x * factor), atol=1e-5)
        assert (ours.encode(x) > 0).sum(dim=1).le(4).all()
    assert ours.hook_name == SITE and lens.cfg.metadata.hook_name == SITE
    # a second call finds the finished SAE
    assert train(str(harvested["root"]), run_config(harvested["harvest"]), progress=False) == manifest


def test_killed_training_resumes_to_identical_weights(harvested: dict) -> None:
    root = harvested["root"]
    run = run_config(harvested["harvest"], tokens=256 * 80).model_copy(update={"checkpoint_every": 5})
    args = [
        "train",
        "--store",
        str(root),
        "--harvest",
        harvested["harvest"],
        "--site",
        SITE,
        "--d-sae",
        "128",
        "--k",
        "4",
        "--tokens",
        str(256 * 80),
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--seed",
        "2",
        "--checkpoint-every",
        "5",
        "--no-progress",
        "--json",
    ]
    reference_root = harvested["base"] / "reference"
    reference_root.mkdir()
    for kind in ("corpora", "activations"):
        (reference_root / kind).symlink_to(root / kind)
    reference = json.loads(cli(*[str(reference_root) if a == str(root) else a for a in args]).stdout.splitlines()[-1])
    del run
    proc = cli_popen(*args)
    deadline = time.monotonic() + 180
    sae_dir = root / "saes" / reference["sae_id"]
    while proc.poll() is None and time.monotonic() < deadline:
        pointer = sae_dir / "checkpoint.json"
        if pointer.exists() and json.loads(pointer.read_text())["step"] >= 30:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (sae_dir / "manifest.json").exists()
    resumed = json.loads(cli(*args).stdout.splitlines()[-1])
    assert resumed["sae_id"] == reference["sae_id"]
    a = load_file(Path(reference["path"]) / "sae_weights.safetensors")
    b = load_file(sae_dir / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    log = pl.read_parquet(sae_dir / "training_log.parquet")
    assert log["step"].to_list() == list(range(1, 81))
