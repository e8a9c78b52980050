"""Attribution of SAE features to a metric, computed offline from a gradient harvest.

`store/features/<sae_id>/<harvest_id>/attribution/` holds it; it does not need an encode of the same pair first
(both live side by side, the attribution in its own subdirectory with its own manifest):

    by_feature/, by_token/, summary.parquet, index.json
                           the feature-store layout (`schemas.features`) with `value` = the attribution
                           a = f_i * (dx_hat/df_i . g) of every active (feature, tok): sorted by (feature,
                           attribution desc, tok), so `store.feature_queries.FeatureQueries` reads it as it reads
                           activations (top examples, documents, densities)
    per_feature.parquet    signed and absolute sums per feature, and the tokens of largest |attribution|
    per_token.parquet      the decomposition x.g = features + bias + error per token (the error node)
    logit_weights.parquet  direct logit attribution: each feature's most promoted and suppressed tokens
    manifest.json          written last

Signs. The attribution is the feature's first-order contribution to the metric, f_i * dm/df_i with the SAE's
error term held fixed. Zero-ablating the feature changes the metric by about minus it:
m(f_i = 0) - m ≈ -attribution. The same holds for the error node (ablating the error: ≈ -error_attribution).
The metric is the one the harvest differentiated (`HarvestConfig.gradient_metric`), summed over each window's
positions, so a token's attribution counts its effect on every later prediction of its window.
"""

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from actstore.schemas.harvest import GradientMetric

ATTRIBUTION_DIR = "attribution"
"""Subdirectory of a feature store directory (`store/features/<sae_id>/<harvest_id>/`) holding the attribution."""
PER_FEATURE_NAME = "per_feature.parquet"
PER_TOKEN_NAME = "per_token.parquet"
LOGIT_WEIGHTS_NAME = "logit_weights.parquet"


class AttributeConfig(BaseModel):
    """Everything that determines an attribution's bytes; it is recorded in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae_id: str
    """SAE in the store (`actstore attribute --sae PATH` imports a checkpoint first)."""
    harvest_id: str
    """A harvest made with gradients (`actstore harvest --gradients loss|logit_diff`)."""
    site: str
    """Site of the harvest the SAE reads; the harvest must hold its gradient array."""
    metric: GradientMetric
    """The metric the harvest's gradients are of (copied from the harvest, for readers)."""
    logit_diff_tokens: tuple[int, int] | None = None
    """Token ids (a, b) of a `logit_diff` metric."""
    top_k: int = Field(default=32, ge=0)
    """Tokens of largest |attribution| kept per feature in `per_feature` (and largest attribution in `summary`)."""
    logit_k: int = Field(default=10, ge=1)
    """Promoted and suppressed tokens kept per feature in `logit_weights`."""


class AttributeRuntime(BaseModel):
    """How to run an attribution; none of it changes what is stored."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu."""
    batch_tokens: int = Field(default=4096, gt=0)
    """Rows attributed at once (bounds the dense latent and attribution matrices: 2 x batch_tokens x d_sae)."""
    allow_mismatch: bool = False
    """Attribute even when the SAE's recorded model or hook differ from the harvest."""
    progress: bool = True
    """Show a progress bar."""


def _list(item: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", item, nullable=False))


PER_FEATURE_SCHEMA = pa.schema(
    [
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # tokens on which the feature is active
        pa.field("attribution_sum", pa.float64(), nullable=False),  # over those tokens; 0 for a dead feature
        pa.field("attribution_mean", pa.float64()),  # null when dead
        pa.field("attribution_abs_mean", pa.float64()),
        pa.field("attribution_min", pa.float32()),
        pa.field("attribution_max", pa.float32()),
        pa.field("top_tok", _list(pa.int64()), nullable=False),  # largest |attribution| first, ties by tok
        pa.field("top_attribution", _list(pa.float32()), nullable=False),
    ]
)
"""`per_feature.parquet`: one row per feature 0..d_sae-1, dead ones included. The ablation estimate of a feature
over the whole harvest is `-attribution_sum`."""

PER_TOKEN_SCHEMA = pa.schema(
    [
        pa.field("tok", pa.int64(), nullable=False),
        pa.field("loss", pa.float32()),  # next-token cross entropy; null at each window's last position
        pa.field("l0", pa.int32(), nullable=False),  # active features
        pa.field("feature_attribution", pa.float32(), nullable=False),  # sum of the active features' attributions
        pa.field("bias_attribution", pa.float32(), nullable=False),  # the decoder bias' share of x_hat, dotted with g
        pa.field("error_attribution", pa.float32(), nullable=False),  # (x - x_hat) . g: the error node
        pa.field("total_attribution", pa.float32(), nullable=False),  # x . g = the three above
    ]
)
"""`per_token.parquet`, sorted by tok: how much of each token's first-order effect on the metric the SAE's
features carry and how much its error misses."""

LOGIT_WEIGHTS_SCHEMA = pa.schema(
    [
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("positive_ids", _list(pa.int64()), nullable=False),  # largest logit weight first
        pa.field("positive_tokens", _list(pa.string()), nullable=False),
        pa.field("positive_logits", _list(pa.float32()), nullable=False),
        pa.field("negative_ids", _list(pa.int64()), nullable=False),  # most negative first
        pa.field("negative_tokens", _list(pa.string()), nullable=False),
        pa.field("negative_logits", _list(pa.float32()), nullable=False),
    ]
)
"""`logit_weights.parquet`: per feature, the tokens whose logits its decoder direction raises and lowers most
directly (`transforms.logit_weights`: through the final norm's gain and the unembedding, per unit activation)."""
