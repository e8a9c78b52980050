"""What the flows of one process share: the loaded model, and how flow and task calls run.

Flows and Dask workers load a model here and never pass it as a task argument (Prefect would hash it, and a
worker would receive a copy per task); `model_loads` lets a scaled-out run report how often that happened.
Step flows and tasks are declared with this module's `flow` and `task`: Prefect's own, except that a CLI
command with no Prefect server configured runs them as plain calls (`allow_untracked_runs`).
"""

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import prefect
import torch

from actstore.flows.tracking import tracked
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


class Task(prefect.Task):
    """A Prefect task that is a plain call when runs are not tracked (see `allow_untracked_runs`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs) if tracked() else self.fn(*args, **kwargs)


class Flow(prefect.Flow):
    """A Prefect flow that is a plain call when runs are not tracked (see `allow_untracked_runs`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not tracked():
            return self.fn(*args, **kwargs)
        _quiet_user_errors()
        return super().__call__(*args, **kwargs)


class _OneLineUserErrors(logging.Filter):
    """Prefect logs task failures with tracebacks; for a UserError the message alone is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from actstore.schemas.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


@functools.cache
def _quiet_user_errors() -> None:
    """Set Prefect's logging up before the first tracked run (it would then) and filter every handler it has."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(_OneLineUserErrors())


def task(**options: Any) -> Callable[[Callable[..., Any]], Task]:
    """`@task(name=...)`, as Prefect's, for our step tasks."""
    return lambda fn: Task(fn=fn, **options)


def flow(**options: Any) -> Callable[[Callable[..., Any]], Flow]:
    """`@flow(name=...)`, as Prefect's, for our step flows."""
    return lambda fn: Flow(fn=fn, **options)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run's logger inside a tracked run (its lines go to the server), else the module logger."""
    if tracked():
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    return logging.getLogger("actstore")


def run_figures(tokens: int, seconds: float) -> dict[str, float | int]:
    """The figures every chunked run reports in its manifest's timings: how long, how many tokens, how fast."""
    return {
        "run_seconds": round(seconds, 3),
        "tokens_this_run": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
    }
