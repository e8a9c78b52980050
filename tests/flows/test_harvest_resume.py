"""Exactly once: a harvest SIGKILLed at random moments, then re-run, ends bit-identical to one never killed."""

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from actstore.store.files import object_lock
from tests.helpers import cli, cli_popen, snapshot, write_text_corpus
from tests.tiny_models import build_tiny_model

SITES = ("blocks.0.hook_resid_post", "blocks.2.hook_mlp_out")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One ingest and one uninterrupted harvest; other stores link to this corpus instead of re-ingesting."""
    base = tmp_path_factory.mktemp("resume")
    model_dir = build_tiny_model("llama", base / "llama")
    docs = write_text_corpus(base / "docs", n_docs=40, seed=1)
    root = base / "reference"
    out = cli(
        "ingest",
        "--store",
        str(root),
        "--source",
        "text",
        "--path",
        str(docs),
        "--model",
        str(model_dir),
        "--ctx-len",
        "16",
        "--max-tokens",
        "1600",
        "--json",
    )
    corpus_id = json.loads(out.stdout.strip().splitlines()[-1])["corpus_id"]
    harvest_out = cli(*harvest_args(root, corpus_id, str(model_dir)))
    return {
        "base": str(base),
        "model": str(model_dir),
        "root": str(root),
        "corpus": corpus_id,
        "harvest": json.loads(harvest_out.stdout.strip().splitlines()[-1])["harvest_id"],
    }


def harvest_args(root: Path, corpus_id: str, model: str) -> list[str]:
    args = [
        "harvest",
        "--store",
        str(root),
        "--corpus",
        corpus_id,
        "--model",
        model,
        "--loss",
        "--batch-windows",
        "2",
        "--no-progress",
        "--json",
    ]
    for site in SITES:
        args += ["--site", site]
    return args


def store_linked_to(reference: dict[str, str], name: str) -> tuple[Path, list[str]]:
    """A new store root that shares the reference corpus, and the harvest command for it."""
    root = Path(reference["base"]) / name
    (root / "corpora").mkdir(parents=True)
    (root / "corpora" / reference["corpus"]).symlink_to(Path(reference["root"]) / "corpora" / reference["corpus"])
    return root, harvest_args(root, reference["corpus"], reference["model"])


def arrays_of(root: Path) -> dict[str, bytes]:
    """Raw bytes of every stored array, read through zarr (independent of our reader)."""
    import zarr

    (harvest_dir,) = (root / "activations").iterdir()
    return {p.name: np.asarray(zarr.open_array(p, mode="r")[:]).tobytes() for p in sorted(harvest_dir.glob("*.zarr"))}


def done_markers(root: Path) -> int:
    return len(list(root.glob("activations/*/_progress/*.done")))


def test_sigkill_at_random_points_then_resume_is_bit_identical(reference: dict[str, str]) -> None:
    expected = arrays_of(Path(reference["root"]))
    n_chunks = done_markers(Path(reference["root"]))
    assert n_chunks >= 40

    rng = random.Random(1234)
    root, kill_args = store_linked_to(reference, "killed")
    kills = 0
    # kill points: at a marker count drawn at random (mid-write), and once at a random time during start-up
    targets = sorted(rng.sample(range(1, n_chunks - 2), 3))
    for target in [None, *targets]:
        proc = cli_popen(*kill_args)
        deadline = time.monotonic() + 120
        if target is None:
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            while done_markers(root) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.02))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not (next((root / "activations").glob("*/manifest.json"), None)) or proc.returncode == 0
    assert kills >= 3
    assert done_markers(root) < n_chunks  # the last kill really interrupted the run
    cli(*kill_args)  # resume
    assert done_markers(root) == n_chunks
    assert arrays_of(root) == expected
    leftovers = [p for p in root.rglob("*") if p.is_file() and (".partial" in p.name or ".tmp-" in p.name)]
    assert leftovers == []
    again = snapshot(root)
    cli(*kill_args)  # a finished harvest re-run changes nothing
    assert snapshot(root) == again


def test_two_harvests_of_one_config_at_once_do_not_corrupt(reference: dict[str, str]) -> None:
    harvest_id = reference["harvest"]
    # a harvest of this config is running (this test process holds its lock): a second one is refused
    root, args = store_linked_to(reference, "concurrent")
    with object_lock(root / "activations" / harvest_id):
        before = snapshot(root)
        refused = cli(*args, check=False)
        assert snapshot(root) == before
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {harvest_id} is being written by pid {os.getpid()}: wait for it to finish, then re-run to resume "
        "or read it"
    )

    # two real processes racing on the same config: the loser is refused or finds the work done
    racers = [cli_popen(*args) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in racers]
    for code, err in results:
        assert code == 0 or (code == 2 and "being written by pid" in err), err[-2000:]
    assert any(code == 0 for code, _ in results)
    cli(*args)  # finishes whatever a refused racer left
    assert arrays_of(root) == arrays_of(Path(reference["root"]))
