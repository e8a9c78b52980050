"""SAE encoders and checkpoint loaders, checked against SAELens itself and against numpy re-derivations.

Three independent references: SAELens' own SAE classes reading the same directories (what "SAELens
compatible" means), SAELens' own writers (what we must read), and float64 numpy implementations of the
documented equations written here without calling actstore (ties, zero rows, sparsify and Gemma Scope).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sae_lens import SAE as LensSAE
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

from actstore.schemas.errors import UserError
from actstore.schemas.sae import SAEConfig
from actstore.transforms.sae import SAE, check_compatible, load, save

D_IN, D_SAE, K = 16, 64, 5
SITE, MODEL = "blocks.3.hook_resid_post", "HuggingFaceTB/SmolLM2-135M"

# (architecture, extra config) pairs that cover every branch of encode/decode.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("standard", {}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("batchtopk", {"k": 3.5}),
    ("gated", {}),
]
VARIANT_IDS = [f"{arch}-{'-'.join(map(str, extra.values())) or 'plain'}" for arch, extra in VARIANTS]
NORMALIZATIONS = ["none", "expected_average_only_in", "constant_norm_rescale"]
SCALING_FACTOR = 0.37


def random_weights(arch: str, seed: int, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """Random SAELens-named weights; decoder rows of uneven norm so norm rescaling matters."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    uneven = torch.rand(d_sae, 1, generator=g)
    w = {"W_enc": rand(d_in, d_sae) / d_in**0.5, "W_dec": rand(d_sae, d_in) * uneven, "b_dec": 0.3 * rand(d_in)}
    if arch == "gated":
        return w | {"b_gate": 0.2 * rand(d_sae), "r_mag": 0.3 * rand(d_sae), "b_mag": 0.2 * rand(d_sae)}
    w["b_enc"] = 0.2 * rand(d_sae)
    if arch in ("jumprelu", "batchtopk"):
        per_latent = arch == "jumprelu"  # batchtopk: one global threshold
        w["threshold"] = 0.4 * torch.rand(d_sae, generator=g) if per_latent else torch.full((d_sae,), 0.25)
    return w


def make_sae(arch: str, extra: dict[str, Any], normalize: str = "none", seed: int = 0) -> SAE:
    cfg = SAEConfig(
        architecture=arch,
        d_in=D_IN,
        d_sae=D_SAE,
        normalize_activations=normalize,  # type: ignore[arg-type]
        scaling_factor=SCALING_FACTOR if normalize == "expected_average_only_in" else None,
        hook_name=SITE,
        model_name=MODEL,
        metadata={"sae_id": f"sae-test-{arch}"},
        **extra,
    )
    return SAE(cfg, random_weights(arch, seed))


def activations(seed: int, n: int = 40) -> torch.Tensor:
    """Rows at several scales plus an all-zero row (padding positions and the like)."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, D_IN, generator=g) * torch.logspace(-1, 1, n).unsqueeze(-1)
    x[7] = 0.0
    return x


def ref_encode(w: dict[str, np.ndarray], cfg: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """SAELens' documented equations in float64; topk ties go to the lower latent index."""
    d_in = x.shape[-1]
    if cfg.get("normalize_activations") == "expected_average_only_in":
        x = x * cfg["scaling_factor"]
    elif cfg.get("normalize_activations") == "constant_norm_rescale":
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        x = np.divide(x * np.sqrt(d_in), norm, out=np.zeros_like(x), where=norm > 0)
    if cfg.get("apply_b_dec_to_input", True):
        x = x - w["b_dec"]
    if cfg["architecture"] == "gated":
        gate = (x @ w["W_enc"] + w["b_gate"]) > 0
        return gate * np.maximum(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0.0)
    pre = x @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        return np.maximum(pre, 0.0)
    if cfg["architecture"] == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * np.linalg.norm(w["W_dec"], axis=-1)
        out = np.zeros_like(pre)
        for row in range(pre.shape[0]):
            top = np.argsort(-pre[row], kind="stable")[: cfg["k"]]
            out[row, top] = np.maximum(pre[row, top], 0.0)
        return out
    return np.where(pre > w["threshold"], np.maximum(pre, 0.0), 0.0)


