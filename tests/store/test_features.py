"""The sparse-feature store against brute force: tables, summary, every query, errors, and kill/resume.

Data are seeded random triples built to hit the edge cases: dead features, ties in values, a feature firing on
every token (larger than a bucket, with runs of one value larger than a bucket), a feature whose values share
their top 16 key bits (the second radix level), chunks without non-zeros, tokens without features. Small
buckets, row groups and parts make several of each. Every expectation is computed here with numpy from the
in-memory triples (values rounded to the stored dtype first), never read back from the store's own output.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from actstore.schemas.errors import UserError
from actstore.schemas.features import INDEX_NAME, quantile_column, triples_schema
from actstore.store.feature_queries import FeatureQueries
from actstore.store.features import FeatureWriter, descending_key, pack_bins, plan_buckets
from tests.helpers import ROOT

D_SAE = 40
DEAD = (3, D_SAE - 2, D_SAE - 1)
CTX_LEN = 16
TOP_K = 5
QUANTILES = (0.0, 0.5, 0.9, 1.0)
CHECKED = (0, 1, 2, DEAD[0], 7, 19, D_SAE - 3)
"""Features whose queries are checked: the every-token one, the radix one, a dead one, ordinary ones."""
SMALL = {"bucket_rows": 64, "row_group_rows": 50, "token_part_rows": 300, "top_k": TOP_K, "quantiles": QUANTILES}


class Data(NamedTuple):
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_tokens: int
    feature: np.ndarray
    """All triples, values rounded to the stored dtype."""
    tok: np.ndarray
    value: np.ndarray


def make_data(seed: int, value_dtype: str = "float16", n_chunks: int = 8, chunk_tokens: int = 60) -> Data:
    rng = np.random.default_rng(seed)
    common = np.array([f for f in range(2, D_SAE) if f not in DEAD])
    chunks = []
    for c in range(n_chunks):
        toks = np.arange(c * chunk_tokens, (c + 1) * chunk_tokens)
        if c == 2:  # a chunk without non-zeros
            chunks.append((np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)))
            continue
        features, tokens, values = [], [], []
        for tok in toks:
            if rng.random() < 0.1:  # a token without features
                continue
            k = int(rng.integers(1, 7))
            features.append(rng.choice(common, size=k, replace=False))
            tokens.append(np.full(k, tok))
            ties = rng.choice([0.5, 1.0, 1.5, 2.5], size=k)
            values.append(np.where(rng.random(k) < 0.5, ties, rng.lognormal(0, 1, k)))
        features.append(np.zeros(len(toks), int))  # feature 0 fires on every token, two values only
        tokens.append(toks)
        values.append(rng.choice([1.0, 2.0], size=len(toks)))
        if c in (4, 5):  # feature 1: every token of two chunks, values sharing their top 16 key bits
            features.append(np.ones(len(toks), int))
            tokens.append(toks)
            values.append(1.0 + rng.random(len(toks)) * 0.0078)
        f, t, v = np.concatenate(features), np.concatenate(tokens), np.concatenate(values)
        shuffle = rng.permutation(len(f))  # arrival order within a chunk is arbitrary
        chunks.append((f[shuffle].astype(np.int32), t[shuffle].astype(np.int64), v[shuffle].astype(np.float32)))
    feature = np.concatenate([c[0] for c in chunks])
    tok = np.concatenate([c[1] for c in chunks])
    value = np.concatenate([c[2] for c in chunks]).astype(value_dtype)
    return Data(chunks, n_chunks * chunk_tokens, feature, tok, value)


def write_store(directory: Path, data: Data, value_dtype: str = "float16", **settings: object) -> dict[str, int]:
    with FeatureWriter(directory, D_SAE, data.n_tokens, value_dtype, **{**SMALL, **settings}) as writer:
        for index, chunk in enumerate(data.chunks):
            assert writer.add_chunk(index, *chunk)
        return writer.finish()


def token_table(n_tokens: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    tok = np.arange(n_tokens)
    doc = np.repeat(np.arange(n_tokens), rng.integers(1, 40, n_tokens))[:n_tokens]
    return pl.DataFrame(
        {
            "tok": tok,
            "doc": doc,
            "seq": tok // CTX_LEN,
            "pos": (tok % CTX_LEN).astype(np.int32),
            "token_id": rng.integers(0, 12, n_tokens).astype(np.int32),
            "split": ["train"] * n_tokens,
        }
    )


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def by_feature_order(data: Data) -> np.ndarray:
    return np.lexsort((data.tok, -data.value.astype(np.float64), data.feature))


class Store(NamedTuple):
    dir: Path
    data: Data
    tokens: pl.DataFrame
    counts: dict[str, int]
    q: FeatureQueries


@pytest.fixture(scope="module", params=[(0, "float16"), (1, "float32"), (2, "float16")], ids=str)
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Store:
    seed, dtype = request.param
    data = make_data(seed, dtype)
    directory = tmp_path_factory.mktemp("features")
    counts = write_store(directory, data, dtype)
    tokens = token_table(data.n_tokens, seed)
    q = FeatureQueries(directory, tokens=tokens.lazy(), decode=decode, encode=lambda s: [ord(c) - 97 for c in s])
    return Store(directory, data, tokens, counts, q)


# -- tables -------------------------------------------------------------------------------------------------


def test_by_feature_is_the_global_sort_cut_into_ordered_parts(store: Store) -> None:
    data, index = store.data, store.q.index
    order = by_feature_order(data)
    table = store.q.by_feature.collect()
    assert table["feature"].to_numpy().tolist() == data.feature[order].tolist()
    assert table["tok"].to_numpy().tolist() == data.tok[order].tolist()
    assert table["value"].to_numpy().tolist() == data.value[order].tolist()
    assert [(p.start, p.stop) for p in index.by_feature] == list(
        zip([0] + [p.stop for p in index.by_feature[:-1]], [p.stop for p in index.by_feature], strict=True)
    )
    assert index.by_feature[-1].stop == D_SAE and len(index.by_feature) > 3
    for part in index.by_feature:
        frame = pl.read_parquet(store.dir / part.file)
        assert len(frame) == part.rows == np.isin(data.feature, range(part.start, part.stop)).sum()
        metadata = pq.ParquetFile(store.dir / part.file).metadata
        assert all(
            metadata.row_group(i).num_rows == SMALL["row_group_rows"] for i in range(metadata.num_row_groups - 1)
        )
        assert pq.read_schema(store.dir / part.file).remove_metadata() == triples_schema(index.config.value_dtype)


def test_by_token_is_sorted_by_tok_then_feature_in_covering_parts(store: Store) -> None:
    data, index = store.data, store.q.index
    order = np.lexsort((data.feature, data.tok))
    table = store.q.by_token.collect()
    assert table["tok"].to_numpy().tolist() == data.tok[order].tolist()
    assert table["feature"].to_numpy().tolist() == data.feature[order].tolist()
    assert table["value"].to_numpy().tolist() == data.value[order].tolist()
    assert len(index.by_token) > 1 and index.by_token[0].start == 0 and index.by_token[-1].stop == data.n_tokens
    for part, following in pairwise(index.by_token):
        assert part.stop == following.start
    for part in index.by_token:
        toks = pl.read_parquet(store.dir / part.file)["tok"]
        assert toks.min() >= part.start and toks.max() < part.stop and len(toks) == part.rows


def test_summary_equals_brute_force(store: Store) -> None:
    data = store.data
    summary = store.q.summary.collect()
    assert summary["feature"].to_list() == list(range(D_SAE))
    order = by_feature_order(data)
    for row in summary.iter_rows(named=True):
        f = row["feature"]
        mine = order[data.feature[order] == f]
        values = data.value[mine].astype(np.float64)
        assert row["count"] == len(mine)
        assert row["density"] == pytest.approx(len(mine) / data.n_tokens)
        assert row["top_tok"] == data.tok[mine][:TOP_K].tolist()
        assert row["top_value"] == values[:TOP_K].astype(np.float32).tolist()
        if not len(mine):
            assert f in DEAD
            assert all(row[c] is None for c in ("mean", "max", *map(quantile_column, QUANTILES)))
            continue
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-6)
        assert row["max"] == values.max()
        for q in QUANTILES:
            assert row[quantile_column(q)] == pytest.approx(np.quantile(values, q), rel=1e-6), (f, q)
    assert store.counts == {
        "chunks": 8,
        "nnz": len(data.tok),
        "features_alive": D_SAE - len(DEAD),
        "features_dead": len(DEAD),
        "by_feature_parts": len(store.q.index.by_feature),
        "by_token_parts": len(store.q.index.by_token),
    }


def test_spill_is_gone_and_layout_is_plain(store: Store) -> None:
    names = sorted(p.relative_to(store.dir).as_posix() for p in store.dir.rglob("*") if p.is_file())
    assert all(
        n.startswith(("by_feature/part-", "by_token/part-")) or n in ("summary.parquet", INDEX_NAME) for n in names
    )
    assert pl.scan_parquet(store.dir / "by_feature" / "*.parquet").select(pl.len()).collect().item() == len(
        store.data.tok
    )


def test_descending_key_orders_like_the_values() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 100, 500), [0.0, np.inf, -np.inf, 1e-45, -1e-45, 65504, -3.0, -3.0]])
    values = values.astype(np.float32)
    by_key = values[np.argsort(descending_key(values), kind="stable")]
    assert by_key.tolist() == sorted(values.tolist(), reverse=True)
    halves = values.astype(np.float16)
    assert halves[np.argsort(descending_key(halves), kind="stable")].tolist() == sorted(halves.tolist(), reverse=True)


def test_buckets_and_bins_respect_the_budget() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        totals = rng.integers(0, 30, rng.integers(1, 60)) * (rng.random() < 0.8)
        totals[rng.integers(0, len(totals))] += int(rng.integers(0, 200))
        budget = int(rng.integers(1, 80))
        buckets = plan_buckets(totals, budget)
        assert buckets[0][0] == 0 and buckets[-1][1] == len(totals)
        assert all(a[1] == b[0] for a, b in pairwise(buckets))
        assert all(totals[a:b].sum() <= budget or b - a == 1 for a, b in buckets)
        groups = pack_bins(totals, budget)
        firsts = [g[0] for g in groups] + [len(totals)]
        assert [totals[a:b].sum() for a, b in pairwise(firsts)] == [g[1] for g in groups]
        assert all(
            rows <= budget or np.count_nonzero(totals[first:nxt]) == 1
            for (first, rows), nxt in zip(groups, firsts[1:], strict=True)
        )
        assert sum(g[1] for g in groups) == totals.sum()


def test_finish_memory_stays_far_below_the_data(tmp_path: Path) -> None:
    """500k triples (7 MB stored, ~28 MB to sort in one go); finish with 20k-row buckets stays under 4 MB.

    tracemalloc sees numpy's allocations, which is where the sort happens; Arrow's own pool (not traced)
    holds one row group at a time.
    """
    rng = np.random.default_rng(3)
    n_tokens, k, d_sae = 25_000, 20, 3000
    with FeatureWriter(
        tmp_path, d_sae, n_tokens, bucket_rows=20_000, row_group_rows=8192, token_part_rows=100_000
    ) as writer:
        for c, start in enumerate(range(0, n_tokens, 2500)):
            toks = np.repeat(np.arange(start, start + 2500), k)
            features = (np.arange(len(toks)) * 7919 + rng.integers(0, 2, len(toks))) % d_sae
            pairs = np.unique(toks * d_sae + features)
            writer.add_chunk(c, pairs % d_sae, pairs // d_sae, rng.random(len(pairs)).astype(np.float32) + 0.1)
        tracemalloc.start()
        counts = writer.finish()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert counts["nnz"] > 450_000
    assert peak < 4 * 2**20, peak


# -- queries ------------------------------------------------------------------------------------------------


def test_examples_and_top_examples_with_context(store: Store) -> None:
    data, tokens = store.data, store.tokens
    order = by_feature_order(data)
    token_id, seq, doc = (tokens[c].to_numpy() for c in ("token_id", "seq", "doc"))
    for f in CHECKED:
        mine = order[data.feature[order] == f]
        examples = store.q.examples(f).collect()
        assert examples["tok"].to_list() == data.tok[mine].tolist()
        assert examples["value"].to_list() == data.value[mine].astype(np.float32).tolist()
        for k, context in ((3, 0), (20, 4)):
            top = store.q.top_examples(f, k=k, context=context).collect()
            assert top.columns[:7] == ["rank", "tok", "value", "doc", "seq", "pos", "token_id"]
            assert top["tok"].to_list() == data.tok[mine][:k].tolist()
            for row in top.iter_rows(named=True):
                t = row["tok"]
                window = [w for w in range(t - context, t + context + 1) if 0 <= w < data.n_tokens and seq[w] == seq[t]]
                ids = token_id[window].tolist()
                center = window.index(t)
                assert (row["doc"], row["seq"], row["pos"]) == (doc[t], seq[t], t % CTX_LEN)
                assert row["context_token_ids"] == ids and row["center"] == center
                assert row["context_tokens"] == [decode([i]) for i in ids]
                assert (
                    row["context_text"] == f"{decode(ids[:center])}«{decode([ids[center]])}»{decode(ids[center + 1 :])}"
                )
    bare = store.q.top_examples(0, k=4, context=None).collect()
    assert bare.columns == ["rank", "tok", "value"] and bare["rank"].to_list() == [0, 1, 2, 3]


def test_quantile_examples_follow_the_documented_draw(store: Store) -> None:
    data = store.data
    order = by_feature_order(data)
    buckets = (0.0, 0.25, 0.5, 0.9, 1.0)
    for f in CHECKED:
        mine = order[data.feature[order] == f]
        n = len(mine)
        got = store.q.quantile_examples(f, n_per_bucket=3, quantiles=buckets, seed=7).collect()
        edges = np.floor(np.array(buckets) * n).astype(int)
        rng = np.random.default_rng([7, f])
        expected = []
        for b in range(len(buckets) - 1):
            size = edges[b + 1] - edges[b]
            if size > 0:
                ranks = edges[b] + rng.choice(size, size=min(3, size), replace=False)
                expected += sorted((b, n - 1 - r) for r in ranks)
        assert got["bucket"].to_list() == [b for b, _ in expected]
        assert got["tok"].to_list() == [int(data.tok[mine][row]) for _, row in expected]
        ascending = np.sort(data.value[mine].astype(np.float32))
        for row in got.iter_rows(named=True):  # each value lies in its bucket's rank range
            low, high = edges[row["bucket"]], edges[row["bucket"] + 1]
            assert ascending[low] <= row["value"] <= ascending[high - 1]
            assert (row["q_low"], row["q_high"]) == (buckets[row["bucket"]], buckets[row["bucket"] + 1])
        assert got.equals(store.q.quantile_examples(f, n_per_bucket=3, quantiles=buckets, seed=7).collect())
        assert "context_text" in got.columns


def test_density_dead_dense(store: Store) -> None:
    data = store.data
    counts = np.bincount(data.feature, minlength=D_SAE)
    density = store.q.density().collect()
    assert density.columns == ["feature", "count", "density", "mean", "max"]
    assert density["count"].to_list() == counts.tolist()
    assert density["density"].to_list() == pytest.approx((counts / data.n_tokens).tolist())
    assert store.q.dead().collect()["feature"].to_list() == list(DEAD)
    threshold = 0.05
    dense = store.q.dense(threshold).collect()
    expected = sorted((f for f in range(D_SAE) if counts[f] / data.n_tokens > threshold), key=lambda f: (-counts[f], f))
    assert dense["feature"].to_list() == expected


def test_document_and_token_range(store: Store) -> None:
    data, tokens = store.data, store.tokens
    order = np.lexsort((data.feature, data.tok))
    for doc in (0, 5, int(tokens["doc"].max()), 10_000_000):
        doc_toks = tokens.filter(pl.col("doc") == doc)["tok"].to_numpy()
        mine = order[np.isin(data.tok[order], doc_toks)]
        got = store.q.document(doc).collect()
        assert got.columns == ["tok", "feature", "value", "doc", "seq", "pos", "token_id"]
        assert got["tok"].to_list() == data.tok[mine].tolist()
        assert got["feature"].to_list() == data.feature[mine].tolist()
        assert got["value"].to_list() == data.value[mine].astype(np.float32).tolist()
        assert got["token_id"].to_list() == tokens["token_id"].to_numpy()[data.tok[mine]].tolist()
    for start, stop in ((0, 0), (0, 7), (55, 190), (130, 131), (400, 10_000)):
        mine = order[(data.tok[order] >= start) & (data.tok[order] < stop)]
        got = store.q.token_range(start, stop).collect()
        assert got["tok"].to_list() == data.tok[mine].tolist()
        assert got["feature"].to_list() == data.feature[mine].tolist()


def test_cooccurrence(store: Store) -> None:
    data = store.data
    counts = np.bincount(data.feature, minlength=D_SAE)
    for f in CHECKED:
        mine = set(data.tok[data.feature == f].tolist())
        rows = []
        for g in range(D_SAE):
            shared = len(mine & set(data.tok[data.feature == g].tolist()))
            if g != f and shared:
                rows.append((shared / (len(mine) + counts[g] - shared), shared, g))
        expected = sorted(rows, key=lambda r: (-r[0], -r[1], r[2]))[:6]
        got = store.q.cooccurrence(f, top=6).collect()
        assert got.columns == ["feature", "count", "feature_count", "jaccard"]
        assert got["feature"].to_list() == [g for _, _, g in expected]
        assert got["count"].to_list() == [s for _, s, _ in expected]
        assert got["jaccard"].to_list() == pytest.approx([j for j, _, _ in expected])


def test_on_token(store: Store) -> None:
    data, tokens = store.data, store.tokens
    for token in (4, "e", 11, 99):
        token_id = token if isinstance(token, int) else ord(token) - 97
        where = tokens.filter(pl.col("token_id") == token_id)["tok"].to_numpy()
        hit = np.isin(data.tok, where)
        expected = sorted(
            ((int((data.feature[hit] == g).sum()), g) for g in set(data.feature[hit].tolist())),
            key=lambda r: (-r[0], r[1]),
        )
        got = store.q.on_token(token).collect()
        assert got.columns == ["feature", "count", "fraction", "mean_value"]
        assert got["feature"].to_list() == [g for _, g in expected]
        assert got["count"].to_list() == [c for c, _ in expected]
        assert got["fraction"].to_list() == pytest.approx([c / len(where) for c, _ in expected])
        means = [data.value[hit & (data.feature == g)].astype(np.float64).mean() for _, g in expected]
        assert got["mean_value"].to_list() == pytest.approx(means)


def test_empty_store_answers_every_query(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path, 5, 10, **SMALL) as writer:
        writer.add_chunk(0, np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        assert writer.finish()["nnz"] == 0
    tokens = token_table(10, 0)
    q = FeatureQueries(tmp_path, tokens=tokens.lazy())
    assert q.examples(2).collect().is_empty() and q.top_examples(2).collect().is_empty()
    assert q.dead().collect()["feature"].to_list() == [0, 1, 2, 3, 4]
    assert q.document(0).collect().is_empty() and q.cooccurrence(1).collect().is_empty()
    assert q.on_token(int(tokens["token_id"][0])).collect().is_empty()
    assert q.quantile_examples(0).collect().is_empty()


# -- resume, exactly once -------------------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "_spill" not in p.parts
    }


def test_resume_and_rerun_are_idempotent(tmp_path: Path) -> None:
    data = make_data(5)
    write_store(tmp_path / "clean", data)
    reference = _files(tmp_path / "clean")
    partial = tmp_path / "partial"
    with FeatureWriter(partial, D_SAE, data.n_tokens, **SMALL) as writer:
        for index in (5, 0, 3):
            assert writer.add_chunk(index, *data.chunks[index])
    with FeatureWriter(partial, D_SAE, data.n_tokens, **SMALL) as writer:
        written = [writer.add_chunk(i, *chunk) for i, chunk in enumerate(data.chunks)]
        assert written == [i not in (5, 0, 3) for i in range(len(data.chunks))]
        counts = writer.finish()
    assert _files(partial) == reference
    with FeatureWriter(partial, D_SAE, data.n_tokens, **SMALL) as again:  # finished: nothing is rewritten
        assert again.finished and not again.add_chunk(0, *data.chunks[0])
        assert again.finish() == counts
    assert _files(partial) == reference


KILL_DATA = {"seed": 11, "n_chunks": 24, "chunk_tokens": 300}
KILL_SETTINGS = {**SMALL, "bucket_rows": 1000, "token_part_rows": 3000}
"""Fewer, larger parts than SMALL (each part costs two fsyncs); feature 0 still exceeds a bucket."""
CHILD = """
import sys
from pathlib import Path
from tests.store.test_features import FeatureWriter, make_data, D_SAE, KILL_DATA, KILL_SETTINGS
data = make_data(**KILL_DATA)
with FeatureWriter(Path(sys.argv[1]), D_SAE, data.n_tokens, **KILL_SETTINGS) as writer:
    for index, chunk in enumerate(data.chunks):
        writer.add_chunk(index, *chunk)
        print(f"chunk {index}", flush=True)
    print("finishing", flush=True)
    writer.finish()
