"""The HTML of the dashboard: an index of features and one page per feature that fires, as plain files.

Pages open from disk: every link is relative and every style, script and image is a file of the site, so nothing
is fetched from the network. The bulk of the markup (one span per context token, one table row per feature) is
built with polars string expressions, which run in native threads over all features at once; the per-feature
page is then a short Python format and a file write, done in a thread pool.
"""

import html
import importlib.resources
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from actstore.flows.dashboard.data import FeatureData

Decode = Callable[[Sequence[int]], str]
STATIC_FILES = ("style.css", "index.js")
FEATURES_DIR = "features"
_HIDDEN_INDEX_COLUMNS = ("feature",)
INDEX_PAGE_ROWS = 500
"""Rows of the feature table shown at once: laying out a table of 16k rows took Chromium seconds per sort."""


class Plot(NamedTuple):
    """A figure on the index page."""

    title: str
    file: str
    """Path relative to the site root, e.g. `plots/density.png`."""


class LogitTokens(NamedTuple):
    """Top promoted and suppressed tokens per feature (rows = features 0..d_sae-1), as numpy arrays."""

    positive_ids: np.ndarray
    positive_values: np.ndarray
    negative_ids: np.ndarray
    negative_values: np.ndarray


class SiteInfo(NamedTuple):
    """What the index says about the SAE besides its features."""

    title: str
    facts: Mapping[str, str]
    """Where the features come from: SAE, harvest, site, tokens, ..."""
    headline: Mapping[str, float | int | str]
    """The SAE's headline evaluation numbers."""
    headline_source: str
    plots: Sequence[Plot]


def display_text(text: str) -> str:
    """How a token's text is shown: HTML-escaped, a newline as ⏎ so a window stays on one line."""
    return html.escape(text.replace("\n", "⏎"), quote=True)


def token_texts(ids: np.ndarray, decode: Decode) -> pl.DataFrame:
    """token_id -> escaped display text of each distinct id (decoded one token at a time, as the store does)."""
    unique = np.unique(np.asarray(ids, dtype=np.int64))
    return pl.DataFrame(
        {"token_id": unique.astype(np.int32), "text": [display_text(decode([int(i)])) for i in unique]},
        schema={"token_id": pl.Int32, "text": pl.String},
    )


def _number(column: str, dtype: pl.DataType) -> pl.Expr:
    """A number as index cells show it: integers whole, others to 4 significant digits, empty when missing."""
    expr = pl.col(column)
    if not dtype.is_integer():
        expr = expr.cast(pl.Float64).round_sig_figs(4)
    return expr.cast(pl.String).fill_null("")


def example_blocks(data: FeatureData, texts: pl.DataFrame) -> pl.DataFrame:
    """Per feature: `top` and `quantile`, the HTML of its example sections (one row per example, tokens as spans
    shaded by the feature's activation relative to its max, the example's own token marked).

    Windows have a fixed width, so the spans of all examples form one [examples, width] array whose halves are
    joined row by row; no group-by over millions of tokens."""
    width = len(data.windows) // max(len(data.examples), 1)
    context = width // 2
    maxima = data.index.select("feature", fmax=pl.col("max").cast(pl.Float64))
    examples = data.examples.join(maxima, on="feature", how="left", maintain_order="left")
    windows = data.windows.with_columns(
        fmax=pl.Series(np.repeat(examples["fmax"].to_numpy(), width)), text=_texts_of(data.windows["token_id"], texts)
    )
    spans = windows.select(
        pl.when(pl.col("token_id").is_null())
        .then(pl.lit(""))
        .otherwise(
            pl.concat_str(
                pl.lit("<span"),
                pl.when(pl.col("offset") == 0).then(pl.lit(' class="c"')).otherwise(pl.lit("")),
                _shade_attributes(windows),
                pl.lit(">"),
                pl.col("text"),
                pl.lit("</span>"),
            )
        )
    ).to_series()
    halves = spans.reshape((len(examples), width)).arr.to_list()
    rows = examples.with_columns(
        row=pl.concat_str(
            pl.lit('<div class="ex"><span class="v">'),
            pl.col("value").round(3).cast(pl.String),
            pl.lit('</span><span class="ctx"><span class="l">'),
            halves.list.slice(0, context).list.join(""),
            pl.lit('</span><span class="r">'),
            halves.list.slice(context).list.join(""),
            pl.lit("</span></span></div>"),
        )
    )
    buckets = (
        rows.group_by("feature", "section", "bucket", maintain_order=True)
        .agg(pl.col("q_low").first(), pl.col("q_high").first(), rows=pl.col("row").str.join("\n"))
        .with_columns(
            block=pl.when(pl.col("section") == 0)
            .then(pl.col("rows"))
            .otherwise(
                pl.concat_str(
                    pl.lit("<h3>activation ranks in quantiles "),
                    pl.col("q_low").round(3).cast(pl.String),
                    pl.lit("–"),
                    pl.col("q_high").round(3).cast(pl.String),
                    pl.lit("</h3>\n"),
                    pl.col("rows"),
                )
            )
        )
    )
    return (
        buckets.group_by("feature", "section", maintain_order=True)
        .agg(html=pl.col("block").str.join("\n"))
        .pivot(on="section", index="feature", values="html")
        .rename({"0": "top", "1": "quantile"}, strict=False)
    )


