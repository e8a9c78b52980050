"""actstore: a streaming data pipeline and feature store for neural-network activations.

The public door, in the spirit of `zarr.open`:

    import actstore
    store = actstore.open("./actstore-data")          # or "s3://bucket/prefix"
    store.tokens(corpus_id).filter(...).collect()
    store.activations(harvest_id, "blocks.6.hook_resid_post")[0:4096]
    store.features(sae_id, harvest_id).top(123, 20).collect()

The configs (`CorpusConfig`, `HarvestConfig`, ...) are what the CLI and pipeline files build, and `actstore.errors`
holds the exceptions a caller can catch. Everything else (`actstore.store`, `actstore.flows`, ...) is the
implementation behind this surface. Names resolve on first use, so `import actstore` stays cheap.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actstore.errors import (
        ConfigError,
        MismatchError,
        NotFoundError,
        UnsafeInputError,
        UserError,
    )
    from actstore.schemas.corpus import CorpusConfig
    from actstore.schemas.encode import EncodeConfig
    from actstore.schemas.eval import EvalConfig
    from actstore.schemas.harvest import HarvestConfig
    from actstore.schemas.model import ModelConfig
    from actstore.schemas.pipeline import PipelineConfig
    from actstore.schemas.train import TrainConfig
    from actstore.store import Store, open

_WHERE = {
    "open": "actstore.store",
    "Store": "actstore.store",
    "CorpusConfig": "actstore.schemas.corpus",
    "ModelConfig": "actstore.schemas.model",
    "HarvestConfig": "actstore.schemas.harvest",
    "TrainConfig": "actstore.schemas.train",
    "EncodeConfig": "actstore.schemas.encode",
    "EvalConfig": "actstore.schemas.eval",
    "PipelineConfig": "actstore.schemas.pipeline",
    "UserError": "actstore.errors",
    "NotFoundError": "actstore.errors",
    "MismatchError": "actstore.errors",
    "ConfigError": "actstore.errors",
    "UnsafeInputError": "actstore.errors",
}

__all__ = [
    "ConfigError",
    "CorpusConfig",
    "EncodeConfig",
    "EvalConfig",
    "HarvestConfig",
    "MismatchError",
    "ModelConfig",
    "NotFoundError",
    "PipelineConfig",
    "Store",
    "TrainConfig",
    "UnsafeInputError",
    "UserError",
    "open",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'actstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
