"""The token table writes parts that scan back to exactly the rows written, counts them right, and reads any
range of windows equal to slicing the whole table."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.tokens import ROW_GROUP_ROWS, SPLIT_DTYPE, read_windows, scan_tokens, write_token_table

CTX = 8


def synthetic_table(n_seqs: int, seed: int = 0) -> pa.Table:
    """A token table built with numpy alone: random token ids, documents of random lengths, hashed-like splits."""
    rng = np.random.default_rng(seed)
    n = n_seqs * CTX
    tok = np.arange(n, dtype=np.int64)
    doc = np.cumsum(rng.random(n) < 0.05).astype(np.int64)
    holdout = rng.random(doc[-1] + 1) < 0.2
    split = pa.DictionaryArray.from_arrays(pa.array(holdout[doc].astype(np.int8)), pa.array(SPLITS))
    columns = [tok, doc, tok // CTX, (tok % CTX).astype(np.int32), rng.integers(0, 50_000, n).astype(np.int32)]
    return pa.Table.from_arrays([*map(pa.array, columns), split], schema=TOKEN_SCHEMA)


def batches_of(table: pa.Table, rows: int) -> Iterator[pa.RecordBatch]:
    yield from table.to_batches(max_chunksize=rows)


def test_parts_scan_back_equal_and_counts(tmp_path: Path) -> None:
    table = synthetic_table(n_seqs=1000)
    counts = write_token_table(tmp_path, batches_of(table, 333), rows_per_part=3000)

    parts = sorted(tmp_path.iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(3)]  # 8000 rows / 3000, no temps
    assert [pq.read_metadata(p).num_rows for p in parts] == [3000, 3000, 2000]

    doc = table.column("doc").to_numpy()
    split = np.asarray(table.column("split").to_pylist())
    assert counts == {
        "n_tokens": 8000,
        "n_seqs": 1000,
        "n_docs": len(np.unique(doc)),
        "n_parts": 3,
        "tokens_by_split": {"train": int((split == "train").sum()), "holdout": int((split == "holdout").sum())},
    }

    frame = scan_tokens(tmp_path)
    assert isinstance(frame, pl.LazyFrame)
    assert frame.collect_schema()["split"] == SPLIT_DTYPE
    got = frame.collect()
    expected = pl.from_arrow(table).with_columns(pl.col("split").cast(pl.String).cast(SPLIT_DTYPE))
    assert got.equals(expected)


def test_row_groups_stay_within_the_target_size(tmp_path: Path) -> None:
    table = synthetic_table(n_seqs=50_000)  # 400k rows
    write_token_table(tmp_path, batches_of(table, 50_000), rows_per_part=300_000)
    groups = [
        [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        for meta in map(pq.read_metadata, sorted(tmp_path.glob("part-*.parquet")))
    ]
    assert groups == [[ROW_GROUP_ROWS, ROW_GROUP_ROWS, 300_000 - 2 * ROW_GROUP_ROWS], [100_000]]
    assert pq.read_metadata(tmp_path / "part-00000.parquet").row_group(0).column(0).compression == "ZSTD"


def test_read_windows_equals_slicing_the_table(tmp_path: Path) -> None:
    table = synthetic_table(n_seqs=500, seed=1)
    write_token_table(tmp_path, batches_of(table, 1000), rows_per_part=700)  # parts end mid-window
    windows = table.column("token_id").to_numpy().reshape(500, CTX)
    ranges = [(0, 1), (0, 500), (87, 88), (87, 176), (499, 500), (10, 10), (250, 333)]
    for start, stop in ranges:
        got = read_windows(tmp_path, start, stop, CTX)
        assert got.dtype == np.int32 and got.shape == (stop - start, CTX)
        assert np.array_equal(got, windows[start:stop]), (start, stop)


def test_read_windows_rejects_bad_ranges_and_wrong_ctx_len(tmp_path: Path) -> None:
    write_token_table(tmp_path, batches_of(synthetic_table(n_seqs=20), 64))
    with pytest.raises(ValueError, match="20 windows"):
        read_windows(tmp_path, 15, 21, CTX)
    with pytest.raises(ValueError, match="not a range"):
        read_windows(tmp_path, 5, 4, CTX)
    with pytest.raises(ValueError, match="ctx_len=4"):
        read_windows(tmp_path, 2, 6, 4)


def test_rewrite_replaces_stale_parts_and_failed_write_leaves_no_temporaries(tmp_path: Path) -> None:
    write_token_table(tmp_path, batches_of(synthetic_table(n_seqs=100), 80), rows_per_part=100)
    assert len(list(tmp_path.glob("part-*.parquet"))) == 8

    small = synthetic_table(n_seqs=10, seed=3)
    assert write_token_table(tmp_path, batches_of(small, 80), rows_per_part=100)["n_parts"] == 1
    assert scan_tokens(tmp_path).collect().height == 80

    def failing() -> Iterator[pa.RecordBatch]:
        yield from batches_of(synthetic_table(n_seqs=42_500), 10_000)  # 340k rows: one row group into part 2
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_token_table(tmp_path, failing(), rows_per_part=200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]  # the complete part only


def test_out_of_order_batches_are_rejected(tmp_path: Path) -> None:
    table = synthetic_table(n_seqs=10)
    first, second = table.slice(0, 40).to_batches()[0], table.slice(40).to_batches()[0]
    with pytest.raises(ValueError, match="expected 40"):
        write_token_table(tmp_path, [first, first, second])
    with pytest.raises(ValueError, match="TOKEN_SCHEMA"):
        write_token_table(tmp_path, [first.drop_columns(["split"])])


def test_missing_table_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        scan_tokens(tmp_path / "corpus-x")
    assert "corpus-x" in str(excinfo.value) and "ingest" in str(excinfo.value)
    with pytest.raises(UserError):
        read_windows(tmp_path, 0, 1, CTX)
