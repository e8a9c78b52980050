"""Querying the sparse-feature store with polars: every query returns a LazyFrame, so users compose.

    q = FeatureQueries(directory, tokens=store.tokens(corpus_id), decode=tokenizer.decode)
    q.top_examples(123, k=20).collect()
    q.density().filter(pl.col("density") > 0.01).collect()
    q.by_feature.filter(pl.col("value") > 5).group_by("feature").len().collect()   # the raw tables

A query opens only the part files that `index.json` says hold its feature or tokens. Inside a by_feature part
a feature's rows are found by position (cumulative counts from the summary) and inside a by_token part by the
min/max statistics of the sorted `tok` column, so one feature or one document costs a file footer and a row
group or two, whatever the store's size.

The token table (tok, doc, seq, pos, token_id, split) and the tokenizer's `decode` / `encode` are injected by
the caller: `store` cannot import `transforms`. Values come back as Float32 whatever the on-disk dtype.
"""

import functools
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from actstore.schemas.errors import UserError
from actstore.schemas.features import SUMMARY_NAME, PartRange
from actstore.store.features import read_index

Decode = Callable[[Sequence[int]], str]
Encode = Callable[[str], Sequence[int]]
DEFAULT_BUCKETS: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99, 1.0)
CENTER_OPEN, CENTER_CLOSE = "«", "»"
VALUE = pl.col("value").cast(pl.Float32)


def _empty(**schema: Any) -> pl.LazyFrame:
    return pl.LazyFrame(schema=schema)


def _count(name: str, value: int) -> int:
    if value < 0:
        raise UserError(f"{name}={value} is negative: pass a count >= 0")
    return int(value)


