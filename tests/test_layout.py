"""The package layout: everything installs inside `actstore`, so a user's own `store.py` or `schemas/` never
shadows ours, and the pyproject names every package folder (a room it forgot would be missing from wheels)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from actstore.transforms.sae import save
from tests.flows.test_encode import random_topk_sae
from tests.helpers import ROOT, cli, write_text_corpus
from tests.tiny_models import build_tiny_model

ROOMS = ("schemas", "store", "transforms", "flows")
SHADOW = "raise RuntimeError(\"the user's own {name} was imported instead of actstore's\")\n"


def test_the_wheel_holds_one_package_with_every_room(tmp_path: Path) -> None:
    """Built as a user installs it: every module of actstore/ is in the wheel under `actstore/`, nothing else is
    top-level, and the dashboard's static files come along."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("actstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("actstore-")} == {"actstore"}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "actstore").rglob("*.py")}
    assert sources <= set(names)
    assert {"actstore/flows/dashboard/static/index.js", "actstore/py.typed"} <= set(names)
    assert {n.split("/")[1] for n in names if n.startswith("actstore/") and n.count("/") > 1} >= set(ROOMS)


def test_nothing_of_ours_is_a_top_level_module(tmp_path: Path) -> None:
    """From outside the repository only `actstore` (and not `store`, `flows`, ...) is importable."""
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps({n: u.find_spec(n) is not None for n in "
        "['actstore', 'store', 'flows', 'schemas', 'transforms']}))"
    )
    found = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    )
    assert found == {"actstore": True, "store": False, "flows": False, "schemas": False, "transforms": False}


@pytest.fixture(scope="module")
def shadowing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A notebook folder with modules named like ours, each failing loudly when imported."""
    work = tmp_path_factory.mktemp("notebook")
    for name in ("store.py", "flows.py", "transforms.py"):
        (work / name).write_text(SHADOW.format(name=name))
    (work / "schemas").mkdir()
    (work / "schemas" / "__init__.py").write_text(SHADOW.format(name="schemas/"))
    return work


def test_a_users_own_modules_do_not_shadow_actstore(shadowing_dir: Path) -> None:
    work = shadowing_dir
    model = build_tiny_model("llama", work / "model")
    docs = write_text_corpus(work / "docs", 12)
    common = ["--store", str(work / "data"), "--json"]
    ingested = cli(
        "ingest", *common, "--source", "text", "--path", str(docs), "--model", str(model), "--ctx-len", "16", cwd=work
    )
    corpus = json.loads(ingested.stdout.splitlines()[-1])["corpus_id"]
    site = "blocks.1.hook_resid_post"
    harvested = cli("harvest", *common, "--corpus", corpus, "--site", site, "--no-progress", cwd=work)
    harvest = json.loads(harvested.stdout.splitlines()[-1])["harvest_id"]
    save(random_topk_sae(32, seed=1, model=str(model)), work / "sae")
    encoded = cli("encode", *common, "--harvest", harvest, "--sae", str(work / "sae"), "--no-progress", cwd=work)
    sae = json.loads(encoded.stdout.splitlines()[-1])["sae_id"]
    density = cli("query", "density", *common, "--sae", sae, "--harvest", harvest, cwd=work)  # options after it
    assert json.loads(density.stdout.splitlines()[-1])["rows"]
    code = f"import actstore; print(len(actstore.open({str(work / 'data')!r}).ls()))"
    listed = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=True)
    assert int(listed.stdout) == 4  # corpus, harvest, sae, features


def test_python_dash_m_actstore_is_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actstore", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "ingest" in result.stdout and "harvest" in result.stdout
