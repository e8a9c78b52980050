"""What a feature dashboard shows, gathered for every live feature at once from the feature store's tables.

The per-feature queries of `FeatureQueries` cost a few milliseconds each: right for one page, minutes for tens of
thousands. Here each table is read once instead:
- the summary gives the index (one row per feature) and each feature's top examples (`top_tok`, `top_value`);
- one pass over the by_feature parts, in parallel, gives each feature's activation histogram, its examples across
  quantiles of its activations, and its activation on every token of every example's context window;
- one filtered read of the token table gives the windows' token ids;
- one filtered read of by_token gives the features that fire on each feature's top examples (co-occurrence).

Context windows are the `context` tokens either side of the example from the same window of the corpus; since
`tok = seq * ctx_len + pos`, a window's tokens follow from `tok` and `ctx_len` alone.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import NamedTuple

import numpy as np
import polars as pl

from actstore.schemas.errors import UserError
from actstore.schemas.features import PartRange
from actstore.store.feature_queries import FeatureQueries

SECTIONS = ("top", "quantile")
"""Example sections of a feature page, in the order of the `section` code."""


class DashboardOptions(NamedTuple):
    """How much each feature page shows."""

    top_k: int = 20
    """Top examples per feature (at most the store's summary top_k)."""
    context: int = 8
    """Tokens shown either side of an example's token."""
    quantiles: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99, 1.0)
    """Edges of the activation-rank buckets that quantile examples are drawn from."""
    per_bucket: int = 5
    """Quantile examples per bucket."""
    bins: int = 24
    """Bars of each feature's activation histogram."""
    cooccurring: int = 10
    """Co-occurring features listed per feature."""


DEFAULT_OPTIONS = DashboardOptions()


class FeatureData(NamedTuple):
    """Everything the index and the feature pages show, for every feature that fires."""

    index: pl.DataFrame
    """One row per feature 0..d_sae-1: the summary's statistics (no top lists), then any extra columns."""
    examples: pl.DataFrame
    """One row per example: example (id), feature, section (0 top, 1 quantile), bucket, q_low, q_high, rank
    (top: 0 for the highest; quantile: the ascending rank among the feature's activations), tok, value; ordered
    by feature, section, bucket, then value descending."""
    windows: pl.DataFrame
    """One row per example and offset -context..context (row `example * (2 context + 1) + context + offset`):
    example, offset, tok, token_id, value (this feature's activation there, 0 where silent); tok and token_id
    are null where the offset leaves the example's window of the corpus."""
    histogram_range: np.ndarray
    """[d_sae, 2] float64: the value range each feature's histogram spans (lowest, highest activation)."""
    histogram: np.ndarray
    """[d_sae, bins] int64: each feature's activations counted in equal-width bins over its range."""
    cooccurrence: pl.DataFrame
    """feature, other, count: how many of the feature's top examples `other` also fires on; most first."""


def gather(
    queries: FeatureQueries,
    ctx_len: int,
    options: DashboardOptions = DEFAULT_OPTIONS,
    extra: pl.DataFrame | None = None,
    workers: int = 2,
) -> FeatureData:
    """Read the feature store once and return what every page shows.

    `extra`: more per-feature columns for the index (a `feature` column plus numbers, e.g. attribution scores
    or an evaluation's per-feature results), joined on `feature`; columns the summary already has are dropped.
    """
    _check(options, ctx_len)
    if queries.tokens is None:
        raise UserError("the dashboard needs the token table: open the features with store.features(sae, harvest)")
    summary = queries.summary.collect()
    index = summary.drop("top_tok", "top_value")
    if extra is not None and not extra.is_empty():
        if "feature" not in extra.columns:
            raise UserError(f"extra per-feature columns {extra.columns} lack a `feature` column: add one")
        columns = ["feature", *(c for c in extra.columns if c not in index.columns)]
        index = index.join(
            extra.select(columns).with_columns(pl.col("feature").cast(pl.Int32)),
            on="feature",
            how="left",
            maintain_order="left",
        )
    top = top_examples(summary, options.top_k)
    counts = summary["count"].to_numpy()
    parts = [part for part in queries.index.by_feature if part.rows]

    def one_part(part: PartRange) -> _PartResult:
        return _scan_part(queries, part, counts, top, options, ctx_len)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one_part, parts))
    d_sae = queries.config.d_sae
    histogram_range = np.zeros((d_sae, 2))
    histogram = np.zeros((d_sae, options.bins), dtype=np.int64)
    examples, windows, first = [], [], 0
    for result in results:
        histogram_range[result.features] = result.histogram_range
        histogram[result.features] = result.histogram
        examples.append(result.examples.with_columns(pl.col("example") + first))
        windows.append(result.windows.with_columns(pl.col("example") + first))
        first += len(result.examples)
    examples_frame = pl.concat(examples) if examples else _EMPTY_EXAMPLES
    window_frame = _with_token_ids(pl.concat(windows) if windows else _EMPTY_WINDOWS, queries.tokens)
    return FeatureData(
        index, examples_frame, window_frame, histogram_range, histogram, cooccurrence(queries, top, options.cooccurring)
    )


