"""Attribution: stored gradients equal autograd of the summed metric through hand-placed hooks; feature attributions
equal f * dm/df by autograd through the SAE-spliced model (error held fixed) for every decoder normalization;
on the embedded SmolLM2 they predict the true loss change of zero-ablating a feature; the error node, per-feature
summary and direct logit attribution equal brute-force computations; bad input ends in one line, store unchanged."""

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from actstore.flows.attribute import attribute, attribution_dir
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.schemas.attribution import LOGIT_WEIGHTS_NAME, PER_FEATURE_NAME, PER_TOKEN_NAME, AttributeRuntime
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime, gradient_array
from actstore.schemas.model import ModelConfig
from actstore.schemas.sae import SAEConfig
from actstore.store.root import Store
from actstore.transforms.attribution import attribute_batch
from actstore.transforms.gradients import GradientCapture
from actstore.transforms.models import embedded_default_gguf, load_tokenizer
from actstore.transforms.sae import SAE, load, save
from actstore.transforms.sites import resolve_sites
from actstore.transforms.splice import CLEAN, downstream
from tests.helpers import WORDS, snapshot, write_text_corpus
from tests.tiny_models import D_MODEL, build_tiny_model, embedded_model

SITE = "blocks.1.hook_resid_post"
LOSS_SITES = (SITE, "blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre")
LOGIT_DIFF = (5, 17)
CTX = 16
D_SAE = 64
RUNTIME = AttributeRuntime(device="cpu", progress=False, batch_tokens=100)  # several batches per chunk


def random_sae(kind: str, seed: int, d_in: int = D_MODEL) -> SAE:
    """`topk`: plain; `scaled`: topk ranking by decoder norm with an expected-average scaling factor; `rescaled`:
    ReLU with constant-norm rescaling. Decoder rows have unequal norms so every factor of dx_hat/df matters."""
    g = torch.Generator().manual_seed(seed)
    options: dict[str, Any] = {
        "topk": {"architecture": "topk", "k": 6},
        "scaled": {
            "architecture": "topk",
            "k": 6,
            "rescale_acts_by_decoder_norm": True,
            "normalize_activations": "expected_average_only_in",
            "scaling_factor": 0.7,
        },
        "rescaled": {"architecture": "standard", "normalize_activations": "constant_norm_rescale"},
    }[kind]
    cfg = SAEConfig(d_in=d_in, d_sae=D_SAE, hook_name=SITE, **options)
    w_dec = torch.randn(D_SAE, d_in, generator=g) / d_in**0.5 * torch.rand(D_SAE, 1, generator=g).add(0.5)
    b_enc = torch.randn(D_SAE, generator=g) * 0.1 - (0.5 if kind == "rescaled" else 0.0)
    if kind == "rescaled":
        b_enc[0] = -1e3  # a dead feature, so the tables' rows for one are checked too
    return SAE(
        cfg,
        {
            "W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in**0.5,
            "W_dec": w_dec,
            "b_enc": b_enc,
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("attribution")
    model_dir = build_tiny_model("llama", base / "llama")
    root = base / "store"
    model = ModelConfig(name=str(model_dir))
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(base / "docs", 12)),),
            tokenizer=model,
            ctx_len=CTX,
            max_tokens=20 * CTX,
        ),
    )
    run = HarvestRuntime(progress=False, device="cpu")
    common = {"corpus_id": corpus.id, "model": model, "batch_windows": 4}
    harvests = {
        "loss": harvest(str(root), HarvestConfig(sites=LOSS_SITES, gradient_metric="loss", **common), run).id,
        "logit_diff": harvest(
            str(root),
            HarvestConfig(sites=(SITE,), gradient_metric="logit_diff", logit_diff_tokens=LOGIT_DIFF, **common),
            run,
        ).id,
        "plain": harvest(str(root), HarvestConfig(sites=(SITE,), **common), run).id,
    }
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    tokens = Store(root).tokens(corpus.id).sort("tok").collect()
    ids = torch.from_numpy(tokens["token_id"].to_numpy().astype(np.int64)).reshape(-1, CTX)
    saes = {}
    for seed, kind in enumerate(("topk", "scaled", "rescaled")):
        saes[kind] = base / f"sae-{kind}"
        save(random_sae(kind, seed), saes[kind])
    return {
        "base": base,
        "root": root,
        "harvests": harvests,
        "hf": hf,
        "ids": ids,
        "saes": saes,
        "model_dir": model_dir,
    }