def ref_decode(w: dict[str, np.ndarray], cfg: dict[str, Any], f: np.ndarray, x: np.ndarray) -> np.ndarray:
    if cfg.get("rescale_acts_by_decoder_norm"):
        f = f / np.linalg.norm(w["W_dec"], axis=-1)
    out = f @ w["W_dec"] + w["b_dec"]
    if cfg.get("normalize_activations") == "expected_average_only_in":
        return out / cfg["scaling_factor"]
    if cfg.get("normalize_activations") == "constant_norm_rescale":
        return out * np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(x.shape[-1])
    return out


def as_numpy(sae: SAE) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return {n: p.detach().double().numpy() for n, p in sae.named_parameters()}, sae.config.model_dump()


def single_line_error(excinfo: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize(("arch", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_encode_decode_match_numpy_equations(arch: str, extra: dict[str, Any], normalize: str) -> None:
    sae = make_sae(arch, extra, normalize, seed=len(arch))
    x = activations(len(arch))
    w, cfg = as_numpy(sae)
    want_f = ref_encode(w, cfg, x.double().numpy())
    f = sae.encode(x)
    assert f.shape == (x.shape[0], D_SAE) and f.dtype == torch.float32
    np.testing.assert_array_equal(f.numpy() > 0, want_f > 0)
    np.testing.assert_allclose(f.numpy(), want_f, rtol=1e-5, atol=1e-5)
    want_x_hat = ref_decode(w, cfg, want_f, x.double().numpy())
    np.testing.assert_allclose(sae(x).numpy(), want_x_hat, rtol=1e-4, atol=1e-4)
    if arch == "topk":
        assert (f > 0).sum(dim=-1).max() <= K
    if normalize == "constant_norm_rescale":
        assert torch.all(sae(x)[7] == 0)  # a zero row reconstructs to zero, not NaN as in SAELens
        with pytest.raises(ValueError, match="x_norm"):
            sae.decode(f)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize(("arch", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_saelens_reads_what_we_save(tmp_path: Path, arch: str, extra: dict[str, Any], normalize: str) -> None:
    sae = make_sae(arch, extra, normalize, seed=3)
    save(sae, tmp_path)
    lens = LensSAE.load_from_disk(tmp_path)
    assert lens.cfg.metadata.hook_name == SITE and lens.cfg.metadata.model_name == MODEL
    x = activations(3)
    nonzero = x.norm(dim=-1) > 0  # SAELens turns zero rows into NaN under constant_norm_rescale
    # SAELens leaves this factor to its ActivationScaler: inputs times it before the SAE, outputs divided.
    factor = SCALING_FACTOR if normalize == "expected_average_only_in" else 1.0
    with torch.no_grad():
        lens_f = lens.encode(x * factor)
        lens_x_hat = lens.decode(lens_f) / factor
    f = sae.encode(x)
    torch.testing.assert_close(f[nonzero], lens_f[nonzero], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x)[nonzero], lens_x_hat[nonzero], rtol=1e-4, atol=1e-4)


LENS_CLASSES = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": K}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
}


@pytest.mark.parametrize("arch", LENS_CLASSES)
def test_we_read_what_saelens_saves(tmp_path: Path, arch: str) -> None:
    sae_cls, cfg_cls, extra = LENS_CLASSES[arch]
    lens = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=SITE, model_name="gpt2"), **extra))
    lens.load_state_dict(random_weights(arch, seed=11))
    lens.save_model(tmp_path)
    ours = load(tmp_path)
    assert (ours.architecture, ours.hook_name, ours.model_name) == (arch, SITE, "gpt2")
    x = activations(11)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), lens.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), lens(x), rtol=1e-4, atol=1e-4)


def test_batchtopk_training_checkpoint_matches_saelens_inference_conversion(tmp_path: Path) -> None:
    trainer_sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    assert trainer_sae.cfg.rescale_acts_by_decoder_norm  # the case where SAELens folds norms on export
    weights = random_weights("topk", seed=5)
    trainer_sae.load_state_dict(weights | {"topk_threshold": torch.tensor(0.3, dtype=torch.float64)})
    trainer_sae.save_model(tmp_path / "training")
    trainer_sae.save_inference_model(tmp_path / "inference")
    ours = load(tmp_path / "training")
    lens = LensSAE.load_from_disk(tmp_path / "inference")
    assert isinstance(lens, JumpReLUSAE) and ours.architecture == "batchtopk" and ours.config.k == K
    assert load(tmp_path / "inference").architecture == "batchtopk"  # recognised from SAELens' metadata
    x = activations(5)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), lens.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), lens(x), rtol=1e-5, atol=1e-5)


