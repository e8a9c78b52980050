"""What the flows of one process share: the loaded model, kept once per process and device.

Flows and Dask workers load a model here and never pass it as a task argument (Prefect would hash it, and a
worker would receive a copy per task); `model_loads` lets a scaled-out run report how often that happened.
"""

import functools
import threading

import torch

from actstore.schemas.model import ModelConfig
from actstore.transforms.models import load_model

_loads: list[str] = []

MODEL_LOCK = threading.Lock()
"""One forward at a time per process: hooks live on the shared cached model, so two tasks in threads of one
worker would capture each other's activations."""


@functools.lru_cache(maxsize=2)
def cached_model(config: ModelConfig, device: str) -> torch.nn.Module:
    """One model per process and device: flows and workers load it once, never pass it as an argument."""
    _loads.append(config.label())
    return load_model(config, torch.device(device))


def model_loads() -> int:
    """Models this process has loaded: a Dask worker running many shards should report 1."""
    return len(_loads)
