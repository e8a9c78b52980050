"""The manifest every finished object carries; written last and atomically, so its presence means done."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


class Manifest(BaseModel):
    """What an object is, what made it, and what it holds."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    """`corpus`, `harvest`, ..."""
    id: str
    config: dict[str, Any]
    """The normalized config whose hash is the id."""
    code_version: str
    """Version of actstore (and git commit when available) that wrote it."""
    created: str
    """UTC time, ISO 8601."""
    counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per phase, and throughput figures (`tokens_per_s`)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Kind-specific facts, e.g. sites and their dtypes for a harvest."""