def write_dir(path: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(weights, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_reads_older_saelens_checkpoints(tmp_path: Path) -> None:
    """Pre-6.0 configs (hook_point, activation_fn_str, bool normalize) and tensors SAELens converts."""
    old = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "hook_point": SITE,
        "model_name": "gpt2",
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
    }
    topk_cfg = old | {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
    topk_dir = write_dir(tmp_path / "topk", topk_cfg, random_weights("topk", seed=8))
    ours, lens = load(topk_dir), LensSAE.load_from_disk(topk_dir)
    assert (ours.architecture, ours.config.k, ours.hook_name) == ("topk", K, SITE)
    assert isinstance(lens, TopKSAE)
    x = activations(8)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), lens.encode(x))

    w = random_weights("jumprelu", seed=9)
    log_w = {n: t for n, t in w.items() if n != "threshold"} | {"log_threshold": w["threshold"].log()}
    jump = load(write_dir(tmp_path / "jump", old | {"architecture": "jumprelu"}, log_w))
    wn = {n: t.double().numpy() for n, t in w.items()}
    want = ref_encode(wn, {"architecture": "jumprelu"}, x.double().numpy())
    np.testing.assert_allclose(jump.encode(x).numpy(), want, rtol=1e-5, atol=1e-5)

    w = random_weights("standard", seed=10)
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(10)) + 0.5
    tuned_cfg = old | {"finetuning_scaling_factor": True}
    tuned = load(write_dir(tmp_path / "tuned", tuned_cfg, w | {"scaling_factor": scale}))
    wn = {n: t.double().numpy() for n, t in w.items()}
    f = ref_encode(wn, {"architecture": "standard"}, x.double().numpy())
    np.testing.assert_allclose(tuned.encode(x).numpy(), f, rtol=1e-5, atol=1e-5)
    # The old finetuning scale multiplied the latents before W_dec.
    np.testing.assert_allclose(
        tuned(x).numpy(), (f * scale.double().numpy()) @ wn["W_dec"] + wn["b_dec"], rtol=1e-4, atol=1e-4
    )


def test_topk_ties_go_to_lower_latent_index() -> None:
    """Exact ties (integer-valued weights and inputs make every sum exact) at and across the k boundary."""
    g = torch.Generator().manual_seed(7)
    d_sae, k = 12, 4
    w_enc = torch.randint(-4, 5, (D_IN, 4), generator=g).float() / 8
    w = {
        "W_enc": w_enc.repeat(1, 3),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(D_IN),
        "W_dec": torch.randn(d_sae, D_IN, generator=g),
    }
    sae = SAE(SAEConfig(architecture="topk", d_in=D_IN, d_sae=d_sae, k=k), w)
    x = torch.randint(-3, 4, (64, D_IN), generator=g).float()
    x[0] = 0.0  # every pre-activation ties at zero
    f = sae.encode(x)
    wn, cfg = as_numpy(sae)
    np.testing.assert_array_equal(f.numpy(), ref_encode(wn, cfg, x.double().numpy()))
    assert torch.equal(sae.encode(x[:, None, :])[:, 0], f)  # extra batch dims change nothing


