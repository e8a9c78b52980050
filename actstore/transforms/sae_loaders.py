"""SAE checkpoint files -> (SAEConfig, weights in SAELens names), and back to SAELens' layout.

Three layouts are read: SAELens (`sae_weights.safetensors` + `cfg.json`, old and 6.x configs), EleutherAI
sparsify (`sae.safetensors` + `cfg.json`) and Gemma Scope (`params.npz`). Only safetensors, npz and JSON are
opened: pickle files can run arbitrary code when loaded, so they are refused with the way to convert them.
"""

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from actstore.schemas.errors import UserError
from actstore.schemas.sae import (
    ACTSTORE_KEY,
    ARCHITECTURES,
    GEMMA_SCOPE_PARAMS,
    NORMALIZATIONS,
    SAE_DTYPES,
    SAELENS_CFG,
    SAELENS_SCALER,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    SAEConfig,
)

Weights = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
LAYOUTS = (
    f"{SAELENS_WEIGHTS} + {SAELENS_CFG} (SAELens), {SPARSIFY_WEIGHTS} + {SAELENS_CFG} (sparsify) or "
    f"{GEMMA_SCOPE_PARAMS} (Gemma Scope)"
)
_CFG_FIELDS = ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k", "rescale_acts_by_decoder_norm")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[SAEConfig, Weights]:
    """Read any supported layout from a directory (or its weights file); weights are validated, on CPU."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"SAE checkpoint {path} does not exist: give a directory holding {LAYOUTS}")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(
                f"{path} is a pickle checkpoint, which can run arbitrary code when loaded, so "
                "actstore never opens it: convert it with safetensors.torch.save_file and add a "
                f"{SAELENS_CFG}"
            )
        if path.suffix.lower() == ".npz":
            return _read_gemma_scope(path)
        if path.name not in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SAELENS_CFG):
            raise UserError(
                f"{path} is not an SAE checkpoint actstore reads (only safetensors, npz and "
                f"JSON, as {LAYOUTS}): point at the checkpoint directory"
            )
        path = path.parent
    if (path / SAELENS_WEIGHTS).is_file():
        return _read_saelens(path)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return _read_sparsify(path)
    if (path / GEMMA_SCOPE_PARAMS).is_file():
        return _read_gemma_scope(path / GEMMA_SCOPE_PARAMS)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{path} holds only pickle weights ({', '.join(pickles)}), which actstore never "
            "opens because unpickling can run arbitrary code: convert them to safetensors "
            f"({LAYOUTS})"
        )
    raise UserError(f"no SAE checkpoint in {path}: expected {LAYOUTS}")


def write_saelens(path: str | os.PathLike[str], cfg: SAEConfig, weights: Weights) -> None:
    """Write SAELens' layout; batchtopk is written as the JumpReLU it is at inference, as SAELens does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: weights[name].detach().to("cpu").contiguous() for name in cfg.tensor_shapes()}
    _atomic(path / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if cfg.scaling_factor is not None:
        _write_json(path / SAELENS_SCALER, {"scaling_factor": cfg.scaling_factor, "has_whitening": False})
    else:
        (path / SAELENS_SCALER).unlink(missing_ok=True)
    saelens_arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    out: dict[str, Any] = {
        "architecture": saelens_arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
    }
    # Unknown names are left out, not written as null: SAELens' reader expects a string when the key exists.
    names = {"hook_name": cfg.hook_name, "model_name": cfg.model_name}
    out |= {key: value for key, value in names.items() if value is not None}
    if cfg.architecture == "topk":
        out |= {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}
    extra = {"architecture": cfg.architecture} | ({"k": cfg.k} if cfg.architecture == "batchtopk" else {})
    out[ACTSTORE_KEY] = cfg.metadata | extra
    _write_json(path / SAELENS_CFG, out)  # last: a directory with a cfg.json has its weights


def validate_weights(cfg: SAEConfig, weights: Weights, source: str) -> None:
    """Every tensor the architecture needs, nothing else, right shapes, floating and finite."""
    shapes = cfg.tensor_shapes()
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise UserError(
            f"{source} lacks tensor(s) {', '.join(missing)} that a {cfg.architecture} SAE needs "
            f"(has {', '.join(sorted(weights))}): use the complete checkpoint"
        )
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise UserError(
            f"{source} has tensor(s) {', '.join(extra)} that a {cfg.architecture} SAE does not "
            f"use (expected {', '.join(shapes)}): check the architecture in {SAELENS_CFG}"
        )
    for name, shape in shapes.items():
        t = weights[name]
        if tuple(t.shape) != shape:
            raise UserError(
                f"tensor {name} in {source} has shape {tuple(t.shape)} but the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}: fix d_in/d_sae in "
                f"{SAELENS_CFG} or the weights"
            )
        if not t.is_floating_point():
            raise UserError(f"tensor {name} in {source} has dtype {t.dtype}: SAE weights must be floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise UserError(
                f"tensor {name} in {source} has {bad} non-finite value(s) (nan/inf): the "
                "checkpoint is corrupt or training diverged; use another checkpoint"
            )


def _read_saelens(path: Path) -> tuple[SAEConfig, Weights]:
    raw = _read_json(path / SAELENS_CFG)
    weights = _read_safetensors(path / SAELENS_WEIGHTS)
    scaler = _read_json(path / SAELENS_SCALER) if (path / SAELENS_SCALER).is_file() else {}
    ours = _object(raw, ACTSTORE_KEY)
    metadata = _object(raw, "metadata")  # SAELens >= 6.0 keeps hook and model names here
    arch = ours.get("architecture", raw.get("architecture", "standard"))
    fields = {name: raw[name] for name in _CFG_FIELDS if raw.get(name) is not None}
    kwargs = _object(raw, "activation_fn_kwargs")
    if raw.get("activation_fn", raw.get("activation_fn_str")) == "topk" and "k" in kwargs:
        arch, fields["k"] = "topk", kwargs["k"]  # pre-6.0 SAELens configs spelled TopK this way
    if arch == "jumprelu" and metadata.get("training_architecture") == "batchtopk":
        arch = "batchtopk"  # SAELens saves a trained BatchTopK as the JumpReLU it is at inference
        fields["k"] = _object(metadata, "training_architecture_details").get("k")
    if arch == "batchtopk" and "k" in ours:
        fields["k"] = ours["k"]
    normalize = raw.get("normalize_activations")
    if not isinstance(normalize, str):  # pre-6.0 SAELens: a bool, or null
        normalize = "expected_average_only_in" if normalize else "none"
    fields["normalize_activations"] = normalize
    fields["hook_name"] = raw.get("hook_name") or raw.get("hook_point") or metadata.get("hook_name")
    fields["model_name"] = raw.get("model_name") or metadata.get("model_name")
    fields["scaling_factor"] = scaler.get("scaling_factor")
    fields["metadata"] = {key: value for key, value in ours.items() if key not in ("architecture", "k")}
    fold_norms = _saelens_training_weights(arch, fields, weights)
    cfg, weights = _finish(path / SAELENS_CFG, arch, fields, weights, str(path / SAELENS_WEIGHTS))
    if fold_norms:  # trained on norm-rescaled latents: fold as SAELens does when saving for inference
        norms = weights["W_dec"].norm(dim=-1)
        weights |= {
            "W_enc": weights["W_enc"] * norms,
            "b_enc": weights["b_enc"] * norms,
            "W_dec": weights["W_dec"] / norms[:, None],
        }
    return cfg, weights


def _saelens_training_weights(arch: str, fields: dict[str, Any], weights: Weights) -> bool:
    """Bring older or training-time SAELens tensors to the inference form, as SAELens' own loaders do.

    Returns whether the decoder norms still have to be folded into the encoder (after validation)."""
    scale = weights.pop("scaling_factor", None)  # pre-6.0 finetuning scale multiplied the latents
    if scale is not None and "W_dec" in weights and not bool((scale == 1).all()):
        weights["W_dec"] = weights["W_dec"] * scale.reshape(-1, 1)
    if "log_threshold" in weights:  # older JumpReLU training checkpoints
        weights["threshold"] = weights.pop("log_threshold").exp()
    if arch == "batchtopk" and "topk_threshold" in weights:  # one global threshold learned during training
        threshold = weights.pop("topk_threshold")
        d_sae = fields.get("d_sae")
        scalar = threshold.numel() == 1 and isinstance(d_sae, int)
        weights["threshold"] = threshold.reshape(()).expand(d_sae).clone() if scalar else threshold
        return bool(fields.pop("rescale_acts_by_decoder_norm", False))
    return False


def _read_sparsify(path: Path) -> tuple[SAEConfig, Weights]:
    raw = _read_json(path / SAELENS_CFG)
    source = str(path / SPARSIFY_WEIGHTS)
    for flag, why in (("transcode", "a transcoder"), ("skip_connection", "has a skip connection")):
        if raw.get(flag):
            raise UserError(
                f"{path} is a sparsify SAE that {why}; actstore encodes plain sparse "
                "autoencoders only: use an autoencoder checkpoint"
            )
    if raw.get("activation", "topk") != "topk":
        raise UserError(
            f"{path} uses sparsify activation {raw['activation']!r}; known architectures: {', '.join(ARCHITECTURES)}"
        )
    stored = _read_safetensors(path / SPARSIFY_WEIGHTS)
    renames = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    unknown = sorted(set(stored) - set(renames))
    if unknown:
        raise UserError(
            f"{source} has tensor(s) {', '.join(unknown)} that a sparsify SAE does not have "
            f"(expected {', '.join(renames)}): use an autoencoder checkpoint"
        )
    weights = {renames[name]: t for name, t in stored.items()}
    if "W_enc" in weights:  # sparsify keeps nn.Linear's [n_latents, d_in]; SAELens reads [d_in, d_sae]
        weights["W_enc"] = weights["W_enc"].T.contiguous()
    d_in = raw.get("d_in")
    fields = {
        "d_in": d_in,
        "d_sae": raw.get("num_latents") or (d_in or 0) * raw.get("expansion_factor", 0),
        "k": raw.get("k"),
        "dtype": _dtype_name(stored["W_dec"].dtype, source) if "W_dec" in stored else None,
        "apply_b_dec_to_input": True,  # sparsify subtracts b_dec from every autoencoder input
    }
    layer = re.fullmatch(r"(?:model\.)?layers\.(\d+)", path.name)
    fields["hook_name"] = f"blocks.{layer.group(1)}.hook_resid_post" if layer else None
    run_cfg = path.parent / "config.json"
    fields["model_name"] = _read_json(run_cfg).get("model") if run_cfg.is_file() else None
    return _finish(path / SAELENS_CFG, "topk", fields, weights, source)


def _read_gemma_scope(file: Path) -> tuple[SAEConfig, Weights]:
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"{file} is not a readable npz file ({_reason(err)}): it is corrupt, truncated or "
            "holds pickled objects; download it again"
        ) from err
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise UserError(f"array {name} in {file} has dtype {array.dtype}: SAE weights must be floating point")
    # Gemma Scope's own code names the matrices w_enc/w_dec; the released files say W_enc/W_dec.
    weights = {
        ("W_" + name[2:] if name.startswith("w_") else name): torch.from_numpy(array.copy())
        for name, array in arrays.items()
    }
    if "W_enc" not in weights or weights["W_enc"].ndim != 2:
        raise UserError(f"{file} has no 2-D W_enc (has {', '.join(sorted(weights))}): not a Gemma Scope SAE")
    d_in, d_sae = weights["W_enc"].shape
    fields = {"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False, "dtype": "float32"}
    return _finish(file, "jumprelu", fields, weights, str(file))


def _finish(
    cfg_file: Path, arch: str, fields: dict[str, Any], weights: Weights, source: str
) -> tuple[SAEConfig, Weights]:
    """Check the config fields one by one so each mistake gets its own line, then build and validate."""
    if arch not in ARCHITECTURES:
        raise UserError(f"{cfg_file}: unknown SAE architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    normalize = fields.get("normalize_activations", "none")
    if normalize not in NORMALIZATIONS:
        raise UserError(
            f"{cfg_file}: normalize_activations={normalize!r} is not supported; supported: {', '.join(NORMALIZATIONS)}"
        )
    fields["dtype"] = str(fields.get("dtype") or "float32").removeprefix("torch.")
    if fields["dtype"] not in SAE_DTYPES:
        raise UserError(f"{cfg_file}: dtype {fields['dtype']!r} is not supported; use one of {', '.join(SAE_DTYPES)}")
    k = fields.get("k")
    if arch == "topk" and isinstance(k, float) and k.is_integer():
        fields["k"] = int(k)
    if arch not in ("topk", "batchtopk"):
        fields.pop("k", None)
    try:
        cfg = SAEConfig(architecture=arch, **fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise UserError(
            f"{cfg_file}: {where} {first['msg'].lower()} (got {first.get('input')!r}); fix the config"
        ) from err
    validate_weights(cfg, weights, source)
    dtype = getattr(torch, cfg.dtype)
    return cfg, {name: t.to(dtype) for name, t in weights.items()}


def _read_safetensors(file: Path) -> Weights:
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"{file} is not a readable safetensors file ({_reason(err)}): it is truncated or "
            "corrupt; copy or download it again"
        ) from err


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{file} is missing: an SAE checkpoint needs its {file.name} next to the weights")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({_reason(err)}): fix or re-download it") from err
    if not isinstance(value, dict):
        raise UserError(f"{file} holds a JSON {type(value).__name__}, not an object: fix or re-download it")
    return value


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested JSON object, or {} where a foreign config has none (or something else) under `key`."""
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _write_json(file: Path, value: dict[str, Any]) -> None:
    _atomic(file, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, allow_nan=False) + "\n"))


def _atomic(file: Path, write: Any) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    tmp = file.with_name(f".{file.name}.tmp")
    write(str(tmp))
    os.replace(tmp, file)


def _dtype_name(dtype: torch.dtype, source: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in SAE_DTYPES:
        raise UserError(f"{source} stores {name} weights; SAE weights must be one of {', '.join(SAE_DTYPES)}")
    return name


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."
