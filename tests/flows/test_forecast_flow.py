"""`actstore forecast` end to end: run tables against numpy on the stored loss arrays, parameter counts against
the loaded models, the SAE table against the evaluation rows, the position law on the embedded model against its
per-position means, and every bad input as one line."""

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from actstore.flows.cli.forecast import add_forecast_args, cmd_forecast, config_from_args, demo_forecast, forecast_lines
from actstore.flows.eval import evaluate
from actstore.flows.forecast import fit_laws, forecast
from actstore.flows.forecast_runs import count_parameters, lookup
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.runtime import cached_model
from actstore.flows.saes import publish_sae
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.forecast import ForecastConfig
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.schemas.sae import SAEConfig
from actstore.store.root import Store
from actstore.transforms.models import embedded_default_gguf, load_model
from actstore.transforms.sae import SAE
from tests.helpers import snapshot, write_text_corpus
from tests.tiny_models import tiny_tokenizer

SITE = "blocks.0.hook_resid_post"
CTX = 16
WIDTHS = {16: False, 32: False, 48: True}
"""Model width -> tied embeddings; one tied model checks that shared weights count once."""
SAE_SHAPES = ((32, 2), (32, 4), (64, 2), (64, 8), (96, 4), (128, 8))
"""(d_sae, k) of the evaluated TopK SAEs."""
QUICK = {"n_boot": 100}
RUNTIME = HarvestRuntime(progress=False, device="cpu")