def _texts_of(token_ids: pl.Series, texts: pl.DataFrame) -> pl.Series:
    """Display text of each token id (null where the id is null), by a dense id -> row table."""
    ids = texts["token_id"].to_numpy()
    row = np.zeros(int(ids.max(initial=0)) + 1, dtype=np.int64)
    row[ids] = np.arange(len(ids))
    return texts["text"].gather(row[token_ids.fill_null(0).to_numpy()]).set(token_ids.is_null(), None)  # type: ignore[arg-type]


def _shade_attributes(windows: pl.DataFrame) -> pl.Series:
    """` style="--a:53%" title="1.234"` for tokens where the feature fires (shade = value / the feature's max),
    empty elsewhere; formatted only where it fires, since formatting floats is the costly part."""
    firing = np.flatnonzero(windows["value"].to_numpy())
    attributes = (
        windows[firing]
        .select(
            pl.concat_str(
                pl.lit(' style="--a:'),
                (pl.col("value") / pl.col("fmax") * 100).clip(0, 100).round().cast(pl.Int32).cast(pl.String),
                pl.lit('%" title="'),
                pl.col("value").round(3).cast(pl.String),
                pl.lit('"'),
            )
        )
        .to_series()
    )
    return pl.repeat("", len(windows), eager=True).scatter(firing, attributes)


def histogram_svg(low: float, high: float, counts: np.ndarray) -> str:
    """An inline SVG bar chart of one feature's activation histogram (bars scaled to the largest bin), each bar
    titled with its range and count."""
    width, height, pad = 320, 90, 14
    bar = width / len(counts)
    heights = (height - pad - 4) * counts / max(int(counts.max()), 1)
    edges = low + (high - low) * np.arange(len(counts) + 1) / len(counts)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - pad - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}">'
        f"<title>{a:.3g}–{b:.3g}: {c}</title></rect>"
        for i, (h, a, b, c) in enumerate(
            zip(heights.tolist(), edges[:-1].tolist(), edges[1:].tolist(), counts.tolist(), strict=True)
        )
    )
    return (
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram">{bars}'
        f'<text x="0" y="{height - 2}">{low:.3g}</text>'
        f'<text x="{width}" y="{height - 2}" text-anchor="end">{high:.3g}</text></svg>'
    )


