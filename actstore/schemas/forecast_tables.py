"""Arrow schemas of a forecast's tables (`store/forecasts/<forecast_id>/`).

Run tables first (what was measured), then fits and forecasts (what the laws say). Intervals are percentile
bootstrap intervals at the config's level; their ends are null where a bootstrap cannot vary (one document).
"""

import pyarrow as pa

from actstore.schemas.forecast import TARGET_VARIABLES

RUNS_SCHEMA = pa.schema(
    [
        pa.field("harvest_id", pa.string(), nullable=False),
        pa.field("corpus_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the harvest's model name
        pa.field("revision", pa.string()),  # hub revision: one checkpoint of a training run
        pa.field("control", pa.string()),  # e.g. reinit-s0 for a randomized-weights control; null for the model
        pa.field("n_params", pa.int64()),  # N the laws use: counted (as the config says) or given; null when unknown
        pa.field("n_params_total", pa.int64()),  # every parameter, tied weights once; null when N was given
        pa.field("n_params_non_embedding", pa.int64()),  # without embeddings and unembedding; null when given
        pa.field("n_params_source", pa.string()),  # "total" | "non_embedding" | "given"; null when unknown
        pa.field("tokens_trained", pa.int64()),  # D, when the config gives it
        pa.field("ctx_len", pa.int32(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),  # tokens averaged (finite loss, chosen split)
        pa.field("docs", pa.int64(), nullable=False),  # documents they belong to: the bootstrap's units
        pa.field("mean_loss", pa.float64(), nullable=False),  # nats per token
        pa.field("low", pa.float64()),
        pa.field("high", pa.float64()),
    ]
)
"""`runs.parquet`: one row per harvest; the interval resamples whole documents."""

POSITIONS_SCHEMA = pa.schema(
    [
        pa.field("harvest_id", pa.string(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),  # position in the window (0 holds BOS when the corpus adds one)
        pa.field("context", pa.int32(), nullable=False),  # corpus tokens the prediction at `pos` conditions on
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("docs", pa.int64(), nullable=False),
        pa.field("mean_loss", pa.float64(), nullable=False),
        pa.field("low", pa.float64()),
        pa.field("high", pa.float64()),
    ]
)
"""`positions.parquet`: per harvest and position, the mean loss of predicting the next token there."""

SAES_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string(), nullable=False),
        pa.field("sae_id", pa.string(), nullable=False),
        pa.field("harvest_id", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("architecture", pa.string()),  # null when the SAE's manifest is gone
        pa.field("d_sae", pa.int64()),
        pa.field("k", pa.float64()),  # configured k (topk, batchtopk); null for other architectures
        pa.field("l0", pa.float64()),
        pa.field("nmse", pa.float64()),
        pa.field("fvu", pa.float64()),
        pa.field("ce_clean", pa.float64()),
        pa.field("ce_spliced", pa.float64()),
        pa.field("ce_delta", pa.float64()),  # ce_spliced - ce_clean; null when the downstream pass was skipped
    ]
)
"""`saes.parquet`: one row per SAE evaluation, with the SAE's width and sparsity."""

FITS_SCHEMA = pa.schema(
    [
        pa.field("law", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),  # what the points share: a corpus, a harvest, harvest/site
        pa.field("variables", pa.string(), nullable=False),  # comma-separated, in the law's order, e.g. "N,D"
        pa.field("param", pa.string(), nullable=False),  # E, A, B, alpha, beta
        pa.field("estimate", pa.float64(), nullable=False),
        pa.field("low", pa.float64()),
        pa.field("high", pa.float64()),
        pa.field("n_points", pa.int64(), nullable=False),
        pa.field("objective", pa.float64(), nullable=False),  # summed Huber loss of the log residuals
    ]
)
"""`fits.parquet`: one row per parameter of every fitted law."""

FORECASTS_SCHEMA = pa.schema(
    [
        pa.field("law", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),  # e.g. "N=1e+09,D=2e+10"
        pa.field("multiple", pa.float64()),
    ]  # extrapolation factor of the largest observed size; null: a given target
    + [pa.field(name, pa.float64()) for name in TARGET_VARIABLES]  # the law's variables; others null
    + [
        pa.field("point", pa.float64(), nullable=False),
        pa.field("low", pa.float64()),
        pa.field("high", pa.float64()),
        # L - E: for the loss laws the KL per token (nats) more scale can still remove; for SAE laws the part of
        # the metric more latents and active latents can still remove
        pa.field("reducible", pa.float64(), nullable=False),
        pa.field("reducible_low", pa.float64()),
        pa.field("reducible_high", pa.float64()),
    ]
)
"""`forecasts.parquet`: each fitted law at each target that names its variables."""

TABLES = {
    "runs": RUNS_SCHEMA,
    "positions": POSITIONS_SCHEMA,
    "saes": SAES_SCHEMA,
    "fits": FITS_SCHEMA,
    "forecasts": FORECASTS_SCHEMA,
}
"""Every table of a forecast, by file stem."""