def _check(options: DashboardOptions, ctx_len: int) -> None:
    for name in ("top_k", "context", "per_bucket", "cooccurring"):
        if getattr(options, name) < 0:
            raise UserError(f"dashboard {name}={getattr(options, name)} is negative: pass a count >= 0")
    if options.bins < 1:
        raise UserError(f"dashboard bins={options.bins} must be at least 1")
    qs = options.quantiles
    if len(qs) < 2 or qs[0] < 0 or qs[-1] > 1 or any(a >= b for a, b in pairwise(qs)):
        raise UserError(f"quantile edges {list(qs)} must rise strictly within [0, 1] and have at least two edges")
    if ctx_len < 1:
        raise ValueError(f"ctx_len={ctx_len} must be positive")


def top_examples(summary: pl.DataFrame, k: int) -> pl.DataFrame:
    """The k highest activations of each live feature, from the summary's `top_tok` / `top_value` lists:
    feature, section (0), bucket (0), q_low, q_high (null), rank, tok, value."""
    return (
        summary.lazy()
        .filter(pl.col("count") > 0)
        .select("feature", tok=pl.col("top_tok").list.head(k), value=pl.col("top_value").list.head(k))
        .with_columns(rank=pl.int_ranges(pl.col("tok").list.len(), dtype=pl.Int32))
        .explode("tok", "value", "rank")
        .filter(pl.col("tok").is_not_null())
        .select(
            pl.col("feature").cast(pl.Int32),
            section=pl.lit(0, pl.Int8),
            bucket=pl.lit(0, pl.Int8),
            q_low=pl.lit(None, pl.Float64),
            q_high=pl.lit(None, pl.Float64),
            rank="rank",
            tok=pl.col("tok").cast(pl.Int64),
            value=pl.col("value").cast(pl.Float32),
        )
        .collect()
    )


def quantile_ranks(counts: np.ndarray, quantiles: Sequence[float], per_bucket: int) -> pl.DataFrame:
    """Evenly spaced picks from each bucket of each feature's activations ranked in ascending order.

    Bucket b holds ascending ranks floor(q_b n) .. floor(q_b+1 n) - 1; from a bucket of size s, min(s, m) ranks
    are taken, at low + floor(j s / min(s, m)) for j = 0, 1, ..., so they spread over the whole bucket and the
    same store always shows the same examples. Columns: local (index into `counts`), bucket, q_low, q_high,
    rank (ascending)."""
    n = np.asarray(counts, dtype=np.int64)
    edges = np.floor(np.outer(quantiles, n)).astype(np.int64)  # [edges, features]
    frames = []
    for bucket, (q_low, q_high) in enumerate(pairwise(quantiles)):
        low, size = edges[bucket], edges[bucket + 1] - edges[bucket]
        take = np.minimum(size, per_bucket)
        local = np.repeat(np.arange(len(n)), take)
        j = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
        rank = low[local] + (j * size[local]) // np.maximum(take[local], 1)
        frames.append(
            pl.DataFrame(
                {
                    "local": local,
                    "bucket": np.full(len(local), bucket, np.int8),
                    "q_low": np.full(len(local), q_low),
                    "q_high": np.full(len(local), q_high),
                    "rank": rank,
                }
            )
        )
    return pl.concat(frames)