def _stat(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _logit_list(ids: np.ndarray, values: np.ndarray, text: Mapping[int, str]) -> str:
    return "".join(
        f'<li><span class="tok">{text[int(i)]}</span> <span class="v">{v:+.3f}</span></li>'
        for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    )


def feature_page(
    feature: int,
    stats: Mapping[str, object],
    blocks: Mapping[str, str | None],
    histogram: str,
    logits: tuple[str, str] | None,
    cooccurring: Sequence[tuple[int, int]],
    neighbours: tuple[int | None, int | None],
    title: str,
) -> str:
    """The HTML of one feature's page."""
    previous, following = neighbours
    nav = ['<a href="../index.html">index</a>']
    if previous is not None:
        nav.append(f'<a rel="prev" href="{previous}.html">← {previous}</a>')
    if following is not None:
        nav.append(f'<a rel="next" href="{following}.html">{following} →</a>')
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_stat(v)}</td></tr>" for k, v in stats.items())
    logit_html = ""
    if logits is not None:
        logit_html = (
            f'<section id="logits"><h2>Top logit tokens</h2><div class="cols">'
            f'<div><h3>promoted</h3><ol class="logits pos">{logits[0]}</ol></div>'
            f'<div><h3>suppressed</h3><ol class="logits neg">{logits[1]}</ol></div></div></section>'
        )
    co = "".join(
        f'<li><a href="{other}.html">{other}</a> <span class="v">{count}</span></li>' for other, count in cooccurring
    )
    co_html = (
        (
            f'<section id="cooccurring"><h2>Co-occurring features</h2><p class="note">features that also fire '
            f'on this feature\'s top examples, with on how many</p><ol class="co">{co}</ol></section>'
        )
        if co
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Feature {feature} · {html.escape(title)}</title>
<link rel="stylesheet" href="../static/style.css"></head>
<body class="feature">
<nav>{" · ".join(nav)}</nav>
<h1>Feature {feature}</h1>
<section id="stats" class="cols"><table class="stats">{rows}</table>
<figure><figcaption>activations where it fires</figcaption>{histogram}</figure></section>
{logit_html}
<section id="top"><h2>Top examples</h2>
{blocks.get("top") or '<p class="note">none</p>'}
</section>
<section id="quantiles"><h2>Examples across its activations</h2>
{blocks.get("quantile") or '<p class="note">none</p>'}
</section>
{co_html}
</body></html>
"""


def index_rows(index: pl.DataFrame, top_text: pl.DataFrame) -> tuple[list[tuple[str, str]], str]:
    """The feature table of the index: its columns ((name, "num" | "text")) and the HTML of its rows, one per
    feature that fires. Every numeric column of `index` is shown, so new per-feature columns appear by
    themselves."""
    numeric = {c: dtype for c, dtype in index.schema.items() if dtype.is_numeric() and c not in _HIDDEN_INDEX_COLUMNS}
    live = index.filter(pl.col("count") > 0).join(top_text, on="feature", how="left", maintain_order="left")
    cells = [pl.concat_str(pl.lit("<td>"), _number(c, dtype), pl.lit("</td>")) for c, dtype in numeric.items()]
    rows = (
        live.with_row_index("position")
        .select(
            pl.concat_str(
                pl.when(pl.col("position") < INDEX_PAGE_ROWS).then(pl.lit("<tr>")).otherwise(pl.lit("<tr hidden>")),
                pl.lit('<td><a href="features/'),
                pl.col("feature").cast(pl.String),
                pl.lit('.html">'),
                pl.col("feature").cast(pl.String),
                pl.lit("</a></td>"),
                *cells,
                pl.lit('<td class="tok">'),
                pl.col("text").fill_null(""),
                pl.lit("</td></tr>"),
            ).str.join("\n")
        )
        .item()
    )
    columns = [("feature", "num"), *((c, "num") for c in numeric), ("top token", "text")]
    return columns, rows or ""


def index_page(info: SiteInfo, columns: Sequence[tuple[str, str]], rows: str, n_live: int, dead: Sequence[int]) -> str:
    """The HTML of the index: facts, headline numbers, plots, the sortable, filterable feature table, dead list."""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in info.facts.items())
    headline = "".join(f"<tr><th>{html.escape(k)}</th><td>{_stat(v)}</td></tr>" for k, v in info.headline.items())
    plots = "".join(
        f'<figure><img src="{html.escape(p.file)}" alt="{html.escape(p.title)}">'
        f"<figcaption>{html.escape(p.title)}</figcaption></figure>"
        for p in info.plots
    )
    heads = "".join(f'<th data-type="{kind}" tabindex="0">{html.escape(name)}</th>' for name, kind in columns)
    filters = "".join(
        '<th><input type="number" step="any" placeholder="min" aria-label="min"><input type="number" step="any" '
        'placeholder="max" aria-label="max"></th>'
        if kind == "num"
        else '<th><input type="search" placeholder="contains" aria-label="contains"></th>'
        for _, kind in columns
    )
    dead_html = (
        (
            f'<details id="dead"><summary>{len(dead)} features never fire</summary>'
            f'<p class="dead">{" ".join(map(str, dead))}</p></details>'
        )
        if dead
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(info.title)}</title>
<link rel="stylesheet" href="static/style.css"></head>
<body class="index">
<h1>{html.escape(info.title)}</h1>
<section class="cols"><table class="stats" id="facts">{facts}</table>
<table class="stats" id="headline"><caption>{html.escape(info.headline_source)}</caption>{headline}</table></section>
<section id="plots">{plots}</section>
<h2>Features</h2>
<p><span id="shown">{n_live}</span> of <span id="live">{n_live}</span> features that fire match; click a column to
sort, type in the boxes under it to filter.</p>
<p class="pager"><button id="previous" type="button">←</button> rows
<span id="range">1–{min(n_live, INDEX_PAGE_ROWS)}</span> <button id="next" type="button">→</button></p>
<table id="features" data-page-rows="{INDEX_PAGE_ROWS}">
<thead><tr>{heads}</tr><tr class="filters">{filters}</tr></thead>
<tbody>
{rows}
</tbody></table>
{dead_html}
<script src="static/index.js"></script>
</body></html>
"""


def copy_static(site: Path) -> None:
    """Copy the stylesheet and the index script (package data of `actstore.flows.dashboard`) into the site."""
    target = site / "static"
    target.mkdir(parents=True, exist_ok=True)
    source = importlib.resources.files("actstore.flows.dashboard") / "static"
    for name in STATIC_FILES:
        with importlib.resources.as_file(source / name) as path:
            shutil.copyfile(path, target / name)


def write_site(
    site: Path,
    data: FeatureData,
    decode: Decode,
    info: SiteInfo,
    logits: LogitTokens | None = None,
    workers: int = 2,
) -> int:
    """Write index.html, static/ and features/<id>.html for every feature that fires; returns the pages written.

    The plots named in `info` must already be in `site`."""
    live = data.index.filter(pl.col("count") > 0)["feature"].to_list()
    dead = data.index.filter(pl.col("count") == 0)["feature"].to_list()
    ids = [data.windows["token_id"].drop_nulls().to_numpy()]
    if logits is not None:
        ids += [logits.positive_ids.ravel(), logits.negative_ids.ravel()]
    texts = token_texts(np.concatenate(ids), decode)
    text_of = dict(zip(texts["token_id"].to_list(), texts["text"].to_list(), strict=True))

    blocks = {row["feature"]: row for row in example_blocks(data, texts).iter_rows(named=True)}
    stats = {row["feature"]: row for row in data.index.iter_rows(named=True)}
    co: dict[int, list[tuple[int, int]]] = {}
    for feature, other, count in data.cooccurrence.iter_rows():
        co.setdefault(feature, []).append((other, count))

    copy_static(site)
    pages = site / FEATURES_DIR
    pages.mkdir(parents=True, exist_ok=True)

    def write(positions: range) -> None:
        for position in positions:
            feature = live[position]
            logit_html = None
            if logits is not None:
                logit_html = (
                    _logit_list(logits.positive_ids[feature], logits.positive_values[feature], text_of),
                    _logit_list(logits.negative_ids[feature], logits.negative_values[feature], text_of),
                )
            page = feature_page(
                feature,
                {k: v for k, v in stats[feature].items() if k != "feature"},
                blocks.get(feature, {}),
                histogram_svg(*data.histogram_range[feature], data.histogram[feature]),
                logit_html,
                co.get(feature, []),
                (live[position - 1] if position else None, live[position + 1] if position + 1 < len(live) else None),
                info.title,
            )
            (pages / f"{feature}.html").write_text(page, encoding="utf-8")

    # Contiguous runs of pages per thread: formatting holds the GIL, but file writes release it.
    workers = max(1, workers)
    step = max(1, -(-len(live) // workers))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, [range(i, min(i + step, len(live))) for i in range(0, len(live), step)]))

    top_text = (
        data.examples.filter((pl.col("section") == 0) & (pl.col("rank") == 0))
        .join(data.windows.filter(pl.col("offset") == 0).select("example", "token_id"), on="example")
        .join(texts, on="token_id", how="left")
        .select("feature", "text")
    )
    columns, rows = index_rows(data.index, top_text)
    (site / "index.html").write_text(index_page(info, columns, rows, len(live), dead), encoding="utf-8")
    return len(live)
