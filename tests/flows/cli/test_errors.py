"""Bad input ends in one clear line, exit code 2, and a store that is unchanged (or resumable)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import cli, last_line, snapshot, write_text_corpus
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    base = tmp_path_factory.mktemp("errors")
    model = build_tiny_model("llama", base / "llama")
    docs = write_text_corpus(base / "docs", n_docs=30)
    root = base / "store"
    out = cli(
        "ingest",
        "--store",
        str(root),
        "--source",
        "text",
        "--path",
        str(docs),
        "--model",
        str(model),
        "--ctx-len",
        "16",
        "--json",
    )
    long_out = cli(
        "ingest",
        "--store",
        str(root),
        "--source",
        "text",
        "--path",
        str(docs),
        "--model",
        str(model),
        "--ctx-len",
        "128",
        "--json",
    )
    return {
        "base": base,
        "model": str(model),
        "docs": str(docs),
        "root": root,
        "corpus": json.loads(out.stdout.splitlines()[-1])["corpus_id"],
        "long_corpus": json.loads(long_out.stdout.splitlines()[-1])["corpus_id"],
    }


def refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    line = last_line(result.stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    assert line.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stderr
    return line


def test_unknown_site_lists_valid_sites(env: dict) -> None:
    before = snapshot(env["root"])
    result = cli(
        "harvest",
        "--store",
        str(env["root"]),
        "--corpus",
        env["corpus"],
        "--model",
        env["model"],
        "--site",
        "blocks.9.hook_resid_post",
        check=False,
    )
    line = refused(result, "blocks.9.hook_resid_post", "resid_post")
    assert "blocks.0" in line and "2" in line  # names the valid range (3 blocks)
    assert snapshot(env["root"]) == before


def test_missing_model_path(env: dict) -> None:
    before = snapshot(env["root"])
    missing = str(env["base"] / "no-such-model")
    result = cli(
        "harvest",
        "--store",
        str(env["root"]),
        "--corpus",
        env["corpus"],
        "--model",
        missing,
        "--site",
        "blocks.0.hook_resid_post",
        check=False,
    )
    refused(result, "no-such-model")
    assert snapshot(env["root"]) == before


def test_missing_corpus_id(env: dict) -> None:
    before = snapshot(env["root"])
    result = cli(
        "harvest",
        "--store",
        str(env["root"]),
        "--corpus",
        "corpus-nope-00000000",
        "--model",
        env["model"],
        "--site",
        "blocks.0.hook_resid_post",
        check=False,
    )
    refused(result, "corpus-nope-00000000", env["corpus"])
    assert snapshot(env["root"]) == before


def test_empty_corpus(env: dict) -> None:
    empty = env["base"] / "empty-docs"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    before = snapshot(env["root"])
    result = cli(
        "ingest",
        "--store",
        str(env["root"]),
        "--source",
        "text",
        "--path",
        str(empty),
        "--model",
        env["model"],
        "--ctx-len",
        "16",
        check=False,
    )
    refused(result)
    assert snapshot(env["root"]) == before
    assert not [p for p in (env["root"] / "corpora").iterdir() if ".tmp-" in p.name]


def test_ctx_len_beyond_the_model(env: dict) -> None:
    before = snapshot(env["root"])
    result = cli(
        "harvest",
        "--store",
        str(env["root"]),
        "--corpus",
        env["long_corpus"],
        "--model",
        env["model"],
        "--site",
        "blocks.0.hook_resid_post",
        check=False,
    )
    refused(result, "ctx_len 128", "64", "--ctx-len")
    assert snapshot(env["root"]) == before


def test_store_path_not_writable(env: dict) -> None:
    blocker = env["base"] / "a-file"
    blocker.write_text("not a directory")
    result = cli(
        "ingest",
        "--store",
        str(blocker / "store"),
        "--source",
        "text",
        "--path",
        env["docs"],
        "--model",
        env["model"],
        "--ctx-len",
        "16",
        check=False,
    )
    refused(result, str(blocker))
    assert blocker.read_text() == "not a directory"


def test_non_finite_activations_stop_with_a_resumable_store(env: dict) -> None:
    exploding = env["base"] / "exploding"
    model = AutoModelForCausalLM.from_pretrained(env["model"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    model.save_pretrained(exploding)
    (exploding / "tokenizer.json").write_bytes((Path(env["model"]) / "tokenizer.json").read_bytes())
    result = cli(
        "harvest",
        "--store",
        str(env["root"]),
        "--corpus",
        env["corpus"],
        "--model",
        str(exploding),
        "--model-dtype",
        "float16",
        "--site",
        "blocks.1.hook_resid_post",
        "--no-progress",
        check=False,
    )
    refused(result, "non-finite activations at blocks.1.hook_resid_post", "float32")
    listing = cli("ls", "--store", str(env["root"]), "--json")
    states = {o["id"]: o["complete"] for o in json.loads(listing.stdout)["objects"]}
    assert any(not done and oid.startswith("harvest-") for oid, done in states.items())


def test_disk_full_then_resume(env: dict, tmp_path: Path) -> None:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], check=True)
    try:
        root = mount_point / "store"
        (root / "corpora").mkdir(parents=True)
        (root / "corpora" / env["corpus"]).symlink_to(env["root"] / "corpora" / env["corpus"])
        args = [
            "harvest",
            "--store",
            str(root),
            "--corpus",
            env["corpus"],
            "--model",
            env["model"],
            "--site",
            "blocks.0.hook_resid_post",
            "--site",
            "blocks.1.hook_resid_post",
            "--no-progress",
        ]
        result = cli(*args, check=False)
        refused(result, "disk full", "re-run to resume")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)
        cli(*args)
        reference = cli(*[a if a != str(root) else str(env["root"]) for a in args], "--json")
        hid = json.loads(reference.stdout.splitlines()[-1])["harvest_id"]
        import zarr

        for site in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
            resumed = zarr.open_array(root / "activations" / hid / f"{site}.zarr", mode="r")[:]
            clean = zarr.open_array(env["root"] / "activations" / hid / f"{site}.zarr", mode="r")[:]
            assert resumed.tobytes() == clean.tobytes()
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
