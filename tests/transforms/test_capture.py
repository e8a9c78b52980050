"""Site mapping and activation capture, checked against HF's own hidden states and hooks placed by hand.

Every family gets a tiny seeded random-weight model loaded from a local directory; the embedded SmolLM2-135M
is checked too. The expected module of each site is written out here independently of `transforms.sites`, and
`resid_post == resid_pre + attn_out + mlp_out` proves the branch sites are what is added to the stream.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, PreTrainedModel
from transformers.utils import ModelOutput

import actstore.transforms.capture as capture_module
from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelConfig
from actstore.transforms.capture import Capture, CaptureResult, first_nonfinite, truncated_forward
from actstore.transforms.models import load_model
from actstore.transforms.sites import SiteSpec, n_layers, resolve_sites, valid_site_names
from tests.tiny_models import FAMILY_CONFIGS, N_LAYERS, build_tiny_model, embedded_model, model_type

CPU = torch.device("cpu")
UNMAPPED = ("granite", "mamba")
MAPPED = tuple(f for f in FAMILY_CONFIGS if f not in UNMAPPED)

LAYERS = {"gpt2": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers", "mamba": "backbone.layers"}
SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm")
BRANCHES = {
    "gemma2": SANDWICH,
    "gemma3_text": SANDWICH,
    "olmo2": SANDWICH,
    "gpt2": ("attn", "mlp"),
    "gptj": ("attn", "mlp"),
    "gpt_neox": ("attention", "mlp"),
}
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def layers_path(family: str) -> str:
    return LAYERS.get(model_type(family), "model.layers")


def branch_paths(family: str, layer: int) -> tuple[str, str]:
    attn, mlp = BRANCHES.get(model_type(family), ("self_attn", "mlp"))
    prefix = f"{layers_path(family)}.{layer}"
    return f"{prefix}.{attn}", f"{prefix}.{mlp}"


@contextmanager
def recorded_outputs(model: torch.nn.Module, paths: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Hand-placed forward hooks: every output (first element of a tuple) of each module, in call order."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for path in paths:

        def hook(_m: torch.nn.Module, _a: object, out: object, path: str = path) -> None:
            seen[path].append((out[0] if isinstance(out, tuple) else out).detach().clone())

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def capture(model: torch.nn.Module, names: list[str], ids: torch.Tensor, loss: bool = False) -> CaptureResult:
    with Capture(model, resolve_sites(model, names), loss=loss) as cap:
        return cap(ids)


def reference(model: PreTrainedModel, ids: torch.Tensor) -> ModelOutput:
    with torch.inference_mode():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in FAMILY_CONFIGS}


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]) -> dict[str, PreTrainedModel]:
    return {family: load_model(ModelConfig(name=str(path)), CPU) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", MAPPED)
def test_every_site_matches_hf_hidden_states_and_hand_placed_hooks(
    family: str, tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny[family]
    assert n_layers(model) == N_LAYERS
    names = valid_site_names(model)
    assert len(names) == 4 * N_LAYERS
    result = capture(model, names, ids)
    branches = [p for layer in range(N_LAYERS) for p in branch_paths(family, layer)]
    last_layer = f"{layers_path(family)}.{N_LAYERS - 1}"
    with recorded_outputs(model, [*branches, last_layer]) as hooked:
        hidden = reference(model, ids).hidden_states
    for layer in range(N_LAYERS):
        acts = {
            hook: result.acts[f"blocks.{layer}.hook_{hook}"]
            for hook in ("resid_pre", "resid_post", "attn_out", "mlp_out")
        }
        assert all(a.dtype == torch.float32 and a.is_contiguous() and a.shape == (18, 32) for a in acts.values())
        assert torch.equal(acts["resid_pre"], flat(hidden[layer]))
        # The last entry of hidden_states has the final norm applied, so the last layer is checked by a hook.
        post = hooked[last_layer][0] if layer == N_LAYERS - 1 else hidden[layer + 1]
        assert torch.equal(acts["resid_post"], flat(post))
        attn, mlp = branch_paths(family, layer)
        assert torch.equal(acts["attn_out"], flat(hooked[attn][0]))
        assert torch.equal(acts["mlp_out"], flat(hooked[mlp][0]))
        torch.testing.assert_close(
            acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"],
            acts["resid_post"],
            rtol=1e-5,
            atol=1e-5 * float(acts["resid_post"].abs().max()),
        )


@pytest.mark.parametrize("family", MAPPED)
def test_several_sites_in_one_pass_equal_single_site_passes(
    family: str, tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny[family]
    names = ["blocks.2.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_resid_pre"]
    together = capture(model, names, ids)
    assert list(together.acts) == names
    for name in names:
        assert torch.equal(together.acts[name], capture(model, [name], ids).acts[name])


@pytest.mark.parametrize("family", MAPPED)
def test_loss_is_next_token_cross_entropy_with_nan_at_the_last_position(
    family: str, tiny: dict[str, PreTrainedModel], ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny[family]
    # Five tokens' logits per float32 slice, so the sliced path is the one under test.
    monkeypatch.setattr(capture_module, "LOSS_CHUNK_ELEMENTS", 5 * model.config.vocab_size)
    result = capture(model, ["blocks.1.hook_resid_post"], ids, loss=True)
    logits = reference(model, ids).logits.float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    assert result.loss is not None and result.loss.dtype == torch.float32 and result.loss.shape == (18,)
    per_row = result.loss.view(2, 9)
    assert per_row[:, -1].isnan().all()
    torch.testing.assert_close(per_row[:, :-1].reshape(-1), expected)


def test_loss_only_capture_has_no_activations(tiny: dict[str, PreTrainedModel], ids: torch.Tensor) -> None:
    with Capture(tiny["llama"], [], loss=True) as cap:
        result = cap(ids)
    assert result.acts == {} and result.loss is not None and result.loss.isfinite().sum() == 16


@pytest.mark.parametrize(
    ("site", "loss", "later_runs"),
    [
        ("blocks.1.hook_resid_post", False, False),
        ("blocks.2.hook_resid_pre", False, False),
        ("blocks.1.hook_resid_post", True, True),
    ],
)
def test_early_stop_skips_the_layers_after_the_deepest_site(
    site: str, loss: bool, later_runs: bool, tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny["llama"]
    with recorded_outputs(model, ["model.layers.2", "model.layers.2.self_attn", "lm_head"]) as hooked:
        capture(model, [site], ids, loss=loss)
    assert all(len(calls) == int(later_runs) for calls in hooked.values())


def test_hooks_record_only_during_a_call_and_close_removes_them(
    tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny["gpt2"]
    modules = list(model.modules())
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    cap = Capture(model, resolve_sites(model, ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"]), loss=False)
    hidden = reference(model, ids).hidden_states  # a forward outside a call: the hooks must stay quiet
    assert torch.equal(cap(ids).acts["blocks.1.hook_resid_pre"], flat(hidden[1]))
    cap.close()
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == before


@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", "bfloat16"), ("llama", "float16"), ("gpt2", "bfloat16"), ("gemma2", "float16")]
)
def test_half_precision_models_capture_in_their_own_dtype(
    family: str, dtype: str, tiny_dirs: dict[str, Path], ids: torch.Tensor
) -> None:
    model = load_model(ModelConfig(name=str(tiny_dirs[family]), dtype=dtype), CPU)
    result = capture(model, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], ids, loss=True)
    assert all(a.dtype == getattr(torch, dtype) for a in result.acts.values())
    assert torch.equal(result.acts["blocks.0.hook_resid_post"], flat(reference(model, ids).hidden_states[1]))
    assert result.loss is not None and result.loss.dtype == torch.float32
    assert result.loss.view(2, 9)[:, :-1].isfinite().all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_raw_module_paths_capture_that_module_output(
    family: str, tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny[family]
    inner = "model.layers.1.mlp.down_proj" if family == "llama" else "transformer.h.1.attn.c_proj"
    embed = "model.embed_tokens" if family == "llama" else "transformer.wte"
    specs = resolve_sites(model, [inner, "lm_head", embed])
    assert specs == [
        SiteSpec(inner, inner, "output", 1, 32),
        SiteSpec("lm_head", "lm_head", "output", N_LAYERS, model.config.vocab_size),
        SiteSpec(embed, embed, "output", -1, 32),
    ]
    with Capture(model, specs, loss=False) as cap:
        result = cap(ids)
    with recorded_outputs(model, [inner, "lm_head", embed]) as hooked:
        reference(model, ids)
    for path in (inner, "lm_head", embed):
        assert torch.equal(result.acts[path], flat(hooked[path][0]))


def test_unknown_site_lists_the_valid_sites_in_one_line(tiny: dict[str, PreTrainedModel]) -> None:
    with pytest.raises(UserError) as err:
        resolve_sites(tiny["llama"], ["blocks.99.hook_resid_post"])
    assert str(err.value) == (
        "unknown site 'blocks.99.hook_resid_post' for llama with 3 layers: valid sites are "
        "blocks.0-2.hook_{resid_pre,resid_post,attn_out,mlp_out} or a module path such as "
        "model.layers.2.mlp"
    )
    with pytest.raises(UserError, match=r"^site 'blocks.0.hook_mlp_out' is listed twice"):
        resolve_sites(tiny["llama"], ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.0.hook_mlp_out"])
    for bad in ["model.layers.1.nonexistent", "", "blocks.1.hook_resid_mid"]:
        with pytest.raises(UserError, match=r"^unknown site .*valid sites are blocks\.0-2\.hook_"):
            resolve_sites(tiny["gpt2"], [bad])


def test_modules_that_cannot_be_stored_per_token_are_refused(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(ModelConfig(name=str(tiny_dirs["llama"])), CPU)
    with pytest.raises(UserError, match=r"^site 'model.rotary_emb': the module's output has shape"):
        resolve_sites(model, ["model.rotary_emb"])
    with pytest.raises(UserError, match=r"^site 'model.layers': the module runs 0 times"):
        resolve_sites(model, ["model.layers"])
    # A module shared by two layers runs twice per forward: which call to store would be a guess.
    model.model.layers[1].mlp.act_fn = model.model.layers[0].mlp.act_fn
    with pytest.raises(UserError, match=r"^site 'model.layers.0.mlp.act_fn': the module runs 2 times"):
        resolve_sites(model, ["model.layers.0.mlp.act_fn"])


def test_families_without_branch_mapping_offer_the_residual_stream(
    tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    granite, mamba = tiny["granite"], tiny["mamba"]
    assert valid_site_names(granite) == [f"blocks.{i}.hook_{h}" for i in range(3) for h in ("resid_pre", "resid_post")]
    with pytest.raises(UserError, match=r"blocks\.0-2\.hook_\{resid_pre,resid_post\} or a module path"):
        resolve_sites(granite, ["blocks.0.hook_attn_out"])
    result = capture(granite, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], ids)
    hidden = reference(granite, ids).hidden_states
    assert torch.equal(result.acts["blocks.1.hook_resid_pre"], flat(hidden[1]))
    assert torch.equal(result.acts["blocks.1.hook_resid_post"], flat(hidden[2]))
    # Mamba keeps its layers at backbone.layers (found by search) and lists only layer outputs as hidden states.
    result = capture(mamba, ["blocks.1.hook_resid_post"], ids)
    assert torch.equal(result.acts["blocks.1.hook_resid_post"], flat(reference(mamba, ids).hidden_states[1]))


def test_a_model_without_decoder_layers_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model.config = LlamaConfig(num_hidden_layers=3, hidden_size=4, num_attention_heads=1, vocab_size=10)  # type: ignore[assignment]
    with pytest.raises(UserError, match=r"^cannot find the decoder layers of model type 'llama'"):
        resolve_sites(model, ["blocks.0.hook_resid_post"])


def test_first_nonfinite_points_at_the_first_bad_row(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(ModelConfig(name=str(tiny_dirs["llama"])), CPU)
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    ids = torch.full((2, 9), 3)
    assert first_nonfinite(capture(model, names, ids)) is None
    model.model.embed_tokens.weight[7] = float("inf")
    ids[1, 4] = 7  # flat row 13
    result = capture(model, names, ids)
    assert result.acts["blocks.0.hook_resid_pre"].isfinite().all(dim=1).tolist() == [i != 13 for i in range(18)]
    assert first_nonfinite(result) == ("blocks.0.hook_resid_pre", 13)
    # Site order decides: the later layer is already non-finite in row 9 (masked attention weights of 0 times an
    # inf value give NaN), and it comes first here.
    result = CaptureResult(
        {
            "blocks.1.hook_resid_post": result.acts["blocks.1.hook_resid_post"],
            "blocks.0.hook_resid_pre": result.acts["blocks.0.hook_resid_pre"],
        },
        None,
    )
    assert first_nonfinite(result) == ("blocks.1.hook_resid_post", 9)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_truncated_forward_runs_only_the_first_blocks(
    family: str, tiny: dict[str, PreTrainedModel], ids: torch.Tensor
) -> None:
    model = tiny[family]
    layers = model.get_submodule(layers_path(family))
    norm = model.get_submodule(FINAL_NORM.get(family, "model.norm"))
    with recorded_outputs(model, [f"{layers_path(family)}.2"]) as hooked:
        out = truncated_forward(model, ids, 2)
    assert hooked[f"{layers_path(family)}.2"] == []
    assert model.get_submodule(layers_path(family)) is layers and len(layers) == N_LAYERS
    with torch.inference_mode():
        assert torch.equal(out, norm(reference(model, ids).hidden_states[2]))


def test_input_validation(tiny: dict[str, PreTrainedModel]) -> None:
    with pytest.raises(ValueError, match="at least one site"):
        Capture(tiny["llama"], [], loss=False)
    specs = resolve_sites(tiny["llama"], ["blocks.0.hook_resid_post"])
    with Capture(tiny["llama"], specs, loss=False) as cap, pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        cap(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_blocks"):
        truncated_forward(tiny["llama"], torch.zeros(1, 3, dtype=torch.long), 4)


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedModel:
    return embedded_model()


def test_embedded_smollm2_sites_match_hf(smollm2: PreTrainedModel) -> None:
    model = smollm2
    assert model.config.model_type == "llama" and n_layers(model) == 30
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    layers = (0, 14, 29)
    names = [
        f"blocks.{layer}.hook_{hook}" for layer in layers for hook in ("resid_pre", "resid_post", "attn_out", "mlp_out")
    ]
    result = capture(model, names, ids, loss=True)
    hooked_paths = [p for layer in layers for p in branch_paths("llama", layer)] + ["model.layers.29"]
    with recorded_outputs(model, hooked_paths) as hooked:
        out = reference(model, ids)
    for layer in layers:
        acts = {
            hook: result.acts[f"blocks.{layer}.hook_{hook}"]
            for hook in ("resid_pre", "resid_post", "attn_out", "mlp_out")
        }
        assert torch.equal(acts["resid_pre"], flat(out.hidden_states[layer]))
        post = hooked["model.layers.29"][0] if layer == 29 else out.hidden_states[layer + 1]
        assert torch.equal(acts["resid_post"], flat(post))
        attn, mlp = branch_paths("llama", layer)
        assert torch.equal(acts["attn_out"], flat(hooked[attn][0]))
        assert torch.equal(acts["mlp_out"], flat(hooked[mlp][0]))
        torch.testing.assert_close(
            acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"], acts["resid_post"], rtol=1e-5, atol=1e-4
        )
    expected = F.cross_entropy(
        out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    assert result.loss is not None and result.loss.view(2, 12)[:, -1].isnan().all()
    torch.testing.assert_close(result.loss.view(2, 12)[:, :-1].reshape(-1), expected)


def test_embedded_smollm2_early_stop(smollm2: PreTrainedModel) -> None:
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with recorded_outputs(smollm2, ["model.layers.6", "model.layers.5"]) as hooked:
        result = capture(smollm2, ["blocks.5.hook_resid_post"], ids)
    assert hooked["model.layers.6"] == [] and torch.equal(
        result.acts["blocks.5.hook_resid_post"], flat(hooked["model.layers.5"][0])
    )
