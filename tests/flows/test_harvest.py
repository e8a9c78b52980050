"""Stored activations and loss equal independent computations on the same tokens (tiny Llama, tiny GPT-2,
the embedded SmolLM2), and the harvest flow's store contract: manifest, ids, resume, read API."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.runtime import cached_model
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.store.root import Store
from tests.helpers import write_text_corpus
from tests.tiny_models import build_tiny_model

RUNTIME = HarvestRuntime(progress=False, device="cpu")


def reference_windows(store_root: Path, corpus_id: str, n_seqs: int, ctx_len: int) -> torch.Tensor:
    """Token windows read straight from the Parquet parts, not through the store's reader."""
    table = pl.read_parquet(store_root / "corpora" / corpus_id / "*.parquet").sort("tok")
    ids = table["token_id"].to_numpy()[: n_seqs * ctx_len]
    return torch.from_numpy(ids.astype(np.int64)).reshape(n_seqs, ctx_len)


def independent_hooks(model: torch.nn.Module, family: str, layer: int) -> dict[str, torch.nn.Module]:
    """The HF modules whose outputs are added to the residual stream, named by hand per family."""
    if family == "gpt2":
        block = model.transformer.h[layer]
        return {"attn_out": block.attn, "mlp_out": block.mlp, "resid_post": block}
    block = model.model.layers[layer]
    return {"attn_out": block.self_attn, "mlp_out": block.mlp, "resid_post": block}


