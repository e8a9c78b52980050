"""The refactor pin: a tiny end-to-end store (ingest, harvest with loss, train, encode, eval on the embedded
SmolLM2) built through today's CLI has the ids, manifest fields and data bytes that the code before the
restructuring produced (`tests/fixtures/equivalence.json`, recorded from commit 8b44099 with the same commands).

Zarr metadata (`zarr.json`) and disk byte counts are left out: a harvest became a Zarr group with named
dimensions, which changes its metadata and not one byte of its chunks. New files and new manifest fields are
allowed (they are new capabilities); every recorded one must be unchanged.
"""

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli

FIXTURE = ROOT / "tests" / "fixtures" / "equivalence.json"
SKIPPED = ("manifest.json", "dashboard.json", ".lock", "writes.log", "zarr.json")


def _json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def build_store(root: Path) -> None:
    """The commands the fixture was recorded with."""
    store = ["--store", str(root), "--json"]
    corpus = _json_line(
        cli(
            "ingest", *store, "--source", "pydocs", "--model", "smollm2-135m", "--ctx-len", "64", "--max-tokens", "4096"
        ).stdout
    )["corpus_id"]
    harvest = _json_line(
        cli(
            "harvest",
            *store,
            "--corpus",
            corpus,
            "--site",
            "blocks.1.hook_resid_post",
            "--site",
            "blocks.0.hook_mlp_out",
            "--loss",
            "--batch-windows",
            "16",
            "--threads",
            "1",
            "--no-progress",
        ).stdout
    )["harvest_id"]
    sae = _json_line(
        cli(
            "train",
            *store,
            "--harvest",
            harvest,
            "--site",
            "blocks.1.hook_resid_post",
            "--architecture",
            "topk",
            "--k",
            "8",
            "--d-sae",
            "1152",
            "--tokens",
            "8192",
            "--batch-size",
            "512",
            "--warmup-steps",
            "2",
            "--checkpoint-every",
            "5",
            "--no-progress",
        ).stdout
    )["sae_id"]
    cli("encode", *store, "--harvest", harvest, "--sae", sae, "--no-progress")
    cli("eval", *store, "--harvest", harvest, "--sae", sae, "--ce-tokens", "256")


def data_files(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (
            path.is_file()
            and not rel.endswith(SKIPPED)
            and not any(part in rel for part in ("/_progress/", "/_shards/", "/checkpoints/"))
        ):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("equivalence") / "store"
    build_store(root)
    return root


def test_same_ids_and_manifest_fields(store: Path) -> None:
    recorded = json.loads(FIXTURE.read_text())["objects"]
    for relpath, old in recorded.items():
        manifest = json.loads((store / relpath / "manifest.json").read_text())
        assert manifest["id"] == old["id"] and manifest["kind"] == old["kind"], relpath
        assert manifest["config"] == old["config"], relpath
        for field in ("counts", "extra"):
            now = {k: manifest[field][k] for k in old[field] if k in manifest[field]}
            assert now == old[field], (relpath, field)


def test_same_data_bytes(store: Path) -> None:
    recorded = json.loads(FIXTURE.read_text())["files"]
    now = data_files(store)
    changed = sorted(f for f, digest in recorded.items() if now.get(f) != digest)
    assert not changed, f"changed or missing: {changed}"