def _swap_hook(model: PreTrainedModel, site: str, swap: Callable[[Tensor], Tensor]) -> Any:
    """Replace `site`'s value by `swap(value)` with a hook this test places itself on the Llama module."""
    layer, hook = int(site.split(".")[1]), site.split(".hook_")[1]
    block = model.model.layers[layer]
    if hook == "resid_pre":

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}

        return block.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m: nn.Module, _args: Any, out: Any) -> Any:
        return swap(out) if isinstance(out, Tensor) else (swap(out[0]), *out[1:])

    return (block if hook == "resid_post" else block.mlp).register_forward_hook(post)


def summed_metric(logits: Tensor, ids: Tensor, metric: str) -> Tensor:
    """The metric summed over every position of every window, written out here: log-softmax and gather."""
    logits = logits.float()
    if metric == "logit_diff":
        return (logits[..., LOGIT_DIFF[0]] - logits[..., LOGIT_DIFF[1]]).sum()
    return -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()


def hand_gradient(model: PreTrainedModel, ids: Tensor, site: str, metric: str) -> tuple[Tensor, Tensor]:
    """Activations at `site` and d(summed metric)/d(them): the site's value is swapped for a leaf tensor."""
    leaf: dict[str, Tensor] = {}

    def swap(value: Tensor) -> Tensor:
        leaf["x"] = value.detach().requires_grad_()
        return leaf["x"]

    handle = _swap_hook(model, site, swap)
    try:
        summed_metric(model(input_ids=ids).logits, ids, metric).backward()
    finally:
        handle.remove()
    x = leaf["x"]
    return x.detach().reshape(-1, x.shape[-1]), x.grad.reshape(-1, x.shape[-1])


def stored_triples(directory: Path) -> pl.DataFrame:
    return pl.read_parquet(directory / "by_feature" / "*.parquet")


@pytest.mark.parametrize(("kind", "sites"), [("loss", LOSS_SITES), ("logit_diff", (SITE,))])
def test_stored_gradients_equal_autograd_of_the_summed_metric(
    world: dict[str, Any], kind: str, sites: tuple[str, ...]
) -> None:
    store = Store(world["root"])
    harvest_id = world["harvests"][kind]
    for site in sites:
        x, g = hand_gradient(world["hf"], world["ids"], site, kind)
        assert g.abs().max() > 0
        torch.testing.assert_close(torch.as_tensor(store.activations(harvest_id, site)[:]), x, rtol=1e-4, atol=1e-5)
        stored = torch.as_tensor(store.activations(harvest_id, gradient_array(site))[:])
        torch.testing.assert_close(stored, g, rtol=1e-3, atol=1e-6 * float(g.abs().max()))
        last = torch.arange(len(g)) % CTX == CTX - 1
        if kind == "loss":  # the last position predicts nothing in its window, so nothing depends on it there
            assert (stored[last] == 0).all()
    with torch.no_grad():
        logits = world["hf"](input_ids=world["ids"]).logits.float()
    ce = -logits[:, :-1].log_softmax(-1).gather(-1, world["ids"][:, 1:, None])[..., 0]
    loss = torch.as_tensor(store.activations(harvest_id, "loss")[:]).reshape(-1, CTX)
    torch.testing.assert_close(loss[:, :-1], ce, rtol=1e-4, atol=1e-4)
    assert loss[:, -1].isnan().all()


def spliced_attribution(world: dict[str, Any], sae: SAE, metric: str) -> pl.DataFrame:
    """f * dm/df by autograd: the SAE spliced in at SITE as x_hat(f) + stopgrad(x - x_hat(f)), f a leaf."""
    latents: dict[str, Tensor] = {}
    rescaled = sae.config.normalize_activations == "constant_norm_rescale"

    def swap(value: Tensor) -> Tensor:
        flat = value.reshape(-1, value.shape[-1])
        latents["f"] = sae.encode(flat).detach().requires_grad_()
        x_hat = sae.decode(latents["f"], flat.norm(dim=-1) if rescaled else None)
        return (x_hat + (flat - x_hat).detach()).reshape(value.shape)

    handle = _swap_hook(world["hf"], SITE, swap)
    try:
        summed_metric(world["hf"](input_ids=world["ids"]).logits, world["ids"], metric).backward()
    finally:
        handle.remove()
    f = latents["f"]
    toks, features = torch.nonzero(f.detach(), as_tuple=True)
    return pl.DataFrame(
        {
            "feature": features.numpy().astype(np.int32),
            "tok": toks.numpy(),
            "expected": (f * f.grad).detach()[toks, features].numpy(),
        }
    )


