"""A trainer's resumable state on disk: tensors in safetensors, scalars and config in JSON, never a pickle.

    <dir>/trainer_state-<step>.safetensors   weights, Adam moments, dead-latent counters, threshold, RNG
    <dir>/trainer_state.json                 format, config, step, tokens, scale; names the tensors file

The tensors file is named by step and the JSON is replaced last, so a save killed at any point leaves the
previous pair intact and loadable; superseded tensor files are deleted only after the new JSON is in place.
"""

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from actstore.schemas.errors import UserError

STATE_FORMAT = "actstore.sae_trainer/1"
"""`format` of a saved trainer state; another format is refused rather than misread."""
STATE_JSON = "trainer_state.json"
"""Scalars and config of a saved state; it names the tensors file it belongs to."""


def write_state(
    directory: str | os.PathLike[str], tensors: dict[str, Tensor], scalars: dict[str, Any], step: int
) -> None:
    """Write one state atomically with respect to readers and to a kill at any point."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"trainer_state-{step:09d}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / name)
    tmp = directory / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps(scalars | {"format": STATE_FORMAT, "tensors": name}, indent=2, allow_nan=False))
    os.replace(tmp, directory / STATE_JSON)
    for old in directory.glob("trainer_state-*.safetensors"):
        if old.name != name:
            old.unlink()


def read_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors on CPU, scalars) of the last complete `write_state` in `directory`."""
    file = Path(directory) / STATE_JSON
    try:
        scalars = json.loads(file.read_text())
        if scalars.get("format") != STATE_FORMAT:
            raise UserError(
                f"{file} has format {scalars.get('format')!r}, not {STATE_FORMAT!r}: it was not "
                "written by this trainer; start a fresh run"
            )
        tensors = load_file(Path(directory) / scalars["tensors"], device="cpu")
    except FileNotFoundError as err:
        raise UserError(
            f"no complete trainer state in {directory} ({Path(err.filename).name} missing): "
            "point at a directory written by save_state, or start a fresh run"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, SafetensorError) as err:
        raise UserError(
            f"trainer state in {directory} is corrupt ({type(err).__name__}): resume from an "
            "earlier checkpoint or start a fresh run"
        ) from err
    return tensors, scalars