def reference_run(
    model: torch.nn.Module, family: str, windows: torch.Tensor, batch: int, layer: int, last: int
) -> dict[str, torch.Tensor]:
    """hidden_states, module outputs and cross entropy from a plain forward with the test's own hooks."""
    out: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(_m: torch.nn.Module, _a: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            out.setdefault(name, []).append(tensor.detach().reshape(-1, tensor.shape[-1]).clone())

        return hook

    handles = [m.register_forward_hook(keep(k)) for k, m in independent_hooks(model, family, layer).items()]
    handles.append(independent_hooks(model, family, last)["resid_post"].register_forward_hook(keep("last_post")))
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                ids = windows[start : start + batch]
                result = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                hs = result.hidden_states
                out.setdefault("hs_post", []).append(hs[layer + 1].reshape(-1, hs[0].shape[-1]))
                out.setdefault("hs_pre", []).append(hs[layer].reshape(-1, hs[0].shape[-1]))
                logits = result.logits.float()
                ce = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
                ).reshape(ids.shape[0], -1)
                out.setdefault("loss", []).append(
                    torch.cat([ce, torch.full((ids.shape[0], 1), float("nan"))], 1).reshape(-1)
                )
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_model_sites_and_loss_match_hf(tmp_path: Path, family: str) -> None:
    model_dir = build_tiny_model(family, tmp_path / family)
    root = tmp_path / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(tmp_path / "docs")),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=16,
        ),
    )
    sites = (
        "blocks.1.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
    )
    config = HarvestConfig(
        corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=sites, loss=True, batch_windows=3
    )
    manifest = harvest(str(root), config, RUNTIME)
    n_tokens = manifest.counts["n_tokens"]
    assert n_tokens == corpus.counts["n_seqs"] * 16 and manifest.counts["n_chunks"] > 2

    model = cached_model(config.model, "cpu")
    windows = reference_windows(root, corpus.id, n_tokens // 16, 16)
    ref = reference_run(model, family, windows, batch=3, layer=1, last=2)
    s = Store(root)
    got = {site: torch.from_numpy(s.activations(manifest.id, site)[:]) for site in sites}
    assert torch.equal(got["blocks.1.hook_resid_post"], ref["hs_post"])  # exact in fp32
    assert torch.equal(got["blocks.1.hook_resid_pre"], ref["hs_pre"])
    assert torch.equal(got["blocks.1.hook_attn_out"], ref["attn_out"])
    assert torch.equal(got["blocks.1.hook_mlp_out"], ref["mlp_out"])
    assert torch.equal(got["blocks.2.hook_resid_post"], ref["last_post"])
    loss = torch.from_numpy(s.activations(manifest.id, "loss")[:])
    assert loss.shape == (n_tokens,)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref["loss"]))
    assert torch.allclose(loss.nan_to_num(), ref["loss"].nan_to_num(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(loss.reshape(-1, 16)[:, -1]).all() and not torch.isnan(loss.reshape(-1, 16)[:, :-1]).any()
    # the store reports what it holds
    arr = s.activations(manifest.id, "blocks.1.hook_resid_post")
    assert arr.attrs.module.endswith(".1") and arr.attrs.d == 32 and arr.dtype == "float32"
    assert arr.zarr.chunks == (3 * 16, 32)


def test_embedded_smollm2_matches_hidden_states_and_loss(tmp_path: Path) -> None:
    root = tmp_path / "store"
    corpus = ingest(str(root), CorpusConfig(source="pydocs", ctx_len=64, max_tokens=192))
    config = HarvestConfig(corpus_id=corpus.id, sites=("blocks.3.hook_resid_post",), loss=True, batch_windows=2)
    manifest = harvest(str(root), config, RUNTIME)
    model = cached_model(config.model, "cpu")
    windows = reference_windows(root, corpus.id, 3, 64)
    assert int(windows[0, 0]) == 1  # BOS opens every window
    got = torch.from_numpy(Store(root).activations(manifest.id, "blocks.3.hook_resid_post")[:])
    loss = torch.from_numpy(Store(root).activations(manifest.id, "loss")[:])
    hs, ces = [], []
    with torch.no_grad():
        for start in (0, 2):
            ids = windows[start : start + 2]
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hs.append(out.hidden_states[4].reshape(-1, 576))
            logits = out.logits[:, :-1].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            ce = ce.reshape(len(ids), -1)
            ces.append(torch.cat([ce, torch.full((len(ids), 1), float("nan"))], 1).reshape(-1))
    assert torch.equal(got, torch.cat(hs))
    ref_loss = torch.cat(ces)
    assert torch.allclose(loss.nan_to_num(), ref_loss.nan_to_num(), rtol=1e-5, atol=1e-4)
    assert 0.5 < float(np.nanmean(loss.numpy())) < 8.0  # a trained model predicts English docstrings


def test_same_config_same_id_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    model_dir = build_tiny_model("llama", tmp_path / "llama")
    root = tmp_path / "store"
    cfg = CorpusConfig(
        source="text",
        paths=(str(write_text_corpus(tmp_path / "docs", n_docs=10)),),
        tokenizer=ModelConfig(name=str(model_dir)),
        ctx_len=16,
    )
    first = ingest(str(root), cfg)
    assert ingest(str(root), cfg).created == first.created  # reused, not rebuilt
    config = HarvestConfig(
        corpus_id=first.id, model=ModelConfig(name=str(model_dir)), sites=("blocks.0.hook_resid_post",)
    )
    assert config.harvest_id() == HarvestConfig.model_validate_json(config.model_dump_json()).harvest_id()
    assert config.harvest_id() != config.model_copy(update={"loss": True}).harvest_id()
    a = harvest(str(root), config, RUNTIME)
    files = sorted(p.name for p in Store(root).harvest_dir(a.id).rglob("*") if p.is_file())
    b = harvest(str(root), config, RUNTIME)
    assert a == b
    assert sorted(p.name for p in Store(root).harvest_dir(a.id).rglob("*") if p.is_file()) == files
    listing = {(e.kind, e.id, e.complete) for e in Store(root).ls()}
    assert listing == {("corpus", first.id, True), ("harvest", a.id, True)}


def test_a_harvest_is_a_zarr_group_that_xarray_opens(tmp_path: Path) -> None:
    """xarray (not our reader) gets every site and the loss as variables on shared `tok` / `d` dimensions, equal
    to the stored rows; a harvest written before harvests were groups is upgraded without touching a chunk."""
    import json
    import shutil
    import warnings

    import xarray as xr

    from actstore.store.activations import upgrade_harvest

    model_dir = build_tiny_model("llama", tmp_path / "llama")
    root = tmp_path / "store"
    corpus = ingest(
        str(root),
        CorpusConfig(
            source="text",
            paths=(str(write_text_corpus(tmp_path / "docs", n_docs=10)),),
            tokenizer=ModelConfig(name=str(model_dir)),
            ctx_len=16,
        ),
    )
    sites = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
    config = HarvestConfig(corpus_id=corpus.id, model=ModelConfig(name=str(model_dir)), sites=sites, loss=True)
    manifest = harvest(str(root), config, RUNTIME)
    store = Store(root)
    directory = store.harvest_dir(manifest.id)

    def opened(path: Path) -> xr.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr notes the non-Zarr files of the directory (manifest, markers)
            return xr.open_zarr(path, consolidated=False)

    ds = opened(directory)
    assert set(ds.data_vars) == {f"{s}.zarr" for s in (*sites, "loss")}
    assert dict(ds.sizes) == {"tok": manifest.counts["n_tokens"], "d": 32}
    for site in sites:
        variable = ds[f"{site}.zarr"]
        assert variable.dims == ("tok", "d") and variable.attrs["site"] == site and variable.attrs["model"]
        assert variable.attrs["logical_dtype"] == "float32"
        assert np.array_equal(variable.values, store.activations(manifest.id, site)[:])
    assert ds["loss.zarr"].dims == ("tok",)
    assert np.array_equal(ds["loss.zarr"].values, store.activations(manifest.id, "loss")[:], equal_nan=True)
    assert ds.attrs["harvest_id"] == manifest.id and ds.attrs["ctx_len"] == 16

    old = tmp_path / "old" / manifest.id
    shutil.copytree(directory, old)
    (old / "zarr.json").unlink()
    for path in old.glob("*.zarr/zarr.json"):
        meta = json.loads(path.read_text())
        del meta["dimension_names"]
        path.write_text(json.dumps(meta))
    chunks = {p: p.read_bytes() for p in old.glob("*.zarr/c/**/*") if p.is_file()}
    assert len(chunks) >= 3  # a chunk of every array
    with pytest.raises(Exception, match=r"(?i)not found|no group|nothing found|does not exist"):
        opened(old)
    assert upgrade_harvest(old) and not upgrade_harvest(old)
    assert opened(old).equals(ds) and all(p.read_bytes() == b for p, b in chunks.items())