class FeatureQueries:
    """Read access to one finished feature store (`store/features/<sae_id>/<harvest_id>/`)."""

    def __init__(
        self,
        directory: str | Path,
        tokens: pl.LazyFrame | None = None,
        decode: Decode | None = None,
        encode: Encode | None = None,
    ) -> None:
        """`tokens`: the corpus token table the activations were harvested from (context, documents,
        token lookups need it); `decode`: token ids -> text; `encode`: text -> token ids, without special
        tokens (for `on_token` with a string)."""
        self.dir = Path(directory)
        index = read_index(self.dir)
        if index is None:
            raise UserError(f"no finished feature store at {self.dir}: run the encode (or re-run it to resume)")
        self.index = index
        self.config = index.config
        self.tokens, self.decode, self.encode = tokens, decode, encode
        self._feature_starts = [part.start for part in index.by_feature]

    # -- the tables as they are -----------------------------------------------------------------------------

    def _scan(self, parts: Sequence[PartRange]) -> pl.LazyFrame:
        if not parts:
            value = pl.Float16 if self.config.value_dtype == "float16" else pl.Float32
            return _empty(feature=pl.Int32, tok=pl.Int64, value=value)
        return pl.scan_parquet([self.dir / part.file for part in parts])

    @property
    def by_feature(self) -> pl.LazyFrame:
        """All triples (feature, tok, value), sorted by feature, value descending, tok."""
        return self._scan(self.index.by_feature)

    @property
    def by_token(self) -> pl.LazyFrame:
        """All triples (feature, tok, value), sorted by tok, feature."""
        return self._scan(self.index.by_token)

    @property
    def summary(self) -> pl.LazyFrame:
        """One row per feature: count, density, mean, max, quantiles, top_tok, top_value."""
        return pl.scan_parquet(self.dir / SUMMARY_NAME)

    # -- one feature ----------------------------------------------------------------------------------------

    def _feature(self, feature: int) -> int:
        if not 0 <= feature < self.config.d_sae:
            raise UserError(f"feature {feature} is out of range: this SAE has features 0..{self.config.d_sae - 1}")
        return int(feature)

    @functools.cached_property
    def _first_rows(self) -> np.ndarray:
        """Row of each feature's first triple in the global by_feature order (cumulative summary counts)."""
        counts = pl.read_parquet(self.dir / SUMMARY_NAME, columns=["count"])["count"].to_numpy()
        return np.concatenate([[0], np.cumsum(counts)])

    def examples(self, feature: int) -> pl.LazyFrame:
        """Every activation of one feature, highest first (ties by tok): columns tok, value."""
        feature = self._feature(feature)
        part = self.index.by_feature[bisect_right(self._feature_starts, feature) - 1]
        first = self._first_rows
        # A positional slice, not a filter on `feature`: polars then reads only the row groups holding the rows
        # asked for (a hot feature's top 100 is one row group, where a filter decodes every group it spans).
        offset, count = int(first[feature] - first[part.start]), int(first[feature + 1] - first[feature])
        return self._scan([part]).slice(offset, count).select("tok", VALUE)

    def top_examples(self, feature: int, k: int = 20, context: int | None = 8) -> pl.LazyFrame:
        """The k highest activations of a feature with `context` tokens either side from the same window.

        Columns: rank, tok, value, then (unless context is None) doc, seq, pos, token_id,
        context_token_ids (list), center (index of the activating token in that list), and with `decode`
        context_tokens (list of str) and context_text (str, the activating token in «»).
        """
        top = self.examples(feature).head(_count("k", k)).with_row_index("rank")
        return top if context is None else self._with_context(top.collect(), context, "top_examples")

    def quantile_examples(
        self,
        feature: int,
        n_per_bucket: int = 5,
        quantiles: Sequence[float] = DEFAULT_BUCKETS,
        seed: int = 0,
        context: int | None = 8,
    ) -> pl.LazyFrame:
        """Examples across the activation range: the feature's activations are cut into buckets by rank
        (bucket b holds ascending ranks floor(q_b n) .. floor(q_b+1 n) - 1), and up to n_per_bucket are drawn
        from each without replacement by `numpy.random.default_rng([seed, feature])`, so draws repeat.

        Columns: bucket, q_low, q_high, tok, value (then context columns as in `top_examples`), ordered by
        bucket, then value descending.
        """
        feature = self._feature(feature)
        qs = [float(q) for q in quantiles]
        if len(qs) < 2 or qs[0] < 0 or qs[-1] > 1 or any(a >= b for a, b in pairwise(qs)):
            raise UserError(f"quantiles {qs} must rise strictly within [0, 1] and have at least two edges")
        count = int(self._first_rows[feature + 1] - self._first_rows[feature])
        edges = np.floor(np.array(qs) * count).astype(np.int64)
        rng = np.random.default_rng([seed, feature])
        rows, buckets = [], []
        for bucket, (low, high) in enumerate(pairwise(edges)):
            size = int(high - low)
            if size > 0:
                ranks = low + rng.choice(size, size=min(_count("n_per_bucket", n_per_bucket), size), replace=False)
                rows.append(count - 1 - ranks)  # ascending rank -> row in the descending by_feature order
                buckets.append(np.full(len(ranks), bucket))
        bucket = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
        picks = pl.DataFrame(
            {
                "row": np.concatenate(rows) if rows else bucket,
                "bucket": bucket,
                "q_low": np.array(qs[:-1])[bucket],
                "q_high": np.array(qs[1:])[bucket],
            },
            schema={"row": pl.UInt32, "bucket": pl.Int32, "q_low": pl.Float64, "q_high": pl.Float64},
        )
        chosen = (
            self.examples(feature)
            .with_row_index("row")
            .join(picks.lazy(), on="row")
            .sort("bucket", "row")
            .select("bucket", "q_low", "q_high", "tok", "value")
        )
        return chosen if context is None else self._with_context(chosen.collect(), context, "quantile_examples")

    def _with_context(self, examples: pl.DataFrame, context: int, query: str) -> pl.LazyFrame:
        """Add each example's token facts and its window of +-context tokens of the same seq."""
        tokens = self._tokens(query)
        if context < 0:
            raise UserError(f"context {context} is negative: pass a number of tokens >= 0, or None")
        offsets = np.arange(-context, context + 1)
        window = np.unique((examples["tok"].to_numpy()[:, None] + offsets).ravel())
        # Read the windows' tokens once (at most k * (2 context + 1) rows): the plan below uses them twice.
        table = (
            tokens.filter(pl.col("tok").is_in(pl.Series(window, dtype=pl.Int64).implode()))
            .select("tok", "doc", "seq", "pos", "token_id")
            .collect()
            .lazy()
        )
        found = examples.lazy().with_row_index("_row").join(table, on="tok", how="left")
        windows = (
            found.select("_row", "tok", "seq")
            .join(pl.LazyFrame({"offset": offsets}), how="cross")
            .with_columns(tok=pl.col("tok") + pl.col("offset"))
            .join(table.select("tok", pl.col("seq").alias("window_seq"), "token_id"), on="tok")
            .filter(pl.col("window_seq") == pl.col("seq"))
            .sort("_row", "offset")
            .group_by("_row", maintain_order=True)
            .agg(context_token_ids=pl.col("token_id"), center=(pl.col("offset") < 0).sum().cast(pl.Int32))
        )
        out = found.join(windows, on="_row", how="left").sort("_row").drop("_row")
        if self.decode is None:
            return out
        decode = self.decode

        def marked(row: dict[str, Any]) -> str:
            ids, center = row["context_token_ids"] or [], row["center"] or 0
            return (
                decode(ids[:center])
                + CENTER_OPEN
                + decode(ids[center : center + 1])
                + CENTER_CLOSE
                + decode(ids[center + 1 :])
            )

        return out.with_columns(
            context_tokens=pl.col("context_token_ids").map_elements(
                lambda ids: [decode([i]) for i in ids], return_dtype=pl.List(pl.String)
            ),
            context_text=pl.struct("context_token_ids", "center").map_elements(marked, return_dtype=pl.String),
        )

    def cooccurrence(self, feature: int, top: int = 20) -> pl.LazyFrame:
        """The features firing on the same tokens as `feature`: columns feature, count (shared tokens),
        feature_count (tokens the other feature fires on), jaccard (count / tokens either fires on);
        highest jaccard first (then count, then feature)."""
        feature = self._feature(feature)
        toks = self.examples(feature).select("tok").collect()["tok"]
        if toks.is_empty():
            return _empty(feature=pl.Int32, count=pl.Int64, feature_count=pl.Int64, jaccard=pl.Float64)
        counts = self.summary.select("feature", feature_count=pl.col("count"))
        return (
            self._token_scan(int(toks.min()), int(toks.max()) + 1)
            .filter(pl.col("tok").is_in(toks.implode()) & (pl.col("feature") != feature))
            .group_by("feature")
            .agg(count=pl.len().cast(pl.Int64))
            .join(counts, on="feature")
            .with_columns(jaccard=pl.col("count") / (len(toks) + pl.col("feature_count") - pl.col("count")))
            .sort("jaccard", "count", "feature", descending=[True, True, False])
            .head(_count("top", top))
        )

    # -- per-feature statistics -----------------------------------------------------------------------------

    def density(self) -> pl.LazyFrame:
        """Per feature: count, density (count / n_tokens), mean and max of its non-zero values."""
        return self.summary.select("feature", "count", "density", "mean", "max")

    def dead(self) -> pl.LazyFrame:
        """Features that never fire: column feature."""
        return self.summary.filter(pl.col("count") == 0).select("feature")

    def dense(self, threshold: float = 0.01) -> pl.LazyFrame:
        """Features firing on more than `threshold` of all tokens, densest first."""
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"density threshold {threshold} is not a fraction: pass a value in [0, 1]")
        return self.density().filter(pl.col("density") > threshold).sort("density", "feature", descending=[True, False])

    # -- tokens ---------------------------------------------------------------------------------------------

    def _tokens(self, query: str) -> pl.LazyFrame:
        if self.tokens is None:
            raise UserError(f"{query} needs the token table: pass tokens=store.tokens(corpus_id) to FeatureQueries")
        return self.tokens

    def _token_scan(self, start: int, stop: int) -> pl.LazyFrame:
        """by_token triples with start <= tok < stop, reading only the parts that hold them."""
        parts = [p for p in self.index.by_token if p.start < stop and p.stop > start]
        return self._scan(parts).filter(pl.col("tok").is_between(start, stop, closed="left"))

    def token_range(self, start: int, stop: int) -> pl.LazyFrame:
        """The features firing on toks [start, stop): columns tok, feature, value, sorted by tok, feature."""
        if not 0 <= start <= stop:
            raise UserError(f"token range [{start}, {stop}) is invalid: pass 0 <= start <= stop")
        return self._token_scan(start, stop).select("tok", "feature", VALUE)

    def document(self, doc: int) -> pl.LazyFrame:
        """The features firing on one document's tokens: columns tok, feature, value, doc, seq, pos, token_id,
        sorted by tok, feature (empty for a document with no tokens in the table)."""
        doc_tokens = (
            self._tokens("document")
            .filter(pl.col("doc") == doc)
            .select("tok", "doc", "seq", "pos", "token_id")
            .collect()
        )
        if doc_tokens.is_empty():
            return _empty(tok=pl.Int64, feature=pl.Int32, value=pl.Float32, **doc_tokens.drop("tok").schema)
        start, stop = int(doc_tokens["tok"].min()), int(doc_tokens["tok"].max()) + 1
        # by_token order is already (tok, feature): keep it rather than sort again (a sort costs more here).
        return self.token_range(start, stop).join(doc_tokens.lazy(), on="tok", how="inner", maintain_order="left")

    def on_token(self, token: int | str) -> pl.LazyFrame:
        """The features firing where a given token occurs: columns feature, count (occurrences it fires on),
        fraction (count / occurrences of the token), mean_value; most frequent first."""
        tokens = self._tokens("on_token")
        if isinstance(token, str):
            if self.encode is None:
                raise UserError(
                    f"on_token({token!r}) needs a tokenizer: pass encode= to FeatureQueries, or give a token id"
                )
            ids = list(self.encode(token))
            if len(ids) != 1:
                raise UserError(f"{token!r} is {len(ids)} tokens {ids}: pass a single-token string or a token id")
            token = ids[0]
        toks = tokens.filter(pl.col("token_id") == token).select("tok").collect()["tok"]
        if toks.is_empty():
            return _empty(feature=pl.Int32, count=pl.Int64, fraction=pl.Float64, mean_value=pl.Float64)
        return (
            self._token_scan(int(toks.min()), int(toks.max()) + 1)
            .filter(pl.col("tok").is_in(toks.implode()))
            .group_by("feature")
            .agg(count=pl.len().cast(pl.Int64), mean_value=pl.col("value").cast(pl.Float64).mean())
            .with_columns(fraction=pl.col("count") / len(toks))
            .select("feature", "count", "fraction", "mean_value")
            .sort("count", "feature", descending=[True, False])
        )
