"""Splicing replacements into the forward pass, checked against hooks written here by hand and against
cross entropy and KL computed independently from `model(ids).logits`."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelConfig
from actstore.schemas.sae import SAEConfig
from actstore.transforms.models import load_model
from actstore.transforms.sae import SAE
from actstore.transforms.sites import resolve_sites
from actstore.transforms.splice import (
    Splice,
    _token_losses,
    ce_recovered,
    downstream,
    mean_replacement,
    sae_replacement,
    zero_replacement,
)
from tests.tiny_models import D_MODEL, build_tiny_model

CPU = torch.device("cpu")
FAMILIES = ("llama", "gpt2")
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h"}
MLP = {"llama": "mlp", "gpt2": "mlp"}
ATTN = {"llama": "self_attn", "gpt2": "attn"}
SITES = ("blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreTrainedModel]:
    root: Path = tmp_path_factory.mktemp("tiny")
    return {f: load_model(ModelConfig(name=str(build_tiny_model(f, root / f))), CPU) for f in FAMILIES}


@pytest.fixture(scope="module")
def ids() -> Tensor:
    return torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(7))


@contextmanager
def hand_hook(model: nn.Module, family: str, site: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Apply `fn` at `site` with a hook placed on the module this test names for it, not through `transforms`."""
    layer, hook = int(site.split(".")[1]), site.split(".hook_")[1]
    block = f"{LAYERS[family]}.{layer}"
    if hook == "resid_pre":

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = model.get_submodule(block).register_forward_pre_hook(pre, with_kwargs=True)
    else:
        path = {"resid_post": block, "mlp_out": f"{block}.{MLP[family]}", "attn_out": f"{block}.{ATTN[family]}"}[hook]

        def post(_m: nn.Module, _a: object, out: Any) -> Any:
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

        handle = model.get_submodule(path).register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def reference_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """[B, T-1] next-token cross entropy in float64."""
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )


def body(values: Tensor, ids: Tensor) -> Tensor:
    """[B*T] per-token values -> [B, T-1], after checking the last position of every row is NaN."""
    grid = values.view(ids.shape)
    assert grid[:, -1].isnan().all() and not grid[:, :-1].isnan().any()
    return grid[:, :-1].double()


