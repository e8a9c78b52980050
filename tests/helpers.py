"""Shared test helpers: running the CLI as a real process, corpora on disk, and store snapshots."""

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

WORDS = (
    "the model reads tokens and writes activations to the store while a sparse autoencoder finds "
    "features in the residual stream of every layer of a transformer with attention and an mlp"
).split()


def write_text_corpus(directory: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Plain-text files of seeded random English-like documents."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
        (directory / f"doc-{i:03d}.txt").write_text(" ".join(words).capitalize() + ".\n")
    return directory


def cli(*args: str, check: bool = True, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `actstore ARGS` in a fresh process, as a user would (from `cwd`, the repository by default)."""
    result = subprocess.run(
        [sys.executable, "-m", "actstore", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"actstore {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def cli_popen(*args: str) -> subprocess.Popen[str]:
    """Start `actstore ARGS` in its own process group (so a kill takes its children too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "actstore", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: equal snapshots mean an unchanged store."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tiny_pipeline(directory: Path, store: str = "store", **sections: Any) -> Path:
    """A pipeline config on a tiny seeded llama and a 200-document text corpus (~49k tokens, 386 chunks of 4
    windows of 32), written to `directory/pipeline.yaml`; `sections` replace or add top-level sections."""
    from tests.tiny_models import build_tiny_model

    model = directory / "model"
    if not model.exists():
        build_tiny_model("llama", model)
    text = write_text_corpus(directory / "text", n_docs=200)
    config: dict[str, Any] = {
        "name": "tiny",
        "store": store,
        "model": {"name": str(model)},
        "corpus": {"source": "text", "paths": [str(text)], "ctx_len": 32},
        "harvest": {"sites": ["blocks.1.hook_resid_post"], "batch_windows": 4},
        "train": {
            "architecture": "topk",
            "expansion_factor": 2,
            "k": 4,
            "total_tokens": 8192,
            "batch_size": 512,
            "lr": 0.001,
            "warmup_steps": 2,
            "checkpoint_every": 5,
        },
        "eval": {"ce_tokens": 256},
        "dashboard": None,
        "run": {"threads": 1, "progress": False},
        **sections,
    }
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stored_data(root: Path) -> dict[str, str]:
    """`snapshot` of what a store holds, less what records how and when it was made (manifests' timings,
    done markers and write logs naming processes, locks): equal for two runs that stored the same bytes."""
    skip = ("manifest.json", "dashboard.json", ".lock", "writes.log")
    return {
        k: v
        for k, v in snapshot(root).items()
        if not k.endswith(skip) and "/_progress/" not in k and "/_shards/" not in k
    }
