"""`actstore direction` and harvests with interventions, on a tiny Llama: the stored direction equals numpy's
difference of means over the selected tokens; a harvest that ablates it stores exactly `x - r̂ r̂ᵀ x` at the site
(so the two sets' means coincide there) and changes later layers; addition stores `x + αr`; ids stay apart."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actstore.flows.directions import direction, load_direction
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.directions import DirectionConfig, Intervention
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.store.root import Store
from tests.helpers import cli, last_line, snapshot, write_text_corpus
from tests.tiny_models import build_tiny_model

SITE, LATER = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
RUNTIME = HarvestRuntime(progress=False, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("directions")
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
            holdout_fraction=0.2,
        ),
    )
    config = HarvestConfig(
        corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=(SITE, LATER), batch_windows=5
    )
    made = harvest(str(root), config, RUNTIME)
    made_direction = direction(
        str(root), DirectionConfig(harvest_id=made.id, site=SITE, positive="pos < 8 AND pos > 0", negative="pos >= 8")
    )
    return {"root": root, "corpus": corpus.id, "config": config, "harvest": made.id, "direction": made_direction.id}


def test_direction_is_the_difference_of_numpy_means(world: dict) -> None:
    store = Store(world["root"])
    tokens = store.tokens(world["corpus"]).filter(pl.col("split") == "train").collect()
    x = np.asarray(store.activations(world["harvest"], SITE)[:], dtype=np.float64)
    positive = tokens.filter((pl.col("pos") < 8) & (pl.col("pos") > 0))["tok"].to_numpy()
    negative = tokens.filter(pl.col("pos") >= 8)["tok"].to_numpy()
    positive, negative = positive[positive < len(x)], negative[negative < len(x)]
    vectors = load_direction(store, world["direction"])
    expected = x[positive].mean(0) - x[negative].mean(0)
    np.testing.assert_allclose(vectors["direction"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors["unit"].numpy()), 1.0, rtol=1e-6)
    manifest = store.manifest("direction", world["direction"])
    assert manifest.counts == {"positive": len(positive), "negative": len(negative)}


def test_ablation_and_addition_harvests_store_the_intervened_activations(world: dict) -> None:
    store, root = Store(world["root"]), str(world["root"])
    base_x = np.asarray(store.activations(world["harvest"], SITE)[:], dtype=np.float64)
    base_later = np.asarray(store.activations(world["harvest"], LATER)[:], dtype=np.float64)
    r = load_direction(store, world["direction"])["direction"].double().numpy()
    unit = r / np.linalg.norm(r)

    ablate = Intervention(kind="ablate", direction_id=world["direction"], sites=(SITE,))
    ablated = harvest(root, world["config"].model_copy(update={"interventions": (ablate,)}), RUNTIME)
    assert ablated.id != world["harvest"] and "-ablate-" in ablated.id
    x = np.asarray(store.activations(ablated.id, SITE)[:], dtype=np.float64)
    np.testing.assert_allclose(x, base_x - np.outer(base_x @ unit, unit), atol=1e-4)
    assert np.abs(x @ unit).max() < 1e-4
    assert not np.allclose(np.asarray(store.activations(ablated.id, LATER)[:]), base_later, atol=1e-3)
    tokens = store.tokens(world["corpus"]).filter(pl.col("split") == "train").collect()
    positive = tokens.filter((pl.col("pos") < 8) & (pl.col("pos") > 0))["tok"].to_numpy()
    negative = tokens.filter(pl.col("pos") >= 8)["tok"].to_numpy()
    gap = x[positive[positive < len(x)]].mean(0) - x[negative[negative < len(x)]].mean(0)
    assert np.linalg.norm(gap) < 1e-4 * np.linalg.norm(r)  # the two sets' means coincide after the ablation

    add = Intervention(kind="add", direction_id=world["direction"], sites=(SITE,), alpha=2.5)
    added = harvest(root, world["config"].model_copy(update={"interventions": (add,)}), RUNTIME)
    assert len({added.id, ablated.id, world["harvest"]}) == 3
    np.testing.assert_allclose(
        np.asarray(store.activations(added.id, SITE)[:], dtype=np.float64), base_x + 2.5 * r, atol=1e-4
    )


def test_bad_directions_and_interventions_are_one_line(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    before = snapshot(root)
    common = ("--store", str(root))
    cases = [
        (
            (
                "direction",
                *common,
                "--harvest",
                world["harvest"],
                "--site",
                SITE,
                "--positive",
                "pos > 100",
                "--negative",
                "pos < 3",
            ),
            "selects no",
        ),
        (
            (
                "direction",
                *common,
                "--harvest",
                world["harvest"],
                "--site",
                SITE,
                "--positive",
                "pos < 5",
                "--negative",
                "pos < 9",
            ),
            "disjoint",
        ),
        (
            (
                "harvest",
                *common,
                "--corpus",
                world["corpus"],
                "--site",
                SITE,
                "--ablate",
                "direction-missing-00000000@" + SITE,
                "--no-progress",
                "--device",
                "cpu",
            ),
            "direction-missing-00000000",
        ),
        (
            (
                "harvest",
                *common,
                "--corpus",
                world["corpus"],
                "--site",
                SITE,
                "--add",
                world["direction"] + "@" + SITE,
                "--no-progress",
            ),
            "DIRECTION_ID@SITE[,SITE]:ALPHA",
        ),
    ]
    for args, fragment in cases:
        result = cli(*args, check=False)
        line = last_line(result.stderr)
        assert result.returncode == 2 and line.startswith("error: ") and fragment in line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert snapshot(root) == before


def test_an_evaluation_of_an_intervened_harvest_runs_the_intervened_model(world: dict) -> None:
    """The downstream pass must apply the harvest's interventions: its clean CE then equals the harvest's loss."""
    from actstore.flows.eval import evaluate
    from actstore.flows.saes import publish_sae
    from actstore.schemas.eval import EvalConfig, EvalRuntime
    from tests.flows.test_eval_flow import identity_sae

    store, root = Store(world["root"]), str(world["root"])
    ablate = Intervention(kind="ablate", direction_id=world["direction"], sites=(SITE,))
    config = world["config"].model_copy(update={"interventions": (ablate,), "loss": True})
    ablated = harvest(root, config, RUNTIME)
    sae_id = publish_sae(root, identity_sae(), source="identity").id
    manifest = evaluate(
        root,
        EvalConfig(sae_id=sae_id, harvest_id=ablated.id, site=SITE, ce_tokens=60, split="all"),
        EvalRuntime(device="cpu", progress=False),
    )
    per_token = store.eval_table(manifest.id, "per_token").collect().filter(pl.col("ce_clean").is_not_null())
    loss = np.asarray(store.activations(ablated.id, "loss")[:])
    assert len(per_token) >= 60
    np.testing.assert_allclose(per_token["ce_clean"].to_numpy(), loss[per_token["tok"].to_numpy()], atol=1e-4)
    assert manifest.extra["summary"]["ce_spliced"] == pytest.approx(manifest.extra["summary"]["ce_clean"], abs=1e-5)