@pytest.mark.parametrize(
    ("kind", "metric"), [("topk", "loss"), ("topk", "logit_diff"), ("scaled", "loss"), ("rescaled", "loss")]
)
def test_attribution_equals_autograd_through_the_spliced_sae(world: dict[str, Any], kind: str, metric: str) -> None:
    manifest = attribute(str(world["root"]), str(world["saes"][kind]), world["harvests"][metric], runtime=RUNTIME)
    assert manifest.extra["site"] == SITE and manifest.config["metric"] == metric
    sae_id, harvest_id = manifest.id.split("/")
    got = stored_triples(attribution_dir(Store(world["root"]), sae_id, harvest_id))
    expected = spliced_attribution(world, load(world["saes"][kind]), metric)
    joined = expected.join(got, on=["feature", "tok"], how="full", coalesce=True)
    assert joined.null_count().sum_horizontal().item() == 0  # the same active (feature, tok) pairs
    scale = float(joined["expected"].abs().max())
    np.testing.assert_allclose(joined["value"].to_numpy(), joined["expected"].to_numpy(), rtol=1e-3, atol=1e-5 * scale)


def test_error_node_per_token_and_per_feature_tables(world: dict[str, Any]) -> None:
    root, harvest_id = world["root"], world["harvests"]["loss"]
    manifest = attribute(str(root), str(world["saes"]["rescaled"]), harvest_id, runtime=RUNTIME)
    store = Store(root)
    directory = attribution_dir(store, *manifest.id.split("/"))
    x = store.activations(harvest_id, SITE)[:].astype(np.float64)
    g = store.activations(harvest_id, gradient_array(SITE))[:].astype(np.float64)
    with torch.no_grad():
        x_hat = load(world["saes"]["rescaled"])(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    per_token = pl.read_parquet(directory / PER_TOKEN_NAME)
    assert per_token["tok"].to_list() == list(range(len(x)))
    # `ls` lists the attribution as complete, and no half-made feature store beside it
    listed = [(e.kind, e.complete) for e in store.ls() if e.id == manifest.id]
    assert listed == [("attribution", True)], listed
    tol = 1e-5 * float(np.abs(x * g).sum(axis=1).max())
    np.testing.assert_allclose(per_token["error_attribution"], ((x - x_hat) * g).sum(axis=1), rtol=1e-4, atol=tol)
    np.testing.assert_allclose(per_token["total_attribution"], (x * g).sum(axis=1), rtol=1e-4, atol=tol)
    parts = per_token["feature_attribution"] + per_token["bias_attribution"] + per_token["error_attribution"]
    np.testing.assert_allclose(parts, per_token["total_attribution"], rtol=1e-4, atol=tol)
    triples = stored_triples(directory)
    by_tok = pl.DataFrame({"tok": np.arange(len(x))}).join(
        triples.group_by("tok").agg(pl.col("value").sum().alias("sum"), pl.len().alias("l0")), on="tok", how="left"
    )
    np.testing.assert_allclose(per_token["feature_attribution"], by_tok["sum"].fill_null(0), rtol=1e-4, atol=tol)
    assert per_token["l0"].to_list() == by_tok["l0"].fill_null(0).to_list()
    stored_loss = store.activations(harvest_id, "loss")[:]
    assert per_token["loss"].is_null().to_list() == np.isnan(stored_loss).tolist()
    assert manifest.extra["sum"]["error"] == pytest.approx(float(((x - x_hat) * g).sum()), rel=1e-4, abs=tol)

    per_feature = pl.read_parquet(directory / PER_FEATURE_NAME)
    assert per_feature["feature"].to_list() == list(range(D_SAE)) and per_feature["count"][0] == 0
    values = {f: triples.filter(pl.col("feature") == f) for f in range(D_SAE)}
    for row in per_feature.iter_rows(named=True):
        rows = values[row["feature"]]
        v = rows["value"].to_numpy().astype(np.float64)
        assert row["count"] == len(v)
        assert row["attribution_sum"] == pytest.approx(v.sum(), rel=1e-6, abs=1e-9)
        if len(v):
            assert row["attribution_abs_mean"] == pytest.approx(np.abs(v).mean(), rel=1e-6)
            order = np.lexsort((rows["tok"].to_numpy(), -np.abs(v)))[: manifest.config["top_k"]]
            assert row["top_tok"] == rows["tok"].to_numpy()[order].tolist()
        else:
            assert row["attribution_mean"] is None and row["attribution_max"] is None and row["top_tok"] == []


def test_logit_weights_equal_brute_force_argsort(world: dict[str, Any]) -> None:
    manifest = attribute(str(world["root"]), str(world["saes"]["topk"]), world["harvests"]["loss"], runtime=RUNTIME)
    table = pl.read_parquet(attribution_dir(Store(world["root"]), *manifest.id.split("/")) / LOGIT_WEIGHTS_NAME)
    hf = world["hf"]
    w_u = (hf.lm_head.weight * hf.model.norm.weight).T.double()  # the final norm's gain folded in
    logits = load(world["saes"]["topk"]).W_dec.double() @ w_u
    k = manifest.config["logit_k"]
    order = torch.argsort(logits, dim=-1, descending=True, stable=True)
    assert table["feature"].to_list() == list(range(D_SAE))
    assert table["positive_ids"].to_list() == order[:, :k].tolist()
    assert table["negative_ids"].to_list() == order.flip(-1)[:, :k].tolist()
    np.testing.assert_allclose(
        np.array(table["positive_logits"].to_list()), logits.gather(1, order[:, :k]).numpy(), rtol=1e-4, atol=1e-5
    )
    tokenizer = AutoTokenizer.from_pretrained(world["model_dir"])
    assert table["negative_tokens"][3].to_list() == [tokenizer.decode([i]) for i in table["negative_ids"][3]]


def test_bad_input_is_one_line_and_leaves_the_store_unchanged(world: dict[str, Any]) -> None:
    root, base = world["root"], world["base"]
    first = attribute(str(root), str(world["saes"]["topk"]), world["harvests"]["logit_diff"], runtime=RUNTIME)
    wrong_width = base / "sae-narrow"
    save(random_sae("topk", 9, d_in=16), wrong_width)
    before = snapshot(root)
    cases = [
        (
            (str(world["saes"]["topk"]), world["harvests"]["plain"], None),
            "stores no gradients: re-harvest with --gradients",
        ),
        ((str(wrong_width), world["harvests"]["loss"], None), "d_in=16"),
        (
            (str(world["saes"]["topk"]), world["harvests"]["logit_diff"], "blocks.0.hook_mlp_out"),
            "not at 'blocks.0.hook_mlp_out'",
        ),
        ((str(world["saes"]["topk"]), "harvest-missing-00000000", None), "harvest-missing-00000000"),
    ]
    for (sae, harvest_id, site), fragment in cases:
        with pytest.raises(UserError, match=fragment) as caught:
            attribute(str(root), sae, harvest_id, site=site, runtime=RUNTIME)
        assert "\n" not in str(caught.value)
        assert snapshot(root) == before, fragment
    again = attribute(str(root), str(world["saes"]["topk"]), world["harvests"]["logit_diff"], runtime=RUNTIME)
    assert again == first and snapshot(root) == before
    with pytest.raises(UserError, match="other settings"):
        attribute(str(root), str(world["saes"]["topk"]), world["harvests"]["logit_diff"], top_k=3, runtime=RUNTIME)


def test_harvest_config_gradient_fields(world: dict[str, Any]) -> None:
    plain = {"corpus_id": "corpus-x-12345678", "sites": ("blocks.3.hook_resid_post",)}
    # Ids of configs without gradients are the ones they had before gradients existed.
    assert HarvestConfig(**plain).harvest_id() == "harvest-smollm2-135m-L3-8e2f2c00"
    assert (
        HarvestConfig(
            corpus_id="corpus-x-12345678",
            sites=("blocks.3.hook_resid_post", "blocks.1.hook_mlp_out"),
            loss=True,
            store_dtype="float16",
        ).harvest_id()
        == "harvest-smollm2-135m-L1-3-c002ecf0"
    )
    with_gradients = HarvestConfig(**plain, gradient_metric="loss")
    assert with_gradients.loss and with_gradients == HarvestConfig(**plain, gradient_metric="loss", loss=True)
    assert with_gradients.harvest_id() != HarvestConfig(**plain, loss=True).harvest_id()
    assert HarvestConfig.model_validate(with_gradients.model_dump(mode="json")) == with_gradients
    for kwargs, fragment in [
        ({"gradient_metric": "logit_diff"}, "--logit-diff A B"),
        ({"logit_diff_tokens": (1, 2)}, "--gradients logit_diff"),
        ({"gradient_metric": "logit_diff", "logit_diff_tokens": (-1, 2)}, ">= 0"),
        ({"gradient_metric": "loss", "sites": ("model.layers.0.grad",)}, "suffix"),
    ]:
        with pytest.raises(UserError, match=fragment):
            HarvestConfig(**{**plain, **kwargs})
    root = world["root"]
    corpus_id = Store(root).manifest("harvest", world["harvests"]["plain"]).extra["corpus_id"]
    before = snapshot(root)
    beyond = HarvestConfig(
        corpus_id=corpus_id,
        model=ModelConfig(name=str(world["model_dir"])),
        sites=(SITE,),
        gradient_metric="logit_diff",
        logit_diff_tokens=(1, 100_000),
    )
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        harvest(str(root), beyond, HarvestRuntime(progress=False, device="cpu"))
    assert snapshot(root) == before


def test_attribution_predicts_zero_ablation_on_smollm2() -> None:
    """Attribution patching of a random TopK SAE at blocks.3 of SmolLM2 against the true change of the windows'
    summed loss when one feature at one token is zero-ablated (error held fixed), measured by splicing."""
    model = embedded_model()
    tokenizer = load_tokenizer(ModelConfig(name=str(embedded_default_gguf())))
    rng = random.Random(0)
    windows, length, variants_n = 8, 10, 6
    text = " ".join(rng.choice(WORDS) for _ in range(windows * length * 2))
    ids = torch.tensor(tokenizer(text)["input_ids"][: windows * length]).reshape(windows, length)
    specs = resolve_sites(model, ["blocks.3.hook_resid_post"])
    with GradientCapture(model, specs, "loss") as capture:
        result = capture(ids)
    x, g = result.acts[specs[0].name], result.grads[specs[0].name]
    d = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(256, d, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    sae = SAE(
        SAEConfig(architecture="topk", d_in=d, d_sae=256, k=16),
        {"W_enc": w_dec.T.clone(), "W_dec": w_dec, "b_enc": torch.zeros(256), "b_dec": x.mean(dim=0)},
    )
    out = attribute_batch(sae, x, g)
    latents = out.latents.reshape(windows, length, -1)
    attribution = out.attribution.reshape(windows, length, -1)
    chosen, variants = [], {}
    for v in range(variants_n):  # one (position, feature) per window per forward: windows do not interact
        pairs = []
        for b in range(windows):
            t = rng.randrange(1, length - 1)  # position 0 is the attention sink, with a norm ~10x the others
            pairs.append((b, t, rng.choice(latents[b, t].nonzero().flatten().tolist())))
        chosen.append(pairs)

        def ablate(value: Tensor, pairs: list[tuple[int, int, int]] = pairs) -> Tensor:
            value = value.clone()
            for b, t, i in pairs:
                value[b, t] -= latents[b, t, i] * w_dec[i]
            return value

        variants[f"ablate-{v}"] = {specs[0].name: ablate}
    losses = downstream(model, specs, ids, variants)
    clean = losses[CLEAN].ce.reshape(windows, length)
    estimate, true, size = [], [], []
    for v, pairs in enumerate(chosen):
        ce = losses[f"ablate-{v}"].ce.reshape(windows, length)
        for b, t, i in pairs:
            true.append(float((ce[b] - clean[b]).nansum()))
            estimate.append(-float(attribution[b, t, i]))
            size.append(float(latents[b, t, i]))
    estimate_a, true_a, size_a = map(np.array, (estimate, true, size))
    small = size_a <= np.median(size_a)
    r_small = np.corrcoef(estimate_a[small], true_a[small])[0, 1]
    r_all = np.corrcoef(estimate_a, true_a)[0, 1]
    print(
        f"attribution vs zero-ablation on SmolLM2 blocks.3: r={r_small:.3f} over {small.sum()} pairs with "
        f"activation <= {np.median(size_a):.2f}, r={r_all:.3f} over all {len(size_a)}"
    )
    assert r_small > 0.8
    assert r_all > 0.7