print("done", flush=True)
"""


def _run_child(directory: Path, kill_after: str | None = None, delay: float = 0.0) -> dict[str, float]:
    """Run the writer in a subprocess; SIGKILL it `delay` s after it prints `kill_after`. Returns line times."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    assert child.stdout is not None
    for line in child.stdout:
        seen[line.strip()] = time.monotonic()
        if line.strip() == kill_after:
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == (-signal.SIGKILL if kill_after and "done" not in seen else 0), seen
    return seen


def test_sigkilled_writer_resumes_byte_identical(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    data = make_data(**KILL_DATA)
    with FeatureWriter(clean, D_SAE, data.n_tokens, **KILL_SETTINGS) as writer:
        for index, chunk in enumerate(data.chunks):
            writer.add_chunk(index, *chunk)
        start = time.monotonic()
        writer.finish()
        finish_seconds = time.monotonic() - start
    reference = _files(clean)
    assert len(json.loads((clean / INDEX_NAME).read_text())["by_feature"]) > 3
    rng = random.Random(4)
    killed = tmp_path / "killed"
    kills = [(f"chunk {rng.randrange(20)}", rng.uniform(0, 0.02)) for _ in range(2)]
    kills += [("finishing", finish_seconds * fraction) for fraction in (0.2, 0.5, 0.8)]
    mid_finish = 0
    for kill_after, delay in kills:
        _run_child(killed, kill_after, delay)
        if kill_after == "finishing":
            mid_finish += (killed / "by_feature").exists() and not (killed / INDEX_NAME).exists()
    assert mid_finish >= 1, "no kill landed inside finish"
    _run_child(killed)
    assert _files(killed) == reference
    assert json.loads((killed / INDEX_NAME).read_text())["nnz"] > 0


# -- errors ---------------------------------------------------------------------------------------------------


def test_user_errors_name_the_input(tmp_path: Path) -> None:
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    with pytest.raises(UserError, match="d_sae"):
        FeatureWriter(tmp_path / "a", 0, 10)
    with pytest.raises(UserError, match="quantiles"):
        FeatureWriter(tmp_path / "a", 4, 10, quantiles=(0.5, 1.5))
    with pytest.raises(UserError, match="overflows int64"):
        FeatureWriter(tmp_path / "a", 2**40, 2**24)
    with FeatureWriter(tmp_path / "b", 4, 10) as writer:
        with pytest.raises(UserError, match=r"float16's range.*value_dtype='float32'"):
            writer.add_chunk(0, np.array([1]), np.array([2]), np.array([7e4], np.float32))
        with pytest.raises(UserError, match="NaN or infinite"):
            writer.add_chunk(0, np.array([1]), np.array([2]), np.array([np.nan], np.float32))
        writer.add_chunk(1, *empty)
        with pytest.raises(UserError, match="lacks chunks 0 of 2"):
            writer.finish()
    with pytest.raises(UserError, match=r"started with value_dtype='float16' \(now 'float32'\)"):
        FeatureWriter(tmp_path / "b", 4, 10, "float32")
    with FeatureWriter(tmp_path / "b", 4, 10), pytest.raises(UserError, match="being written"):
        FeatureWriter(tmp_path / "b", 4, 10)
    with pytest.raises(UserError, match="no finished feature store"):
        FeatureQueries(tmp_path / "b")

    write_store(tmp_path / "c", make_data(0))
    q = FeatureQueries(tmp_path / "c")
    with pytest.raises(UserError, match="feature 40 is out of range"):
        q.examples(D_SAE)
    for call in (
        lambda: q.top_examples(0),
        lambda: q.document(0),
        lambda: q.on_token(1),
        lambda: q.quantile_examples(0),
    ):
        with pytest.raises(UserError, match="needs the token table"):
            call()
    with pytest.raises(UserError, match="rise strictly"):
        q.quantile_examples(0, quantiles=(0.5, 0.2))
    with pytest.raises(UserError, match="threshold"):
        q.dense(2.0)
    with pytest.raises(UserError, match="token range"):
        q.token_range(5, 2)
    with pytest.raises(UserError, match="k=-1 is negative"):
        q.top_examples(0, k=-1, context=None)
    with pytest.raises(UserError, match="top=-2 is negative"):
        q.cooccurrence(0, top=-2)
    with_tokens = FeatureQueries(tmp_path / "c", tokens=token_table(480, 0).lazy())
    with pytest.raises(UserError, match="negative"):
        with_tokens.top_examples(0, context=-1)
    with pytest.raises(UserError, match="pass encode="):
        with_tokens.on_token("a")
    two_tokens = FeatureQueries(tmp_path / "c", tokens=token_table(480, 0).lazy(), encode=lambda s: [1, 2])
    with pytest.raises(UserError, match="is 2 tokens"):
        two_tokens.on_token("ab")


def test_bad_chunks_are_refused(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path, 4, 10) as writer:
        with pytest.raises(ValueError, match=r"outside 0\.\.3"):
            writer.add_chunk(0, np.array([4]), np.array([0]), np.array([1.0]))
        with pytest.raises(ValueError, match=r"outside 0\.\.9"):
            writer.add_chunk(0, np.array([1]), np.array([10]), np.array([1.0]))
        with pytest.raises(ValueError, match="feature 2 appears twice for tok 3"):
            writer.add_chunk(0, np.array([2, 1, 2]), np.array([3, 3, 3]), np.array([1.0, 2.0, 3.0]))
        with pytest.raises(ValueError, match="one length"):
            writer.add_chunk(0, np.array([2, 1]), np.array([3]), np.array([1.0]))
        writer.add_chunk(0, np.array([1, 2]), np.array([5, 6]), np.array([1.0, 1.0]))
        writer.add_chunk(1, np.array([1]), np.array([6]), np.array([1.0]))
        with pytest.raises(ValueError, match="chunks must follow tok order"):
            writer.finish()