@pytest.mark.parametrize(("arch", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_save_then_load_is_exact(tmp_path: Path, arch: str, extra: dict[str, Any]) -> None:
    sae = make_sae(arch, extra, "expected_average_only_in").to(torch.bfloat16)
    save(sae, tmp_path)
    back = load(tmp_path)
    assert back.config == sae.config and back.config.dtype == "bfloat16"
    assert back.state_dict().keys() == sae.state_dict().keys()
    assert all(torch.equal(back.state_dict()[n], t) for n, t in sae.state_dict().items())
    x = activations(1)
    assert torch.equal(back.encode(x), sae.encode(x))
    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg_json["actstore"]["sae_id"] == f"sae-test-{arch}"
    assert json.loads((tmp_path / "activation_scaler.json").read_text())["scaling_factor"] == SCALING_FACTOR


def test_load_casts_and_moves() -> None:
    sae = make_sae("topk", {"k": K})
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.dtype) == (D_IN, D_SAE, "topk", torch.float32)
    half = sae.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.config.dtype == "float16" and half.device.type == "cpu"
    assert half.encode(activations(0)).dtype == torch.float16


def sparsify_dir(root: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A directory as EleutherAI sparsify's SparseCoder.save_to_disk writes it (nn.Linear orientation)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    path = root / "layers.3"
    path.mkdir(parents=True)
    save_file(tensors, path / "sae.safetensors")
    cfg = {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    (root / "config.json").write_text(json.dumps({"model": MODEL}))
    return path, tensors


def test_sparsify_layout(tmp_path: Path) -> None:
    path, t = sparsify_dir(tmp_path / "run", seed=2)
    sae = load(path)
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.config.k) == ("topk", D_IN, D_SAE, K)
    assert (sae.hook_name, sae.model_name) == (SITE, MODEL)
    x = activations(2)
    # sparsify's own equations: relu(linear(x - b_dec)), top-k, then top_acts @ W_dec + b_dec.
    n = {name: tensor.double().numpy() for name, tensor in t.items()}
    pre = np.maximum((x.double().numpy() - n["b_dec"]) @ n["encoder.weight"].T + n["encoder.bias"], 0.0)
    want = np.zeros_like(pre)
    for row in range(pre.shape[0]):
        top = np.argsort(-pre[row], kind="stable")[:K]
        want[row, top] = pre[row, top]
    np.testing.assert_allclose(sae.encode(x).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x).numpy(), want @ n["W_dec"] + n["b_dec"], rtol=1e-4, atol=1e-4)
    save(sae, tmp_path / "saelens")
    lens = LensSAE.load_from_disk(tmp_path / "saelens")
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), sae.encode(x))


def test_gemma_scope_npz(tmp_path: Path) -> None:
    w = {n: t.numpy() for n, t in random_weights("jumprelu", seed=4).items()}
    np.savez(tmp_path / "params.npz", **w)
    sae = load(tmp_path)
    assert (sae.architecture, sae.d_in, sae.d_sae) == ("jumprelu", D_IN, D_SAE)
    assert not sae.config.apply_b_dec_to_input and sae.hook_name is None
    assert torch.equal(load(tmp_path / "params.npz").encode(activations(4)), sae.encode(activations(4)))
    x = activations(4)
    want = ref_encode(
        {n: a.astype(np.float64) for n, a in w.items()},
        {"architecture": "jumprelu", "apply_b_dec_to_input": False},
        x.double().numpy(),
    )
    np.testing.assert_allclose(sae.encode(x).numpy(), want, rtol=1e-5, atol=1e-5)
    save(sae, tmp_path / "saelens")
    lens = LensSAE.load_from_disk(tmp_path / "saelens")
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), sae.encode(x))
        torch.testing.assert_close(lens(x), sae(x))


def saelens_dir(
    tmp_path: Path,
    cfg_changes: dict[str, Any] | None = None,
    weight_changes: dict[str, torch.Tensor | None] | None = None,
) -> Path:
    sae = make_sae("jumprelu", {})
    save(sae, tmp_path)
    if cfg_changes:
        cfg = json.loads((tmp_path / "cfg.json").read_text()) | cfg_changes
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    if weight_changes:
        weights = {n: p.detach() for n, p in sae.named_parameters()} | weight_changes
        save_file({n: t for n, t in weights.items() if t is not None}, tmp_path / "sae_weights.safetensors")
    return tmp_path


