"""The sparse-feature tables (`store/features/<sae_id>/<harvest_id>/`): triples, per-feature summary, index.

An SAE turns each token's activation into a few non-zero latents. They are stored as triples
`(feature, tok, value)` twice (sorted by feature, and by token) plus one summary row per feature; `index.json`
says which part file holds which features or tokens, so a query opens one file instead of all of them.
"""

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

ValueDtype = Literal["float16", "float32"]
"""On-disk dtype of activation values: float16 halves the bytes and keeps ~3 significant digits, plenty for
ranking and display; float32 when values exceed float16's range (65504) or exact values matter."""

DEFAULT_TOP_K = 32
DEFAULT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)
INDEX_NAME = "index.json"
BY_FEATURE_DIR = "by_feature"
BY_TOKEN_DIR = "by_token"
SUMMARY_NAME = "summary.parquet"


def triples_schema(value_dtype: ValueDtype = "float16") -> pa.Schema:
    """Schema of `by_feature/part-*.parquet` and `by_token/part-*.parquet` (same columns, different order)."""
    return pa.schema(
        [
            pa.field("feature", pa.int32(), nullable=False),  # latent index, 0 <= feature < d_sae
            pa.field("tok", pa.int64(), nullable=False),  # global token index, joins the token table
            pa.field("value", pa.float16() if value_dtype == "float16" else pa.float32(), nullable=False),
        ]
    )


def quantile_column(q: float) -> str:
    """Summary column name of a quantile: 0.5 -> `q50`, 0.99 -> `q99`, 0.999 -> `q99.9`."""
    return f"q{round(q * 100, 6):g}"


def summary_schema(quantiles: tuple[float, ...] = DEFAULT_QUANTILES) -> pa.Schema:
    """Schema of `summary.parquet`: one row per feature 0..d_sae-1, dead ones included (count 0, stats null).

    Statistics are over the feature's stored (dtype-rounded) non-zero values; quantiles interpolate linearly
    between order statistics, as numpy's default does.
    """
    stats = [pa.field(name, pa.float32()) for name in ("mean", "max", *map(quantile_column, quantiles))]
    return pa.schema(
        [
            pa.field("feature", pa.int32(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),  # tokens on which the feature fires
            pa.field("density", pa.float64(), nullable=False),  # count / n_tokens
            *stats,
            pa.field("top_tok", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
            pa.field("top_value", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
        ]
    )


class FeatureTableConfig(BaseModel):
    """Everything that determines the bytes of a feature store; a resumed writer must be given the same."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_sae: int = Field(gt=0)
    """Number of latents; features are 0..d_sae-1."""
    n_tokens: int = Field(ge=0)
    """Tokens encoded (rows of the activation array); the denominator of density."""
    value_dtype: ValueDtype = "float16"
    """On-disk dtype of values."""
    top_k: int = Field(default=DEFAULT_TOP_K, ge=0)
    """Top examples per feature kept in the summary (`top_tok`, `top_value`)."""
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    """Quantiles of each feature's non-zero values kept in the summary."""
    bucket_rows: int = Field(default=4_000_000, gt=0)
    """Most triples sorted in memory at once; one by_feature part per bucket of whole features."""
    row_group_rows: int = Field(default=131_072, gt=0)
    """Parquet row-group size: the unit a filtered scan reads."""
    token_part_rows: int = Field(default=32_000_000, gt=0)
    """Target rows per by_token part (cut at chunk boundaries)."""

    @field_validator("quantiles")
    @classmethod
    def _quantiles_in_unit_interval(cls, quantiles: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= q <= 1.0 for q in quantiles) or len(set(quantiles)) != len(quantiles):
            raise ValueError(f"quantiles {list(quantiles)} must be distinct values in [0, 1]")
        return quantiles


class PartRange(BaseModel):
    """One part file and the half-open range of features (by_feature) or tokens (by_token) it covers.

    Ranges of consecutive parts touch, and together cover 0..d_sae (or 0..n_tokens), so the part holding a
    feature or token is found by bisection.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    """Path relative to the store directory, e.g. `by_feature/part-000003.parquet`."""
    start: int
    stop: int
    rows: int


class FeatureIndex(BaseModel):
    """`index.json`, written last by the writer: its presence means the tables are complete."""

    model_config = ConfigDict(extra="forbid")

    config: FeatureTableConfig
    n_chunks: int
    """Encode chunks the tables were built from."""
    nnz: int
    """Triples stored (rows of each copy)."""
    alive: int
    """Features that fire at least once."""
    by_feature: list[PartRange]
    by_token: list[PartRange]