def logits_with(model: nn.Module, family: str, site: str, fn: Callable[[Tensor], Tensor], ids: Tensor) -> Tensor:
    with hand_hook(model, family, site, fn), torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_replacement_changes_nothing(models: dict[str, PreTrainedModel], ids: Tensor, family: str) -> None:
    model = models[family]
    specs = resolve_sites(model, list(SITES))
    variants = {site: {site: lambda x: x.clone()} for site in SITES} | {"all": {s: lambda x: x * 1.0 for s in SITES}}
    result = downstream(model, specs, ids, variants)
    with torch.inference_mode():
        expected = reference_ce(model(input_ids=ids).logits, ids)
    assert set(result) == {"clean", *variants}
    for name, tokens in result.items():
        assert tokens.ce.dtype == torch.float32 and tokens.ce.shape == (ids.numel(),)
        torch.testing.assert_close(body(tokens.ce, ids), expected, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(body(tokens.kl, ids), torch.zeros_like(expected)), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_zero_replacement_matches_a_hand_made_hook(
    models: dict[str, PreTrainedModel], ids: Tensor, family: str, site: str
) -> None:
    model = models[family]
    result = downstream(model, resolve_sites(model, [site]), ids, {"zero": {site: zero_replacement()}})
    zeroed = logits_with(model, family, site, torch.zeros_like, ids)
    torch.testing.assert_close(body(result["zero"].ce, ids), reference_ce(zeroed, ids), rtol=1e-5, atol=1e-5)
    assert (body(result["zero"].ce, ids) - body(result["clean"].ce, ids)).abs().max() > 1e-2


def test_kl_matches_numpy(models: dict[str, PreTrainedModel], ids: Tensor) -> None:
    model, site = models["llama"], "blocks.1.hook_resid_post"
    mean = torch.linspace(-1.0, 1.0, D_MODEL)
    result = downstream(
        model,
        resolve_sites(model, [site]),
        ids,
        {"half": {site: lambda x: 0.5 * x}, "mean": {site: mean_replacement(mean)}},
    )
    with torch.inference_mode():
        clean = model(input_ids=ids).logits.double().numpy()
    for name, fn in [("half", lambda x: 0.5 * x), ("mean", lambda x: mean.expand(x.shape))]:
        variant = logits_with(model, "llama", site, fn, ids).double().numpy()
        log_p = (
            clean
            - np.log(np.exp(clean - clean.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - clean.max(-1, keepdims=True)
        )
        log_q = (
            variant
            - np.log(np.exp(variant - variant.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - variant.max(-1, keepdims=True)
        )
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)[:, :-1]
        assert kl.min() > 1e-4
        np.testing.assert_allclose(body(result[name].kl, ids).numpy(), kl, rtol=1e-4, atol=1e-6, err_msg=name)


def perfect_sae(d: int) -> SAE:
    """relu(x) - relu(-x) == x: latents [x+, x-] and a decoder that subtracts them reconstruct exactly."""
    eye = torch.eye(d)
    weights = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_enc": torch.zeros(2 * d),
        "b_dec": torch.zeros(d),
    }
    return SAE(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d), weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_perfect_sae_recovers_all_of_the_loss(models: dict[str, PreTrainedModel], ids: Tensor, family: str) -> None:
    model, site = models[family], "blocks.1.hook_resid_post"
    sae = perfect_sae(D_MODEL)
    x = torch.randn(50, D_MODEL)
    assert torch.equal(sae.decode(sae.encode(x)), x)
    result = downstream(
        model,
        resolve_sites(model, [site]),
        ids,
        {"sae": {site: sae_replacement(sae)}, "zero": {site: zero_replacement()}},
    )
    assert torch.equal(result["sae"].ce.nan_to_num(), result["clean"].ce.nan_to_num())
    assert torch.equal(result["sae"].kl.nan_to_num(), torch.zeros(ids.numel()))
    clean, spliced, ablated = (float(result[k].ce.nanmean()) for k in ("clean", "sae", "zero"))
    assert ce_recovered(clean, spliced, ablated) == 1.0


def test_sae_replacement_returns_the_input_dtype() -> None:
    sae = perfect_sae(D_MODEL).to(torch.float64)
    x = torch.randn(2, 3, D_MODEL, dtype=torch.bfloat16)
    out = sae_replacement(sae)(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def test_ce_recovered_formula() -> None:
    assert ce_recovered(2.0, 2.5, 6.0) == pytest.approx(3.5 / 4.0)
    assert ce_recovered(2.0, 6.0, 6.0) == 0.0
    assert np.isnan(ce_recovered(2.0, 2.5, 2.0))


def test_keep_leaves_those_positions_clean(models: dict[str, PreTrainedModel], ids: Tensor) -> None:
    model, site = models["llama"], "blocks.0.hook_resid_post"
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[:, 0] = True
    keep[1, 4] = True
    seen: list[Tensor] = []

    def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = model.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            clean = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
            with Splice(model, resolve_sites(model, [site])) as splice:
                splice.set({site: zero_replacement()}, keep)
                model(input_ids=ids)
    finally:
        handle.remove()
    next_layer_input = seen[-1]
    assert torch.equal(next_layer_input[keep], clean[keep])
    assert torch.equal(next_layer_input[~keep], torch.zeros_like(clean[~keep]))

    every = torch.ones(ids.shape, dtype=torch.bool)
    result = downstream(model, resolve_sites(model, [site]), ids, {"kept": {site: zero_replacement()}}, keep=every)
    assert torch.equal(result["kept"].ce.nan_to_num(), result["clean"].ce.nan_to_num())


def directional_ablation(r: Tensor, delta: Tensor) -> Callable[[Tensor], Tensor]:
    """(x + delta) - r rᵀ(x + delta) with r normalised: delta's gradient is d loss / d x at the site."""

    def ablate(x: Tensor) -> Tensor:
        shifted = x + delta
        unit = r / r.norm()
        return shifted - (shifted @ unit).unsqueeze(-1) * unit

    return ablate


def test_gradients_flow_through_a_splice(models: dict[str, PreTrainedModel], ids: Tensor) -> None:
    model = models["llama"]
    sites = ["blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out"]
    direction = torch.linspace(-1.0, 2.0, D_MODEL)

    def leaves() -> tuple[Tensor, list[Tensor]]:
        return direction.clone().requires_grad_(), [torch.zeros(*ids.shape, D_MODEL, requires_grad=True) for _ in sites]

    def loss(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    r, deltas = leaves()
    with Splice(model, resolve_sites(model, sites)) as splice:
        splice.set({site: directional_ablation(r, d) for site, d in zip(sites, deltas, strict=True)})
        loss(model(input_ids=ids).logits).backward()

    r_hand, deltas_hand = leaves()
    with (
        hand_hook(model, "llama", sites[0], directional_ablation(r_hand, deltas_hand[0])),
        hand_hook(model, "llama", sites[1], directional_ablation(r_hand, deltas_hand[1])),
    ):
        loss(model(input_ids=ids).logits).backward()

    assert r.grad is not None and r_hand.grad is not None and r.grad.abs().max() > 0
    torch.testing.assert_close(r.grad, r_hand.grad)
    for spliced, hand in zip(deltas, deltas_hand, strict=True):
        assert spliced.grad is not None and hand.grad is not None and spliced.grad.abs().max() > 0
        torch.testing.assert_close(spliced.grad, hand.grad)


def test_hooks_are_removed_on_exit(models: dict[str, PreTrainedModel], ids: Tensor) -> None:
    model, site = models["gpt2"], "blocks.1.hook_resid_post"
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with Splice(model, resolve_sites(model, [site])) as splice:
            splice.set({site: zero_replacement()})
            assert not torch.equal(model(input_ids=ids).logits, clean)
            assert splice.calls == {site: 1}
            splice.set({site: None})
            assert torch.equal(model(input_ids=ids).logits, clean)
            splice.set({site: zero_replacement()})
        assert torch.equal(model(input_ids=ids).logits, clean)


def test_errors_the_user_can_fix(models: dict[str, PreTrainedModel], ids: Tensor) -> None:
    model, site = models["llama"], "blocks.1.hook_resid_post"
    specs = resolve_sites(model, [site])
    with Splice(model, specs) as splice:
        with pytest.raises(UserError, match=r"^cannot splice \['blocks.0.hook_mlp_out'\]: the splice hooks only"):
            splice.set({"blocks.0.hook_mlp_out": zero_replacement()})
        with pytest.raises(UserError, match=r"^keep must be a bool mask \[batch, tokens\], got torch.int64"):
            splice.set({site: zero_replacement()}, keep=torch.ones(ids.shape, dtype=torch.long))
    with pytest.raises(UserError, match=r"^a site is listed twice"):
        Splice(model, specs + specs)
    with pytest.raises(UserError, match=r"^the replacement at site blocks.1.hook_resid_post returned shape \(2, 9\)"):
        downstream(model, specs, ids, {"bad": {site: lambda x: x[..., 0]}})
    with pytest.raises(UserError, match=r"^keep has shape \(2, 8\) but site blocks.1.hook_resid_post has"):
        downstream(model, specs, ids, {"z": {site: zero_replacement()}}, keep=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(UserError, match=r"^a variant is named 'clean'"):
        downstream(model, specs, ids, {"clean": {site: zero_replacement()}})
    with pytest.raises(UserError, match=r"^the mean for a mean ablation must be one vector \[d\]"):
        mean_replacement(torch.zeros(2, D_MODEL))
    with pytest.raises(UserError, match=r"^the mean has width 5 but the site's activations have width 32"):
        downstream(model, specs, ids, {"m": {site: mean_replacement(torch.zeros(5))}})
    with pytest.raises(UserError, match=r"^activations of shape \(2, 9, 32\) given to an SAE that reads d_in=16"):
        downstream(model, specs, ids, {"sae": {site: sae_replacement(perfect_sae(16))}})


def test_a_site_that_never_runs_is_reported(tmp_path: Path, ids: Tensor) -> None:
    model = load_model(ModelConfig(name=str(build_tiny_model("llama", tmp_path / "llama"))), CPU)
    model.model.unused = nn.Identity()
    spec = resolve_sites(model, ["blocks.0.hook_resid_post"])[0]._replace(name="unused", module="model.unused")
    with pytest.raises(RuntimeError, match=r"variant z: spliced sites ran \{'unused': 0\} times"):
        downstream(model, [spec], ids, {"z": {"unused": zero_replacement()}})


def test_a_token_the_clean_model_rules_out_adds_nothing_to_kl() -> None:
    clean = torch.tensor([[[0.0, 1.0, float("-inf")], [2.0, 0.0, float("-inf")]]])
    variant = torch.tensor([[[0.5, 0.5, 1.0], [0.0, 0.0, 0.0]]])
    ce, kl = _token_losses(clean, variant, torch.tensor([[2, 1]]))
    p = np.exp(clean[0, 0, :2].double().numpy()) / np.exp(clean[0, 0, :2].double().numpy()).sum()
    q = np.exp(variant[0, 0].double().numpy()) / np.exp(variant[0, 0].double().numpy()).sum()
    assert kl[0].item() == pytest.approx(float((p * np.log(p / q[:2])).sum()), rel=1e-5)
    assert ce[0].item() == pytest.approx(float(-np.log(q[1])), rel=1e-6)
    assert ce[1].isnan() and kl[1].isnan()
