"""The dashboard's data, pages and plots, checked against brute force over the raw triples of a small synthetic
feature store (several by_feature parts, a few dead features, tokens that need HTML escaping), and its optional
results (evaluations, transfers, a width scaling law) read from fixture files written in the store's layout."""

import html
import json
import re
import socket
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from matplotlib.image import imread

from actstore.flows.dashboard.data import DashboardOptions, FeatureData, gather
from actstore.flows.dashboard.flow import dashboard_server, serve_in_thread
from actstore.flows.dashboard.pages import LogitTokens, SiteInfo, display_text, write_site
from actstore.flows.dashboard.plots import write_plots
from actstore.flows.dashboard.results import MIN_WIDTHS_FOR_FIT, gather_results
from actstore.schemas.attribution import ATTRIBUTION_DIR, PER_FEATURE_NAME
from actstore.schemas.attribution import PER_FEATURE_SCHEMA as ATTRIBUTION_PER_FEATURE_SCHEMA
from actstore.schemas.errors import UserError
from actstore.schemas.eval_tables import (
    EVAL_SUMMARY_SCHEMA,
    FEATURE_TRANSFER_SCHEMA,
    HISTOGRAM_SCHEMA,
    PER_TOKEN_SCHEMA,
    TRANSFER_SUMMARY_SCHEMA,
)
from actstore.schemas.manifest import Manifest
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.feature_queries import FeatureQueries
from actstore.store.features import FeatureWriter
from actstore.store.files import write_manifest
from actstore.store.root import Store
from actstore.store.tokens import scan_tokens, write_token_table

D_SAE, CTX_LEN, N_SEQS = 48, 32, 24
N_TOKENS = CTX_LEN * N_SEQS
DEAD = (45, 46, 47)
VOCAB = ["the", " cat", "\n", " <b>", " &", " sat", '"', " on", " a", " mat", ".", " def", "(", ")", ":", " x"]
OPTIONS = DashboardOptions(top_k=6, context=3, quantiles=(0.0, 0.5, 0.9, 1.0), per_bucket=3, bins=8, cooccurring=4)


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