class _PartResult(NamedTuple):
    features: np.ndarray
    histogram_range: np.ndarray
    histogram: np.ndarray
    examples: pl.DataFrame
    windows: pl.DataFrame


def _scan_part(
    queries: FeatureQueries,
    part: PartRange,
    counts: np.ndarray,
    top: pl.DataFrame,
    options: DashboardOptions,
    ctx_len: int,
) -> _PartResult:
    """Histograms, quantile examples and window activations of the features of one by_feature part."""
    triples = pl.read_parquet(queries.dir / part.file).with_columns(pl.col("value").cast(pl.Float32))
    value = triples["value"].to_numpy()
    part_counts = counts[part.start : part.stop]
    first = np.concatenate([[0], np.cumsum(part_counts)])
    live = np.flatnonzero(part_counts)
    features = (part.start + live).astype(np.int32)

    # Rows are sorted by value descending within a feature: its first row is its max, its last its min. Bins are
    # numpy.histogram's over [min(lowest, 0), highest]: the same edges, and values that rounding put one bin off
    # moved back to the bin whose edges hold them, as numpy does.
    high, low = value[first[live]].astype(np.float64), value[first[live + 1] - 1].astype(np.float64)
    low = np.minimum(low, 0.0)
    width = np.where(high > low, high - low, 1.0)
    owner = np.repeat(np.arange(len(live)), part_counts[live])
    bins = options.bins
    edges = np.arange(bins + 1) * (width / bins)[:, None] + low[:, None]
    edges[:, -1] = np.where(high > low, high, low + 1.0)  # numpy sets its last edge to the range end exactly
    at = value.astype(np.float64)
    slot = np.clip(((at - low[owner]) / width[owner] * bins).astype(np.int64), 0, bins - 1)
    slot -= at < edges[owner, slot]
    slot += (at >= edges[owner, slot + 1]) & (slot < bins - 1)
    histogram = np.bincount(owner * bins + slot, minlength=len(live) * bins).reshape(len(live), bins)

    picks = quantile_ranks(part_counts[live], options.quantiles, options.per_bucket)
    local = picks["local"].to_numpy()
    row = first[live][local] + part_counts[live][local] - 1 - picks["rank"].to_numpy()
    quantile = (
        picks.with_columns(
            feature=pl.Series(features[local]),
            row=pl.Series(row),
            tok=triples["tok"].gather(row),
            value=pl.Series(value[row]),
        )
        .sort("feature", "bucket", "row")
        .select(
            "feature",
            section=pl.lit(1, pl.Int8),
            bucket="bucket",
            q_low="q_low",
            q_high="q_high",
            rank=pl.col("rank").cast(pl.Int32),
            tok="tok",
            value="value",
        )
    )
    mine = top.filter(pl.col("feature").is_between(part.start, part.stop, closed="left"))
    examples = pl.concat([mine, quantile]).sort("feature", "section", maintain_order=True).with_row_index("example")

    windows = _windows(examples["feature"].to_numpy(), examples["tok"].to_numpy(), options.context, ctx_len)
    windows = windows.with_columns(
        value=pl.Series(_lookup(triples, windows["feature"].to_numpy(), windows["tok"]))
    ).drop("feature")
    return _PartResult(features, np.stack([low, high], axis=1), histogram, examples, windows)