def test_load_errors_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load(tmp_path / "nope")
    single_line_error(e, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load(tmp_path / "empty")
    single_line_error(e, "no SAE checkpoint", "sae_weights.safetensors", "params.npz")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "sae.pt").write_bytes(b"\x80\x04not opened")
    for target in (pickled, pickled / "sae.pt"):
        with pytest.raises(UserError) as e:
            load(target)
        single_line_error(e, "pickle", "arbitrary code", "safetensors")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(UserError) as e:
        load(tmp_path / "weights.txt")
    single_line_error(e, "not an SAE checkpoint", "safetensors, npz and JSON")
    no_cfg = saelens_dir(tmp_path / "no_cfg")
    (no_cfg / "cfg.json").unlink()
    with pytest.raises(UserError) as e:
        load(no_cfg)
    single_line_error(e, "cfg.json is missing")
    truncated = saelens_dir(tmp_path / "truncated")
    data = (truncated / "sae_weights.safetensors").read_bytes()
    (truncated / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load(truncated)
    single_line_error(e, "sae_weights.safetensors", "truncated or corrupt")
    bad_json = saelens_dir(tmp_path / "bad_json")
    (bad_json / "cfg.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        load(bad_json)
    single_line_error(e, "cfg.json", "not valid JSON")


def test_load_errors_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **{n: t.numpy() for n, t in random_weights("jumprelu", 0).items()})
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError) as e:
        load(tmp_path)
    single_line_error(e, "params.npz", "not a readable npz")
    objects = tmp_path / "objects.npz"
    np.savez(objects, W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError) as e:
        load(objects)
    single_line_error(e, "pickled objects")


@pytest.mark.parametrize(
    ("cfg_changes", "weight_changes", "fragments"),
    [
        ({"d_in": 8}, None, ("tensor W_enc", "(16, 64)", "(8, 64)")),
        (None, {"b_enc": torch.zeros(D_SAE + 1)}, ("tensor b_enc", "(65,)", "(64,)")),
        ({"architecture": "abstopk", "actstore": {}}, None, ("unknown SAE architecture 'abstopk'", "gated")),
        (None, {"threshold": torch.full((D_SAE,), float("nan"))}, ("tensor threshold", "64 non-finite")),
        (None, {"threshold": None}, ("lacks tensor(s) threshold",)),
        (None, {"extra": torch.zeros(3)}, ("extra", "does not use")),
        ({"normalize_activations": "layer_norm"}, None, ("layer_norm", "not supported")),
        ({"dtype": "int8"}, None, ("dtype 'int8'",)),
        ({"architecture": "topk", "actstore": {}}, {"threshold": None}, ("topk SAE needs an integer k",)),
        ({"normalize_activations": "expected_average_only_in"}, None, ("activation_scaler.json",)),
        ({"d_sae": -1}, None, ("d_sae", "greater than 0")),
    ],
)
def test_load_errors_config_and_weights(
    tmp_path: Path,
    cfg_changes: dict[str, Any] | None,
    weight_changes: dict[str, Any] | None,
    fragments: tuple[str, ...],
) -> None:
    with pytest.raises(UserError) as e:
        load(saelens_dir(tmp_path, cfg_changes, weight_changes))
    single_line_error(e, *fragments)


def test_load_errors_sparsify_and_dtype(tmp_path: Path) -> None:
    path, _ = sparsify_dir(tmp_path, seed=0)
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps(cfg | {"transcode": True}))
    with pytest.raises(UserError) as e:
        load(path)
    single_line_error(e, "transcoder")
    with pytest.raises(UserError) as e:
        load(saelens_dir(tmp_path / "ok"), dtype="int4")
    single_line_error(e, "dtype 'int4'")


def test_check_compatible() -> None:
    sae = make_sae("standard", {})
    check_compatible(sae, D_IN, SITE, MODEL, allow_mismatch=False)
    check_compatible(sae, D_IN, SITE, "/models/smollm2-135m", allow_mismatch=False)  # same slug
    with pytest.raises(UserError) as e:
        check_compatible(sae, D_IN, "blocks.4.hook_resid_post", MODEL, allow_mismatch=False)
    single_line_error(e, SITE, "blocks.4.hook_resid_post", "--allow-mismatch")
    with pytest.raises(UserError) as e:
        check_compatible(sae, D_IN, SITE, "gpt2", allow_mismatch=False)
    single_line_error(e, MODEL, "gpt2", "--allow-mismatch")
    check_compatible(sae, D_IN, "blocks.4.hook_resid_post", "gpt2", allow_mismatch=True)
    with pytest.raises(UserError) as e:
        check_compatible(sae, D_IN * 2, SITE, MODEL, allow_mismatch=True)
    single_line_error(e, f"d_in={D_IN}", f"width {D_IN * 2}")
    unrecorded = SAE(
        sae.config.model_copy(update={"hook_name": None, "model_name": None}), dict(sae.named_parameters())
    )
    check_compatible(unrecorded, D_IN, "anything", "any-model", allow_mismatch=False)