class Raw:
    """The synthetic store's ground truth, as generated."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, D_SAE - len(DEAD) + 1) ** 0.8
        self.token_ids = rng.integers(0, len(VOCAB), N_TOKENS).astype(np.int32)
        rows = []
        for tok in range(N_TOKENS):
            chosen = rng.choice(len(weights), size=rng.integers(1, 6), replace=False, p=weights / weights.sum())
            rows += [(int(f), tok, float(v)) for f, v in zip(chosen, rng.lognormal(0, 0.6, len(chosen)), strict=True)]
        self.feature = np.array([r[0] for r in rows], np.int32)
        self.tok = np.array([r[1] for r in rows], np.int64)
        self.value = np.array([r[2] for r in rows], np.float32)
        self.values = {(int(f), int(t)): float(v) for f, t, v in zip(self.feature, self.tok, self.value, strict=True)}

    def of(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """A feature's (toks, values), highest value first, ties by tok."""
        mask = self.feature == feature
        toks, values = self.tok[mask], self.value[mask]
        order = np.lexsort((toks, -values))
        return toks[order], values[order]

    def window(self, feature: int, tok: int, context: int) -> list[tuple[int, int, float]]:
        """(offset, token id, this feature's value) of the tokens within `context` in the same window."""
        seq = tok // CTX_LEN
        return [
            (t - tok, int(self.token_ids[t]), self.values.get((feature, t), 0.0))
            for t in range(tok - context, tok + context + 1)
            if 0 <= t < N_TOKENS and t // CTX_LEN == seq
        ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Raw, FeatureQueries]:
    raw, root = Raw(), tmp_path_factory.mktemp("synthetic")
    with FeatureWriter(root / "features", D_SAE, N_TOKENS, "float32", top_k=10, bucket_rows=700) as writer:
        for chunk, start in enumerate(range(0, N_TOKENS, 256)):
            mask = (raw.tok >= start) & (raw.tok < start + 256)
            writer.add_chunk(chunk, raw.feature[mask], raw.tok[mask], raw.value[mask])
        writer.finish()
    tok = np.arange(N_TOKENS)
    split = pa.DictionaryArray.from_arrays(pa.array(np.zeros(N_TOKENS, np.int8)), list(SPLITS))
    batch = pa.RecordBatch.from_arrays(
        [tok, tok // 100, tok // CTX_LEN, (tok % CTX_LEN).astype(np.int32), raw.token_ids, split], schema=TOKEN_SCHEMA
    )
    write_token_table(root / "tokens", [batch])
    queries = FeatureQueries(root / "features", tokens=scan_tokens(root / "tokens"), decode=decode)
    assert len(queries.index.by_feature) > 2  # the part pass runs over several parts
    return raw, queries


@pytest.fixture(scope="module")
def data(synthetic: tuple[Raw, FeatureQueries]) -> FeatureData:
    return gather(synthetic[1], CTX_LEN, OPTIONS, workers=2)


def test_top_examples_are_each_features_highest_activations(
    synthetic: tuple[Raw, FeatureQueries], data: FeatureData
) -> None:
    raw, _ = synthetic
    top = data.examples.filter(pl.col("section") == 0)
    for feature in range(D_SAE):
        toks, values = raw.of(feature)
        mine = top.filter(pl.col("feature") == feature)
        assert mine["tok"].to_list() == toks[: OPTIONS.top_k].tolist()
        np.testing.assert_array_equal(mine["value"].to_numpy(), values[: OPTIONS.top_k])
        assert mine["rank"].to_list() == list(range(len(mine)))


def test_quantile_examples_are_spread_over_each_bucket_of_ranks(
    synthetic: tuple[Raw, FeatureQueries], data: FeatureData
) -> None:
    raw, _ = synthetic
    picks = data.examples.filter(pl.col("section") == 1)
    edges = OPTIONS.quantiles
    for feature in range(D_SAE):
        toks, values = raw.of(feature)
        ascending_toks, ascending = toks[::-1], values[::-1]
        n = len(values)
        mine = picks.filter(pl.col("feature") == feature)
        if n == 0:
            assert mine.is_empty()
            continue
        for bucket in range(len(edges) - 1):
            lo, hi = int(np.floor(edges[bucket] * n)), int(np.floor(edges[bucket + 1] * n))
            rows = mine.filter(pl.col("bucket") == bucket)
            ranks = rows["rank"].to_numpy()
            assert len(rows) == min(hi - lo, OPTIONS.per_bucket)
            assert len(set(ranks)) == len(ranks) and all(lo <= r < hi for r in ranks)
            assert rows["q_low"].to_list() == [edges[bucket]] * len(rows)
            np.testing.assert_array_equal(rows["value"].to_numpy(), ascending[ranks])
            assert rows["tok"].to_list() == ascending_toks[ranks].tolist()
            assert (np.diff(rows["value"].to_numpy()) <= 0).all()  # shown highest first
            if len(rows) > 1:  # spread: the picks span most of the bucket, not its first few ranks
                assert ranks.max() - ranks.min() >= (hi - lo) // 2


def test_windows_hold_the_corpus_tokens_and_the_features_activation_on_each(
    synthetic: tuple[Raw, FeatureQueries], data: FeatureData
) -> None:
    raw, queries = synthetic
    width = 2 * OPTIONS.context + 1
    assert len(data.windows) == len(data.examples) * width
    windows = data.windows.partition_by("example", as_dict=True, maintain_order=True)
    for example in data.examples.iter_rows(named=True):
        got = windows[(example["example"],)].drop_nulls("tok")
        expected = raw.window(example["feature"], example["tok"], OPTIONS.context)
        assert got["offset"].to_list() == [e[0] for e in expected]
        assert got["token_id"].to_list() == [e[1] for e in expected]
        np.testing.assert_array_equal(got["value"].to_numpy(), np.array([e[2] for e in expected], np.float32))
    # and the store's own per-feature query agrees on the windows of the top examples
    for feature in (0, 5, 30):
        store = queries.top_examples(feature, k=OPTIONS.top_k, context=OPTIONS.context).collect()
        mine = data.examples.filter((pl.col("feature") == feature) & (pl.col("section") == 0))
        for example, ids in zip(mine["example"], store["context_token_ids"], strict=True):
            assert windows[(example,)].drop_nulls("tok")["token_id"].to_list() == ids.to_list()


def test_histograms_match_numpy(synthetic: tuple[Raw, FeatureQueries], data: FeatureData) -> None:
    raw, _ = synthetic
    for feature in range(D_SAE):
        _, values = raw.of(feature)
        if len(values) == 0:
            assert data.histogram[feature].sum() == 0
            continue
        lo, hi = min(float(values.min()), 0.0), float(values.max())
        expected, _ = np.histogram(values.astype(np.float64), bins=OPTIONS.bins, range=(lo, hi))
        np.testing.assert_array_equal(data.histogram[feature], expected)
        assert tuple(data.histogram_range[feature]) == (lo, hi)


def test_cooccurrence_counts_features_firing_on_the_top_examples(
    synthetic: tuple[Raw, FeatureQueries], data: FeatureData
) -> None:
    raw, _ = synthetic
    for feature in range(D_SAE):
        toks, _ = raw.of(feature)
        counts: dict[int, int] = {}
        for tok in toks[: OPTIONS.top_k]:
            for other in raw.feature[raw.tok == tok]:
                if other != feature:
                    counts[int(other)] = counts.get(int(other), 0) + 1
        expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: OPTIONS.cooccurring]
        mine = data.cooccurrence.filter(pl.col("feature") == feature)
        assert list(zip(mine["other"].to_list(), mine["count"].to_list(), strict=True)) == expected