def _windows(feature: np.ndarray, tok: np.ndarray, context: int, ctx_len: int) -> pl.DataFrame:
    """Every offset within `context` of each example: example (row of the inputs), offset, feature, tok; tok is
    null where the offset leaves the example's window of the corpus. Ordered by example, offset."""
    offsets = np.arange(-context, context + 1, dtype=np.int32)
    toks = tok[:, None] + offsets
    inside = ((toks >= 0) & (toks // ctx_len == (tok // ctx_len)[:, None])).ravel()
    return pl.DataFrame(
        {
            "example": np.repeat(np.arange(len(tok), dtype=np.uint32), len(offsets)),
            "offset": np.tile(offsets, len(tok)),
            "feature": np.repeat(feature, len(offsets)),
            "tok": pl.Series(toks.ravel()).set(pl.Series(~inside), None),  # type: ignore[arg-type]
        }
    )


def _lookup(triples: pl.DataFrame, feature: np.ndarray, tok: pl.Series) -> np.ndarray:
    """The value of each (feature, tok) pair among `triples` (not empty), 0 where the feature is silent or tok is
    null: one sort of the triples by a (feature, tok) key and a binary search per pair (a hash join on the two
    columns ran 10x slower)."""
    inside = tok.is_not_null().to_numpy()
    toks = tok.fill_null(0).to_numpy()
    t_feature, t_tok = triples["feature"].to_numpy(), triples["tok"].to_numpy()
    stride = int(max(t_tok.max(), toks.max(initial=0))) + 1
    keys = t_feature.astype(np.int64) * stride + t_tok
    order = np.argsort(keys)
    keys = keys[order]
    wanted = feature.astype(np.int64) * stride + toks
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = (keys[at] == wanted) & inside
    return np.where(found, triples["value"].to_numpy()[order][at], 0.0).astype(np.float32)


def _with_token_ids(windows: pl.DataFrame, tokens: pl.LazyFrame) -> pl.DataFrame:
    """Add each window token's id from the token table: one filtered read for all windows, then a binary search
    in its tok column (the table is sorted by tok)."""
    wanted = windows["tok"].drop_nulls().unique()
    table = tokens.filter(pl.col("tok").is_in(wanted.implode())).select("tok", "token_id").sort("tok").collect()
    known = table["tok"].to_numpy()
    toks = windows["tok"].fill_null(-1).to_numpy()
    at = np.minimum(np.searchsorted(known, toks), max(len(known) - 1, 0))
    inside = toks >= 0
    if len(wanted) and not np.array_equal(known[at[inside]], toks[inside]):
        raise UserError("the token table lacks tokens the feature store refers to: re-ingest the corpus")
    ids = table["token_id"].gather(at) if len(known) else pl.Series("token_id", [None] * len(toks), pl.Int32)
    return windows.with_columns(token_id=ids.set(pl.Series(~inside), None)).select(  # type: ignore[arg-type]
        "example", "offset", "tok", "token_id", "value"
    )


def cooccurrence(queries: FeatureQueries, top: pl.DataFrame, limit: int) -> pl.DataFrame:
    """For each feature, the other features firing on its top examples' tokens, with how many of them.

    The (feature, other) pairs are counted as runs of one sorted int64 key: most pairs occur once, so a group-by
    makes nearly one group per pair and ran 4x slower than the sort."""
    if top.is_empty() or limit == 0:
        return _EMPTY_COOCCURRENCE
    toks = top["tok"].unique()
    lo, hi = int(toks.min()), int(toks.max()) + 1  # type: ignore[arg-type]
    firing = (
        queries.token_range(lo, hi).filter(pl.col("tok").is_in(toks.implode())).select("tok", other="feature").collect()
    )
    d_sae = queries.config.d_sae
    keys = (
        top.select("feature", "tok")
        .join(firing, on="tok")
        .filter(pl.col("other") != pl.col("feature"))
        .select(key=pl.col("feature").cast(pl.Int64) * d_sae + pl.col("other"))
    )["key"].sort()
    runs = keys.rle().struct.unnest()
    return (
        runs.select(
            feature=(pl.col("value") // d_sae).cast(pl.Int32),
            other=(pl.col("value") % d_sae).cast(pl.Int32),
            count=pl.col("len").cast(pl.Int32),
        )
        .filter(pl.col("count") >= pl.col("count").top_k(limit).min().over("feature"))
        .sort("feature", "count", "other", descending=[False, True, False])
        .group_by("feature", maintain_order=True)
        .head(limit)
    )


_EMPTY_EXAMPLES = pl.DataFrame(
    schema={
        "example": pl.UInt32,
        "feature": pl.Int32,
        "section": pl.Int8,
        "bucket": pl.Int8,
        "q_low": pl.Float64,
        "q_high": pl.Float64,
        "rank": pl.Int32,
        "tok": pl.Int64,
        "value": pl.Float32,
    }
)
_EMPTY_WINDOWS = pl.DataFrame(schema={"example": pl.UInt32, "offset": pl.Int32, "tok": pl.Int64, "value": pl.Float32})
_EMPTY_COOCCURRENCE = pl.DataFrame(schema={"feature": pl.Int32, "other": pl.Int32, "count": pl.Int32})
