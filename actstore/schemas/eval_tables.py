"""Arrow schemas of evaluation and transfer results (`store/evals/<eval_id>/`, `store/transfers/<transfer_id>/`).

Results are data: every table carries the ids of what was evaluated and joins on `tok` or `feature`."""

import pyarrow as pa

RECONSTRUCTION_FIELDS = (
    "tokens",
    "l0",
    "explained_variance",
    "fvu",
    "nmse",
    "mse",
    "cosine",
    "norm_ratio",
    "shrinkage",
    "dead",
    "dense_1pct",
    "dense_10pct",
)
"""Headline reconstruction and latent numbers, in the order tables and printouts show them."""

DOWNSTREAM_FIELDS = (
    "ce_tokens",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "ce_mean",
    "ce_recovered_zero",
    "ce_recovered_mean",
    "kl_spliced",
    "kl_zero",
    "kl_mean",
)
"""Next-token loss with the SAE spliced in, against the clean model and zero / mean ablation of the site."""

_INTS = {"tokens", "dead", "dense_1pct", "dense_10pct", "ce_tokens"}

EVAL_SUMMARY_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=False) for name in ("eval_id", "sae_id", "harvest_id", "site", "split")]
    + [pa.field("d_sae", pa.int64()), pa.field("excluded_tokens", pa.int64())]
    + [
        pa.field(name, pa.int64() if name in _INTS else pa.float64())
        for name in RECONSTRUCTION_FIELDS + DOWNSTREAM_FIELDS
    ]
)
"""`summary.parquet`: one row per evaluation; downstream columns are null when it was skipped."""

PER_TOKEN_SCHEMA = pa.schema(
    [pa.field("tok", pa.int64(), nullable=False), pa.field("pos", pa.int32(), nullable=False)]
    + [pa.field(name, pa.float32()) for name in ("sq_error", "nmse", "l0", "cosine", "norm_ratio", "x_norm")]
    + [pa.field("excluded", pa.bool_(), nullable=False)]
    + [
        pa.field(name, pa.float32())
        for name in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl_spliced", "kl_zero", "kl_mean")
    ]
)
"""`per_token.parquet`: per evaluated token, so per-token error vs L0 can be plotted and outliers listed.
Downstream columns are null outside the downstream subset and at each window's last position (no next token).
Excluded tokens (BOS, outlier norms) keep their metrics but are left out of every sum."""

PER_FEATURE_SCHEMA = pa.schema(
    [
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # evaluated tokens on which the feature fired
        pa.field("density", pa.float64(), nullable=False),
        pa.field("mean_value", pa.float32()),  # mean of its non-zero activations; null when dead
        pa.field("max_value", pa.float32(), nullable=False),
    ]
)
"""`per_feature.parquet`: latent statistics on the evaluated tokens."""

DENSITY_HISTOGRAM_SCHEMA = pa.schema(
    [
        pa.field("log10_lo", pa.float64(), nullable=False),
        pa.field("log10_hi", pa.float64(), nullable=False),
        pa.field("n_features", pa.int64(), nullable=False),
    ]
)
"""`density_histogram.parquet`: features that fired, by log10 density; dead ones are counted in the summary."""

TRANSFER_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("transfer_id", pa.string(), nullable=False),
        pa.field("harvest_a", pa.string(), nullable=False),
        pa.field("harvest_b", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("cos_mean", pa.float64()),
        pa.field("cos_std", pa.float64()),
        pa.field("euclid_mean", pa.float64()),
        pa.field("euclid_std", pa.float64()),
    ]
)
"""`summary.parquet` of a transfer: per site, the global mean over all tokens of the two models' similarity."""

TRANSFER_PER_TOKEN_SCHEMA = pa.schema(
    [
        pa.field("site", pa.string(), nullable=False),
        pa.field("tok", pa.int64(), nullable=False),
        pa.field("cosine", pa.float32()),
        pa.field("euclid", pa.float32()),
    ]
)

TRANSFER_PER_POSITION_SCHEMA = pa.schema(
    [
        pa.field("site", pa.string(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("cos_mean", pa.float64()),
        pa.field("euclid_mean", pa.float64()),
    ]
)

HISTOGRAM_SCHEMA = pa.schema(
    [
        pa.field("site", pa.string(), nullable=False),
        pa.field("measure", pa.string(), nullable=False),  # "cosine" | "euclid"
        pa.field("lo", pa.float64(), nullable=False),
        pa.field("hi", pa.float64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
    ]
)

FEATURE_TRANSFER_SCHEMA = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("density_a", pa.float64()),  # on its own model's tokens
        pa.field("density_b", pa.float64()),  # on the other model's activations of the same tokens
        pa.field("act_corr", pa.float64()),  # Pearson r of the feature's activations on A vs on B, same tokens
        pa.field("logit_cos", pa.float64()),  # cosine of W_dec[i]·W_U of the two models; null without both heads
    ]
)
"""`feature_transfer.parquet`: per feature of each SAE, how it carries over to the other model."""

SAE_TRANSFER_SCHEMA = pa.schema(
    [
        pa.field("direction", pa.string(), nullable=False),  # "a_on_a" | "a_on_b" | "b_on_b" | "b_on_a"
        pa.field("log_density_corr", pa.float64()),  # vs the SAE on its own model's activations
        pa.field("ce_delta", pa.float64()),  # ce_spliced - ce_clean of the model the SAE was spliced into
        *EVAL_SUMMARY_SCHEMA,
    ]
)
"""`sae_transfer.parquet`: every evaluation metric of each SAE on its own model and on the other one."""