def build_width(directory: Path, width: int, tied: bool) -> Path:
    """A 2-layer Llama of hidden size `width` with the tiny tokenizer, saved to load by directory."""
    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=special,
        bos_token_id=special,
        eos_token_id=special,
        tie_word_embeddings=tied,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * width,
        head_dim=width // 4,
        max_position_embeddings=64,
    )
    torch.manual_seed(width)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def topk_sae(seed: int, d_sae: int, k: int, d_in: int = 32) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=SITE)
    return SAE(
        cfg,
        {
            "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_in),
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three tiny widths harvested with loss on one corpus, and six TopK SAEs evaluated on the width-32 one."""
    base = tmp_path_factory.mktemp("forecast")
    root = str(base / "store")
    models = {w: build_width(base / f"llama-w{w}", w, tied) for w, tied in WIDTHS.items()}
    corpus = ingest(
        root,
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 40)),),
            tokenizer=ModelConfig(name=str(models[16])),
            ctx_len=CTX,
            holdout_fraction=0.3,
            max_tokens=1600,
        ),
    )
    harvests = {
        w: harvest(
            root,
            HarvestConfig(corpus_id=corpus.id, model=ModelConfig(name=str(path)), sites=(SITE,), loss=True),
            RUNTIME,
        ).id
        for w, path in models.items()
    }
    evals = []
    for seed, (d_sae, k) in enumerate(SAE_SHAPES):
        sae_id = publish_sae(root, topk_sae(seed, d_sae, k), source="test").id
        config = EvalConfig(sae_id=sae_id, harvest_id=harvests[32], site=SITE, max_tokens=200, ce_tokens=40)
        evals.append(evaluate(root, config, EvalRuntime(device="cpu", progress=False)).id)
    auto = forecast(root, ForecastConfig(**QUICK))
    return {"root": root, "corpus": corpus.id, "models": models, "harvests": harvests, "evals": evals, "auto": auto}


def table(world: dict, name: str) -> pl.DataFrame:
    return Store(world["root"]).forecast_table(world["auto"].id, name).collect()


def test_run_tables_equal_numpy_on_the_stored_losses(world: dict) -> None:
    store = Store(world["root"])
    runs, positions = table(world, "runs"), table(world, "positions")
    assert sorted(runs["harvest_id"].to_list()) == sorted(world["harvests"].values())
    docs = store.tokens(world["corpus"]).select("doc").collect()["doc"].to_numpy()
    for run in runs.iter_rows(named=True):
        loss = np.asarray(store.activations(run["harvest_id"], "loss")[:], dtype=np.float64)
        finite = np.isfinite(loss)
        assert run["mean_loss"] == pytest.approx(loss[finite].mean(), rel=1e-12)
        assert run["tokens"] == finite.sum() and run["docs"] == len(np.unique(docs[: len(loss)][finite]))
        assert run["low"] < run["mean_loss"] < run["high"] and run["ctx_len"] == CTX
        by_pos = positions.filter(pl.col("harvest_id") == run["harvest_id"]).sort("pos")
        grid = loss.reshape(-1, CTX)
        assert by_pos["pos"].to_list() == list(range(CTX - 1))  # the last position has no next token
        assert by_pos["context"].to_list() == by_pos["pos"].to_list()  # every window starts with BOS
        np.testing.assert_allclose(by_pos["mean_loss"].to_numpy(), grid[:, : CTX - 1].mean(axis=0), rtol=1e-12)
        assert (by_pos["tokens"] == len(grid)).all()
        assert ((by_pos["low"] <= by_pos["mean_loss"]) & (by_pos["mean_loss"] <= by_pos["high"])).all()


def test_parameter_counts_equal_the_loaded_models(world: dict) -> None:
    runs = table(world, "runs")
    vocab = len(tiny_tokenizer())
    for width, tied in WIDTHS.items():
        row = runs.filter(pl.col("harvest_id") == world["harvests"][width]).row(0, named=True)
        model = load_model(ModelConfig(name=str(world["models"][width])), torch.device("cpu"))
        assert row["n_params_total"] == sum(p.numel() for p in model.parameters())
        embeddings = vocab * width * (1 if tied else 2)
        assert row["n_params_non_embedding"] == row["n_params_total"] - embeddings
        assert row["n_params"] == row["n_params_total"] and row["n_params_source"] == "total"
        assert row["model"] == str(world["models"][width]) and row["tokens_trained"] is None


def test_laws_fitted_where_the_points_allow_and_forecasts_follow_the_fits(world: dict) -> None:
    status = {(law["law"], law["subject"]): law for law in world["auto"].extra["laws"]}
    assert status[("loss_vs_params", world["corpus"])]["status"] == "fitted"
    assert status[("loss_vs_params_tokens", "")]["status"] == "skipped"  # no run has a known D
    for harvest_id in world["harvests"].values():
        assert status[("loss_vs_position", harvest_id)]["status"] == "fitted"
    assert status[("sae_nmse", f"{world['harvests'][32]}/{SITE}")]["status"] == "fitted"
    fits, forecasts = table(world, "fits"), table(world, "forecasts")
    for (law, subject), group in forecasts.group_by("law", "subject"):
        params = dict(
            fits.filter((pl.col("law") == law) & (pl.col("subject") == subject)).select("param", "estimate").iter_rows()
        )
        variables = fits.filter(pl.col("law") == law)["variables"][0].split(",")
        terms = sum(
            params[c] / group[v].to_numpy() ** params[e]
            for v, c, e in zip(variables, ("A", "B"), ("alpha", "beta"), strict=False)
        )
        np.testing.assert_allclose(group["point"].to_numpy(), params["E"] + terms, rtol=1e-9)
        np.testing.assert_allclose(group["reducible"].to_numpy(), terms, rtol=1e-9)
        assert sorted(group["multiple"].to_list()) == [2.0, 4.0]
        assert (group["low"] <= group["high"]).all()
    sizes = table(world, "runs")["n_params"].to_numpy()
    params_law = forecasts.filter(pl.col("law") == "loss_vs_params").sort("multiple")
    np.testing.assert_allclose(params_law["N"].to_numpy(), [2 * sizes.max(), 4 * sizes.max()])
    position_law = forecasts.filter(pl.col("law") == "loss_vs_position")
    assert set(position_law["context"].to_list()) == {2.0 * CTX, 4.0 * CTX}


@pytest.mark.parametrize(("E", "A", "alpha"), [(2.0, 3.0, 0.5), (0.0, 5.0, 0.3)], ids=["floor", "no-floor"])
def test_position_law_recovers_a_known_law_and_warns_without_a_floor(E: float, A: float, alpha: float) -> None:
    ctx = 64
    runs = [
        {"harvest_id": "h", "corpus_id": "c", "model": "m", "ctx_len": ctx, "tokens": 1, "docs": 1, "mean_loss": 1.0}
    ]

    def truth(context: float) -> float:
        return E + A / context**alpha

    positions = [
        {
            "harvest_id": "h",
            "pos": c,
            "context": c,
            "tokens": 1,
            "docs": 1,
            "mean_loss": 99.0 if c == 0 else float(truth(c)),
        }
        for c in range(ctx)
    ]  # context 0 is left out
    config = ForecastConfig(laws=("loss_vs_position",), targets=({"context": 1000.0},), n_boot=20)
    fitted = fit_laws.fn(config, runs, positions, [])
    params = {row["param"]: row["estimate"] for row in fitted.fits}
    assert params["A"] == pytest.approx(A, rel=1e-3) and params["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert params["E"] == pytest.approx(E, abs=1e-3) and fitted.fits[0]["n_points"] == ctx - 1
    by_target = {row["target"]: row for row in fitted.forecasts}
    for context in (1000.0, 2.0 * ctx, 4.0 * ctx):
        row = by_target[f"context={context:g}"]
        assert row["point"] == pytest.approx(truth(context), rel=1e-4)
        assert row["reducible"] == pytest.approx(truth(context) - E, rel=1e-3)
    note = fitted.laws[0]["note"]
    assert (note is None) if E > 0 else ("E fell to 0" in note)


def test_an_sae_law_over_a_sweep_of_one_k_is_fitted_over_the_width_alone() -> None:
    widths = [64, 128, 256, 512, 1024]
    saes = [
        {
            "eval_id": f"e{n}",
            "sae_id": f"s{n}",
            "harvest_id": "h",
            "site": "s",
            "split": "holdout",
            "d_sae": n,
            "k": 8.0,
            "l0": 7.5 + i,
            "nmse": 0.1 + 2.0 / n**0.5,
        }
        for i, n in enumerate(widths)
    ]
    fitted = fit_laws.fn(ForecastConfig(laws=("sae_nmse",), sae_sparsity="k", n_boot=20), [], [], saes)
    params = {row["param"]: row["estimate"] for row in fitted.fits}
    assert {row["variables"] for row in fitted.fits} == {"n_latents"}
    assert params == pytest.approx({"E": 0.1, "A": 2.0, "alpha": 0.5}, rel=1e-3)
    assert [row["n_latents"] for row in fitted.forecasts] == [2048.0, 4096.0]
    with pytest.raises(UserError, match="law sae_ce_delta needs at least 5 evaluations with a downstream loss"):
        fit_laws.fn(ForecastConfig(laws=("sae_ce_delta",)), [], [], saes)


def test_sae_table_is_built_from_the_evaluation_rows(world: dict) -> None:
    saes = table(world, "saes").sort("eval_id")
    rows = Store(world["root"]).evals().filter(pl.col("eval_id").is_in(world["evals"])).sort("eval_id").collect()
    assert saes["eval_id"].to_list() == rows["eval_id"].to_list()
    for name in ("d_sae", "l0", "nmse", "fvu", "ce_clean", "ce_spliced"):
        assert saes[name].to_list() == rows[name].to_list(), name
    np.testing.assert_allclose(saes["ce_delta"].to_numpy(), (rows["ce_spliced"] - rows["ce_clean"]).to_numpy())
    assert sorted(zip(saes["d_sae"].to_list(), saes["k"].to_list(), strict=True)) == sorted(
        (d, float(k)) for d, k in SAE_SHAPES
    )
    assert (saes["architecture"] == "topk").all()
    nmse = table(world, "fits").filter(pl.col("law") == "sae_nmse")
    assert nmse["variables"][0] == "n_latents,l0" and nmse["n_points"][0] == len(SAE_SHAPES)


def test_given_counts_and_too_few_points_for_a_named_law(world: dict) -> None:
    root, w16 = world["root"], world["models"][16]
    given = forecast(
        root,
        ForecastConfig(
            harvest_ids=(world["harvests"][16],),
            laws=("loss_vs_position",),
            params={"llama-w16": 1000},
            tokens_trained={str(w16): 5_000},
            split="holdout",
            **QUICK,
        ),
    )
    store = Store(root)
    run = store.forecast_table(given.id, "runs").collect().row(0, named=True)
    assert (run["n_params"], run["n_params_source"], run["n_params_total"]) == (1000, "given", None)
    assert run["tokens_trained"] == 5_000
    loss = np.asarray(store.activations(world["harvests"][16], "loss")[:], dtype=np.float64)
    holdout = (store.tokens(world["corpus"]).collect()["split"].cast(pl.String) == "holdout").to_numpy()[: len(loss)]
    chosen = np.isfinite(loss) & holdout
    assert 0 < chosen.sum() < np.isfinite(loss).sum()
    assert run["mean_loss"] == pytest.approx(loss[chosen].mean(), rel=1e-12) and run["tokens"] == chosen.sum()
    positions = store.forecast_table(given.id, "positions").collect().sort("pos")
    grid, mask = loss.reshape(-1, CTX), chosen.reshape(-1, CTX)
    expected = [grid[mask[:, p], p].mean() for p in positions["pos"].to_list()]
    np.testing.assert_allclose(positions["mean_loss"].to_numpy(), expected, rtol=1e-12)
    with pytest.raises(UserError, match=r"law loss_vs_params_tokens needs at least 5 .* found 2:") as err:
        forecast(
            root,
            ForecastConfig(
                laws=("loss_vs_params_tokens",), tokens_trained={"llama-w16": 10**6, "llama-w32": 2 * 10**6}
            ),
        )
    assert "\n" not in str(err.value)


def test_position_law_on_the_embedded_model_predicts_its_per_position_means(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    model = ModelConfig(name=str(embedded_default_gguf()))
    ctx, windows = 48, 24
    docs = write_text_corpus(tmp_path / "docs", 30)  # words from a small vocabulary: context teaches which
    corpus = ingest(
        root, CorpusConfig(source="text", paths=(str(docs),), tokenizer=model, ctx_len=ctx, max_tokens=ctx * windows)
    )
    made = harvest(root, HarvestConfig(corpus_id=corpus.id, model=model, sites=(SITE,), loss=True), RUNTIME)
    lines = demo_forecast(root, made.id)
    store = Store(root)
    manifest = forecast(root, ForecastConfig(harvest_ids=(made.id,), laws=("loss_vs_position",)))
    assert lines == forecast_lines(root, manifest)  # the demo's forecast, returned again rather than refitted
    assert any("loss_vs_position on" in line for line in lines) and any("(2x)" in line for line in lines)
    params = dict(store.forecast_table(manifest.id, "fits").collect().select("param", "estimate").iter_rows())
    grid = np.asarray(store.activations(made.id, "loss")[:], dtype=np.float64).reshape(-1, ctx)[:, 1:-1]
    context = np.arange(1, ctx - 1)  # position p sees p corpus tokens after BOS
    means, errors = grid.mean(axis=0), grid.std(axis=0, ddof=1) / np.sqrt(len(grid))
    predicted = params["E"] + params["A"] / context ** params["alpha"]
    # Tolerance from the noise of the windows: residuals no larger than the means' own standard errors.
    assert np.sqrt(np.mean((means - predicted) ** 2)) < 1.5 * np.sqrt(np.mean(errors**2))
    assert abs(np.mean(means - predicted)) < 3 * np.sqrt(np.mean(errors**2) / len(context))
    assert means[:4].mean() > means[-12:].mean() + 0.5 and params["alpha"] > 0  # context helps, and the law says so
    run = store.forecast_table(manifest.id, "runs").collect().row(0, named=True)
    loaded = cached_model(model, "cpu")  # the harvest's own copy, already in memory
    assert run["n_params_total"] == sum(p.numel() for p in loaded.parameters())
    forecasts = store.forecast_table(manifest.id, "forecasts").collect().sort("context")
    assert forecasts["context"].to_list() == [2.0 * ctx, 4.0 * ctx]
    assert (forecasts["point"] < predicted[-1]).all() and (forecasts["point"] > params["E"]).all()


def test_rerun_returns_the_same_manifest_and_changes_nothing(world: dict) -> None:
    before = snapshot(Path(world["root"]))
    again = forecast(world["root"], ForecastConfig(**QUICK))
    assert again == world["auto"]
    assert snapshot(Path(world["root"])) == before


def test_cli_arguments_build_the_config_and_print_the_forecast(world: dict, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")
    parser.add_argument("--json", action="store_true")
    add_forecast_args(parser)
    args = parser.parse_args(
        [
            "--store",
            world["root"],
            "--harvest",
            world["harvests"][16],
            "--law",
            "loss_vs_position",
            "--params",
            "llama-w16=1.2e3",
            "--target",
            "context=100",
            "--extrapolate",
            "3",
            "--n-boot",
            "50",
            "--level",
            "0.8",
        ]
    )
    config = config_from_args(args)
    assert config == ForecastConfig(
        harvest_ids=(world["harvests"][16],),
        laws=("loss_vs_position",),
        params={"llama-w16": 1200},
        targets=({"context": 100.0},),
        extrapolate=(3.0,),
        n_boot=50,
        level=0.8,
    )
    summary = cmd_forecast(args)
    out = capsys.readouterr().out
    assert summary["forecast_id"] in out and "at context=100:" in out and "at context=48 (3x):" in out
    assert summary["laws"][0]["status"] == "fitted"


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"laws": ("loss_vs_nothing",)}, "unknown law 'loss_vs_nothing'"),
        ({"targets": ({"width": 2.0},)}, "names ['width']"),
        ({"targets": ({"N": -1.0},)}, "non-positive"),
        ({"n_boot": 1}, "n_boot=1"),
        ({"level": 1.5}, "level=1.5"),
        ({"extrapolate": (0.0,)}, "extrapolate [0.0]"),
        ({"params": {"llama-w16": 0}}, "llama-w16"),
    ],
)
def test_bad_config_is_one_line(config: dict, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        ForecastConfig(**config)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_inputs_against_the_store_are_one_line_and_write_nothing(world: dict, tmp_path: Path) -> None:
    root = world["root"]
    without_loss = harvest(
        root,
        HarvestConfig(corpus_id=world["corpus"], model=ModelConfig(name=str(world["models"][16])), sites=(SITE,)),
        RUNTIME,
    ).id
    before = snapshot(Path(root))
    cases = [
        (ForecastConfig(harvest_ids=("harvest-missing-00000000",)), "harvest-missing-00000000"),
        (ForecastConfig(harvest_ids=(without_loss,)), "--loss"),
        (ForecastConfig(eval_ids=("eval-missing-00000000",)), "eval-missing-00000000"),
        (ForecastConfig(tokens_trained={"gpt-9": 10}), "tokens_trained names model 'gpt-9'"),
    ]
    for config, fragment in cases:
        with pytest.raises(UserError) as err:
            forecast(root, config)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    assert snapshot(Path(root)) == before
    with pytest.raises(UserError, match="nothing to forecast"):
        forecast(str(tmp_path / "empty"), ForecastConfig())
    parser = argparse.ArgumentParser()
    add_forecast_args(parser)
    for argv, fragment in (
        (["--params", "llama-w16"], "MODEL=COUNT"),
        (["--target", "N"], "VAR=VALUE"),
        (["--tokens-trained", "m=1.5"], "whole number"),
    ):
        with pytest.raises(UserError, match=fragment):
            config_from_args(parser.parse_args(argv))


def test_a_checkpoint_takes_its_own_count_before_its_model_s() -> None:
    counts = {"org/model@step1000": 1, "model": 2}
    assert lookup(counts, ModelConfig(name="org/model", revision="step1000")) == 1
    assert lookup(counts, ModelConfig(name="org/model", revision="step2000")) == 2  # by slug
    assert lookup(counts, ModelConfig(name="org/other")) is None


def test_a_model_whose_config_cannot_be_read_asks_for_its_count(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot count the parameters of model .*: pass --params ") as err:
        count_parameters(str(tmp_path))
    assert "\n" not in str(err.value)
