"""Model controls: seeded and deterministic (also in a fresh process), architecture kept, each kind has the
statistics it promises, ties kept, ids distinct from the trained model's (and unchanged for it), and a harvest of a
control stores the control's activations."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig, ModelControl
from actstore.store.root import Store
from actstore.transforms.models import load_model
from tests.helpers import ROOT, write_text_corpus
from tests.tiny_models import FAMILY_CONFIGS, build_tiny_model, tiny_tokenizer

CPU = torch.device("cpu")
CONTROLS = [ModelControl(kind="reinit"), ModelControl(kind="permute"), ModelControl(kind="perturb", scale=0.05)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("controls")
    tied = base / "llama-tied"
    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=special,
        eos_token_id=special,
        tie_word_embeddings=True,
        **FAMILY_CONFIGS["llama"],
    )
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    tokenizer.save_pretrained(tied)
    return {
        "llama": build_tiny_model("llama", base / "llama"),
        "gpt2": build_tiny_model("gpt2", base / "gpt2"),
        "tied": tied,
        "base": base,
    }


def weights(directory: Path, control: ModelControl | None = None, dtype: str = "auto") -> dict[str, torch.Tensor]:
    model = load_model(ModelConfig(name=str(directory), control=control, dtype=dtype), CPU)  # type: ignore[arg-type]
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].float().numpy().tobytes())
    return h.hexdigest()


# --- ids ------------------------------------------------------------------------------------------------------


def test_ids_without_a_control_are_unchanged_and_a_control_changes_them() -> None:
    # These strings were computed before ModelConfig had a control field.
    base = HarvestConfig(corpus_id="corpus-x", sites=("blocks.6.hook_resid_post",))
    assert base.harvest_id() == "harvest-smollm2-135m-L6-40d19fdf"
    other = HarvestConfig(
        corpus_id="corpus-x",
        model=ModelConfig(name="org/m", dtype="float32"),
        sites=("blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"),
        loss=True,
    )
    assert other.harvest_id() == "harvest-m-L0-1-1b2bb291"
    assert "control" not in base.model_dump(mode="json")["model"]

    ids = {base.harvest_id()}
    for control in [
        *CONTROLS,
        ModelControl(kind="reinit", seed=1),
        ModelControl(kind="perturb", scale=0.1),
        ModelControl(kind="reinit", keep_embeddings=True),
    ]:
        config = base.model_copy(update={"model": ModelConfig(control=control)})
        ids.add(config.harvest_id())
        assert HarvestConfig.model_validate(config.model_dump(mode="json")) == config
    assert len(ids) == 7
    model = ModelConfig(control=ModelControl(kind="reinit"))
    assert model.short_name() == "smollm2-135m-reinit-s0"
    assert base.model_copy(update={"model": model}).harvest_id().startswith("harvest-smollm2-135m-reinit-s0-L6-")
    assert (
        ModelConfig(control=ModelControl(kind="perturb", scale=0.05, seed=2)).short_name()
        == "smollm2-135m-perturb-0-05-s2"
    )
    assert model.label() == "smollm2-135m+reinit-s0" and ModelConfig().label() == "smollm2-135m"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"kind": "perturb"}, "--control-scale 0.05"),
        ({"kind": "perturb", "scale": 0.0}, "scale > 0"),
        ({"kind": "perturb", "scale": -1.0}, "scale > 0"),
        ({"kind": "reinit", "scale": 0.1}, "drop --control-scale"),
    ],
)
def test_bad_control_scale_is_a_one_line_user_error(fields: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle) as info:
        ModelControl(**fields)
    assert "\n" not in str(info.value)


# --- determinism and shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: c.kind)
def test_control_is_deterministic_and_seeded(models: dict, control: ModelControl) -> None:
    first, second = weights(models["llama"], control), weights(models["llama"], control)
    assert all(torch.equal(first[k], second[k]) for k in first)
    reseeded = weights(models["llama"], control.model_copy(update={"seed": 1}))
    trained = weights(models["llama"])
    for name, value in first.items():  # constant tensors (norms reset to ones) cannot differ
        if len(torch.unique(value)) > 1:
            assert not torch.equal(value, reseeded[name]), name
        if len(torch.unique(trained[name])) > 1:
            assert not torch.equal(value, trained[name]), name


def test_reinit_is_the_same_in_a_fresh_process(models: dict) -> None:
    control = ModelControl(kind="reinit", seed=3)
    code = (
        "import hashlib, sys, torch\n"
        "from actstore.schemas.model import ModelConfig, ModelControl\n"
        "from actstore.transforms.models import load_model\n"
        f"m = load_model(ModelConfig(name={str(models['llama'])!r}, control=ModelControl(kind='reinit', seed=3)),"
        " torch.device('cpu'))\n"
        "h = hashlib.sha256()\n"
        "for name, p in sorted(m.named_parameters()):\n"
        "    h.update(name.encode()); h.update(p.detach().float().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    torch.manual_seed(12345)  # the caller's RNG state must not matter, and must not be consumed
    state = torch.get_rng_state()
    here = digest(weights(models["llama"], control))
    assert torch.equal(torch.get_rng_state(), state)
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert there.stdout.strip().splitlines()[-1] == here


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: c.kind)
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_architecture_shapes_and_dtypes_are_kept(models: dict, control: ModelControl, dtype: str) -> None:
    trained = load_model(ModelConfig(name=str(models["gpt2"]), dtype=dtype), CPU)  # type: ignore[arg-type]
    changed = load_model(ModelConfig(name=str(models["gpt2"]), dtype=dtype, control=control), CPU)  # type: ignore[arg-type]
    assert type(changed) is type(trained) and str(changed) == str(trained)
    assert not changed.training and not any(p.requires_grad for p in changed.parameters())
    ours = {n: (p.shape, p.dtype, p.device) for n, p in changed.named_parameters()}
    assert ours == {n: (p.shape, p.dtype, p.device) for n, p in trained.named_parameters()}
    assert all(torch.isfinite(p).all() for p in changed.parameters())


# --- statistics of each kind ----------------------------------------------------------------------------------


def test_reinit_draws_from_the_models_own_init(models: dict) -> None:
    model = load_model(ModelConfig(name=str(models["llama"]), control=ModelControl(kind="reinit")), CPU)
    std = model.config.initializer_range
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * 3 + 1  # q k v o gate up down per layer, and the unembedding
    for module in linears:
        w = module.weight.detach().double().numpy()
        # sample std of n normal draws is within a few 1/sqrt(2n) relative of the true one
        assert abs(w.std() / std - 1) < 5 / np.sqrt(2 * w.size) + 0.01
        assert abs(w.mean()) < 5 * std / np.sqrt(w.size)
    embedding = model.get_input_embeddings().weight.detach().double().numpy()
    assert abs(embedding.std() / std - 1) < 0.05
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)

    gpt2 = load_model(ModelConfig(name=str(models["gpt2"]), control=ModelControl(kind="reinit")), CPU)
    scaled = gpt2.transformer.h[0].attn.c_proj.weight.detach().double().numpy()  # GPT-2's 1/sqrt(2 n_layer)
    assert abs(scaled.std() / (gpt2.config.initializer_range / np.sqrt(2 * gpt2.config.n_layer)) - 1) < 0.1
    assert torch.equal(gpt2.transformer.h[0].attn.c_attn.bias, torch.zeros_like(gpt2.transformer.h[0].attn.c_attn.bias))


def test_permute_keeps_every_tensors_values(models: dict) -> None:
    trained = weights(models["llama"])
    permuted = weights(models["llama"], ModelControl(kind="permute", seed=4))
    for name, value in trained.items():
        assert torch.equal(torch.sort(permuted[name].flatten()).values, torch.sort(value.flatten()).values), name
        if value.numel() > 100:
            assert (permuted[name] == value).double().mean() < 0.05, name


def test_perturb_is_close_at_the_given_scale(models: dict) -> None:
    trained = weights(models["llama"])
    for scale in (0.01, 0.2):
        perturbed = weights(models["llama"], ModelControl(kind="perturb", scale=scale))
        for name, value in trained.items():
            noise = (perturbed[name] - value).double()
            assert abs(noise.std().item() / (scale * value.double().std(correction=0).item()) - 1) < 0.2, name
            if value.ndim == 2:  # weight matrices: mean ~0, so relative Frobenius distance ~ scale
                relative = (noise.norm() / value.double().norm()).item()
                assert abs(relative / scale - 1) < 0.1, (name, relative)


@pytest.mark.parametrize(
    "control",
    [*CONTROLS, ModelControl(kind="reinit", keep_embeddings=True)],
    ids=["reinit", "permute", "perturb", "reinit-keepemb"],
)
def test_tied_embeddings_stay_tied(models: dict, control: ModelControl) -> None:
    trained = load_model(ModelConfig(name=str(models["tied"])), CPU)
    model = load_model(ModelConfig(name=str(models["tied"]), control=control), CPU)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    same = torch.equal(model.get_input_embeddings().weight, trained.get_input_embeddings().weight)
    assert same == control.keep_embeddings


def test_keep_embeddings_changes_everything_else(models: dict) -> None:
    trained = weights(models["llama"])
    for kind, scale in (("reinit", None), ("permute", None), ("perturb", 0.1)):
        kept = weights(models["llama"], ModelControl(kind=kind, scale=scale, keep_embeddings=True))  # type: ignore[arg-type]
        embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
        for name, value in trained.items():
            if name in embeddings:
                assert torch.equal(kept[name], value), name
            elif len(torch.unique(value)) > 1:
                assert not torch.equal(kept[name], value), name


# --- through a harvest ----------------------------------------------------------------------------------------


def test_harvest_of_a_control_stores_the_controls_activations(models: dict) -> None:
    base = models["base"]
    root = base / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 8)),),
            tokenizer=ModelConfig(name=str(models["llama"])),
            ctx_len=16,
            max_tokens=256,
        ),
    )
    site = "blocks.1.hook_resid_post"
    runtime = HarvestRuntime(progress=False, device="cpu")
    manifests = {}
    for name, control in (
        ("trained", None),
        ("reinit", ModelControl(kind="reinit")),
        ("perturb", ModelControl(kind="perturb", scale=0.05)),
    ):
        config = HarvestConfig(
            corpus_id=corpus.id,
            model=ModelConfig(name=str(models["llama"]), control=control),
            sites=(site,),
            batch_windows=4,
        )
        manifests[name] = harvest(str(root), config, runtime)
    store = Store(root)
    assert len({m.id for m in manifests.values()}) == 3
    assert "-reinit-s0-L1-" in manifests["reinit"].id
    assert manifests["reinit"].config["model"]["control"]["kind"] == "reinit"
    assert "control" not in manifests["trained"].config["model"]
    acts = {name: store.activations(m.id, site)[:] for name, m in manifests.items()}
    assert not np.allclose(acts["trained"], acts["reinit"], atol=1e-3)
    assert not np.array_equal(acts["trained"], acts["perturb"])

    # the stored rows are the control model's residual stream, computed independently by HF
    ids = torch.tensor(store.tokens(corpus.id).select("token_id").collect()["token_id"].to_numpy()[:256])
    for name in ("reinit", "perturb"):
        control = ModelControl.model_validate(manifests[name].config["model"]["control"])
        model = load_model(ModelConfig(name=str(models["llama"]), control=control), CPU)
        with torch.no_grad():
            hidden = model(ids.reshape(-1, 16).long(), output_hidden_states=True).hidden_states[2]
        np.testing.assert_allclose(acts[name], hidden.reshape(-1, hidden.shape[-1]).numpy(), rtol=1e-4, atol=1e-4)