class Examples(HTMLParser):
    """The example rows of a feature page: per row, its value and its tokens (text, is it the marked one, shade)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.depth = 0  # span depth inside the current row's .ctx
        self.in_value = False
        self.current: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("class") == "ex":
            self.current = {"value": "", "tokens": []}
            self.rows.append(self.current)
        elif tag == "span" and self.current is not None:
            self.depth += 1
            self.in_value = a.get("class") == "v"
            if self.depth == 3:  # .ctx > .l/.r > token
                self.current["tokens"].append({"text": "", "marked": a.get("class") == "c", "style": a.get("style")})

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self.current is not None:
            self.depth -= 1
            self.in_value = False
        elif tag == "div":
            self.current = None

    def handle_data(self, text: str) -> None:
        if self.current is None:
            return
        if self.in_value:
            self.current["value"] += text
        elif self.depth == 3:
            self.current["tokens"][-1]["text"] += text


def test_site_has_a_page_per_live_feature_with_its_examples(
    tmp_path: Path, synthetic: tuple[Raw, FeatureQueries], data: FeatureData
) -> None:
    raw, _ = synthetic
    logits = LogitTokens(
        np.tile(np.arange(3), (D_SAE, 1)),
        np.ones((D_SAE, 3)),
        np.tile(np.arange(3, 6), (D_SAE, 1)),
        -np.ones((D_SAE, 3)),
    )
    info = SiteInfo("synthetic", {"SAE": "s"}, {"fvu": 0.25}, "fixture", [])
    pages = write_site(tmp_path, data, decode, info, logits, workers=2)
    live = sorted({int(f) for f in raw.feature})
    assert pages == len(live)
    assert sorted(int(p.stem) for p in (tmp_path / "features").glob("*.html")) == live
    index = (tmp_path / "index.html").read_text()
    assert len(re.findall(r'<tr(?: hidden)?><td><a href="features/', index)) == len(live)
    dead = index.split('<p class="dead">')[1].split("</p>")[0].split()
    assert [int(d) for d in dead] == list(DEAD)
    links = re.findall(r'(?:href|src)="([^"]*)"', index)
    assert links and all(not re.match(r"[a-z]+:|/", link) for link in links)  # relative: files of the site
    for feature in (0, 7, live[-1]):
        page = (tmp_path / "features" / f"{feature}.html").read_text()
        parser = Examples()
        parser.feed(page.split('<section id="quantiles">')[0])
        toks, values = raw.of(feature)
        assert len(parser.rows) == min(OPTIONS.top_k, len(toks))
        for row, tok, value in zip(parser.rows, toks, values, strict=False):
            window = raw.window(feature, int(tok), OPTIONS.context)
            assert [t["text"] for t in row["tokens"]] == [html.unescape(display_text(VOCAB[i])) for _, i, _ in window]
            assert [t["marked"] for t in row["tokens"]] == [offset == 0 for offset, _, _ in window]
            assert [t["style"] is not None for t in row["tokens"]] == [v != 0 for _, _, v in window]
            assert float(row["value"]) == pytest.approx(float(value), abs=5e-4)
        assert "&lt;b&gt;" in page or " <b>" not in "".join(VOCAB[i] for i in raw.token_ids)
        assert '<ol class="logits pos"><li><span class="tok">the</span>' in page


def test_an_sae_whose_features_never_fire_gets_an_index_of_dead_features(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path / "features", 8, CTX_LEN, "float32") as writer:
        writer.add_chunk(0, np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        writer.finish()
    tok = np.arange(CTX_LEN)
    split = pa.DictionaryArray.from_arrays(pa.array(np.zeros(CTX_LEN, np.int8)), list(SPLITS))
    write_token_table(
        tmp_path / "tokens",
        [
            pa.RecordBatch.from_arrays(
                [tok, tok, tok // CTX_LEN, tok.astype(np.int32), np.zeros(CTX_LEN, np.int32), split],
                schema=TOKEN_SCHEMA,
            )
        ],
    )
    data = gather(FeatureQueries(tmp_path / "features", tokens=scan_tokens(tmp_path / "tokens")), CTX_LEN, OPTIONS)
    assert data.examples.is_empty() and data.windows.is_empty() and data.cooccurrence.is_empty()
    assert write_site(tmp_path / "site", data, decode, SiteInfo("dead", {}, {}, "", [])) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    assert "8 features never fire" in index and '<p class="dead">0 1 2 3 4 5 6 7</p>' in index
    assert not any((tmp_path / "site" / "features").iterdir())


def test_extra_per_feature_columns_appear_in_the_index(tmp_path: Path, synthetic: tuple[Raw, FeatureQueries]) -> None:
    _, queries = synthetic
    extra = pl.DataFrame({"feature": np.arange(D_SAE), "attribution": np.linspace(-1, 1, D_SAE), "count": 0})
    data = gather(queries, CTX_LEN, OPTIONS, extra=extra)
    assert data.index["count"].to_list() == queries.summary.collect()["count"].to_list()  # the summary's wins
    write_site(tmp_path, data, decode, SiteInfo("x", {}, {}, "", []))
    index = (tmp_path / "index.html").read_text()
    assert '<th data-type="num" tabindex="0">attribution</th>' in index
    assert "<th>attribution</th>" in (tmp_path / "features" / "0.html").read_text()


def test_bad_options_and_inputs_are_user_errors(synthetic: tuple[Raw, FeatureQueries]) -> None:
    _, queries = synthetic
    with pytest.raises(UserError, match="top_k=-1 is negative"):
        gather(queries, CTX_LEN, DashboardOptions(top_k=-1))
    with pytest.raises(UserError, match="quantile edges"):
        gather(queries, CTX_LEN, DashboardOptions(quantiles=(0.5, 0.2)))
    with pytest.raises(UserError, match="bins=0"):
        gather(queries, CTX_LEN, DashboardOptions(bins=0))
    with pytest.raises(UserError, match="lack a `feature` column"):
        gather(queries, CTX_LEN, OPTIONS, extra=pl.DataFrame({"attribution": [1.0]}))
    with pytest.raises(UserError, match="needs the token table"):
        gather(FeatureQueries(queries.dir), CTX_LEN, OPTIONS)


def test_server_serves_the_site_on_loopback_and_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no dashboard"):
        dashboard_server(tmp_path)
    (tmp_path / "index.html").write_text("<p>hi</p>")
    server = dashboard_server(tmp_path, port=0)
    try:
        url = serve_in_thread(server)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.read() == b"<p>hi</p>"
        with pytest.raises(UserError, match="pass another --port"):
            dashboard_server(tmp_path, port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match=r"cannot serve on 127\.0\.0\.1"):
            dashboard_server(tmp_path, port=busy.getsockname()[1])


# -- results: fixture files written in the store's layout of evaluations and transfers --------------------------

SAE, HARVEST, SITE = "sae-fixture-a", "harvest-fixture", "blocks.1.hook_resid_post"
LAW = {"E": 0.05, "A": 4.0, "alpha": 0.6}


def _manifest(directory: Path, kind: str, object_id: str, **fields: object) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(
        directory,
        Manifest(
            kind=kind, id=object_id, config={}, code_version="fixture", created="2026-01-01T00:00:00+00:00", **fields
        ),
    )  # type: ignore[arg-type]


def _table(path: Path, rows: dict[str, list], schema: pa.Schema) -> None:
    frame = pl.from_arrow(
        pa.table(
            {f.name: pa.array(rows.get(f.name, [None] * len(next(iter(rows.values())))), f.type) for f in schema},
            schema=schema,
        )
    )
    frame.write_parquet(path)  # type: ignore[union-attr]


def _fixture_store(root: Path, with_results: bool) -> Store:
    store = Store(root)
    holdout = {"l0": 20.0, "explained_variance": 0.8, "fvu": 0.2, "tokens": 100, "dead": 3}
    _manifest(
        store.sae_dir(SAE),
        "sae",
        SAE,
        counts={"d_in": 4, "d_sae": 8},
        extra={"eval_holdout": holdout, "harvest_id": HARVEST},
    )
    _manifest(
        store.sae_dir("sae-fixture-b"),
        "sae",
        "sae-fixture-b",
        counts={"d_in": 4, "d_sae": 16},
        extra={"eval_holdout": {**holdout, "l0": 40.0, "explained_variance": 0.9}},
    )
    if not with_results:
        return store
    widths = [8, 16, 64, 256, 1024]
    for i, width in enumerate(widths):
        eval_id, sae_id = f"eval-fixture-{i}", SAE if i == 0 else f"sae-width-{width}"
        directory = store.eval_dir(eval_id)
        _manifest(directory, "eval", eval_id)
        fvu = LAW["E"] + LAW["A"] / width ** LAW["alpha"]
        _table(
            directory / "summary.parquet",
            {
                "eval_id": [eval_id],
                "sae_id": [sae_id],
                "harvest_id": [HARVEST],
                "site": [SITE],
                "split": ["holdout"],
                "d_sae": [width],
                "tokens": [500],
                "l0": [10.0 + i],
                "fvu": [fvu],
                "explained_variance": [1 - fvu],
                "mse": [0.5],
                "dead": [i],
                "ce_recovered_zero": [0.9],
            },
            EVAL_SUMMARY_SCHEMA,
        )
    per_token = store.eval_dir("eval-fixture-0") / "per_token.parquet"
    _table(
        per_token,
        {
            "tok": list(range(6)),
            "pos": [0, 1, 2, 3, 4, 5],
            "sq_error": [400.0, 8.0, 4.0, 16.0, 12.0, 20.0],
            "l0": [30.0, 8.0, 9.0, 10.0, 12.0, 7.0],
            "excluded": [True, False, False, False, False, False],
        },
        PER_TOKEN_SCHEMA,
    )
    transfer = store.transfer_dir("transfer-fixture")
    _manifest(transfer, "transfer", "transfer-fixture")
    _table(
        transfer / "summary.parquet",
        {
            "transfer_id": ["transfer-fixture"],
            "harvest_a": [HARVEST],
            "harvest_b": ["harvest-other"],
            "site": [SITE],
            "tokens": [100],
        },
        TRANSFER_SUMMARY_SCHEMA,
    )
    _table(
        transfer / "histograms.parquet",
        {
            "site": [SITE] * 4 + ["blocks.9.hook_resid_post"],
            "measure": ["cosine", "cosine", "euclid", "euclid", "cosine"],
            "lo": [0.0, 0.5, 0.0, 1.0, 0.0],
            "hi": [0.5, 1.0, 1.0, 2.0, 1.0],
            "count": [10, 90, 60, 40, 7],
        },
        HISTOGRAM_SCHEMA,
    )
    _table(
        transfer / "feature_transfer.parquet",
        {
            "sae_id": [SAE, SAE, "sae-other"],
            "feature": [0, 3, 0],
            "density_a": [0.1, 0.2, 0.3],
            "density_b": [0.1, 0.15, 0.3],
            "act_corr": [0.9, 0.4, 0.1],
            "logit_cos": [None, 0.5, 0.2],
        },
        FEATURE_TRANSFER_SCHEMA,
    )
    return store


def test_results_are_read_from_the_evaluation_and_transfer_files(tmp_path: Path) -> None:
    store = _fixture_store(tmp_path / "store", with_results=True)
    results = gather_results(store, SAE, HARVEST, SITE)
    assert results.headline_source == "evaluation eval-fixture-0 (holdout split)"
    assert results.headline["fvu"] == pytest.approx(LAW["E"] + LAW["A"] / 8 ** LAW["alpha"])
    assert results.headline["ce_recovered_zero"] == 0.9 and "kl_spliced" not in results.headline
    # one point per evaluation, plus sae-fixture-b from its training manifest (it has no evaluation)
    points = results.saes.sort("sae_id")
    assert len(points) == 6 and points.filter(pl.col("source") == "training holdout")["sae_id"].to_list() == [
        "sae-fixture-b"
    ]
    # per-token MSE = squared error / d_in, excluded tokens left out
    assert results.per_token is not None
    assert sorted(results.per_token["mse"].to_list()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert results.transfer_histograms is not None
    assert results.transfer_histograms["site"].unique().to_list() == [SITE]
    assert results.per_feature is not None
    assert results.per_feature.sort("feature").rows() == [(0, 0.1, 0.9, None), (3, 0.15, 0.4, 0.5)]
    # the width law FVU = E + A / n^alpha is recovered from the five noise-free points
    assert results.width_fit is not None and len(results.width_fit.points) >= MIN_WIDTHS_FOR_FIT
    params = results.width_fit.fit.params
    for name, value in LAW.items():
        assert params[name] == pytest.approx(value, rel=1e-3)

    plots = write_plots(tmp_path / "site", results, SAE, np.array([0.0, 0.01, 0.1, 0.001]))
    assert [p.file for p in plots] == [
        "plots/l0_vs_explained_variance.png",
        "plots/density.png",
        "plots/mse_vs_l0.png",
        "plots/transfer.png",
        "plots/width_scaling.png",
    ]
    for plot in plots:
        image = imread(tmp_path / "site" / plot.file)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something was drawn


def test_missing_results_are_skipped(tmp_path: Path) -> None:
    store = _fixture_store(tmp_path / "store", with_results=False)
    results = gather_results(store, SAE, HARVEST, SITE)
    assert results.headline_source == "holdout evaluation at the end of training"
    assert results.headline == {"tokens": 100, "l0": 20.0, "explained_variance": 0.8, "fvu": 0.2, "dead": 3}
    assert (results.per_token, results.transfer_histograms, results.per_feature, results.width_fit) == (
        None,
        None,
        None,
        None,
    )
    assert sorted(results.saes["sae_id"].to_list()) == [SAE, "sae-fixture-b"]
    plots = write_plots(tmp_path / "site", results, SAE, np.array([0.0, 0.01]))
    assert [p.file for p in plots] == ["plots/l0_vs_explained_variance.png", "plots/density.png"]
    assert json.loads(json.dumps(results.headline)) == results.headline


def test_attribution_columns_come_from_an_attribution_of_the_same_site(tmp_path: Path) -> None:
    store = _fixture_store(tmp_path / "store", with_results=False)
    for harvest_id, site, total in (
        ("harvest-grad-other-site", "blocks.9.hook_resid_post", [9.0, 9.0]),
        ("harvest-grad", SITE, [-1.5, 2.0]),
    ):
        directory = store.features_dir(SAE, harvest_id) / ATTRIBUTION_DIR
        _manifest(directory, "attribution", f"{SAE}/{harvest_id}", extra={"site": site})
        _table(
            directory / PER_FEATURE_NAME,
            {"feature": [0, 3], "count": [4, 2], "attribution_sum": total, "attribution_abs_mean": [0.5, 1.0]},
            ATTRIBUTION_PER_FEATURE_SCHEMA,
        )
    per_feature = gather_results(store, SAE, HARVEST, SITE).per_feature
    assert per_feature is not None
    assert per_feature.sort("feature").rows() == [(0, -1.5, 0.5), (3, 2.0, 1.0)]
