"""Exports against the source read independently: every format read back with its own reader (pyarrow and polars,
`datasets.load_from_disk`, `np.load(mmap_mode="r")`, `safetensors.safe_open`) equals the Zarr bits and a numpy
mask of the token table, bit for bit; feature tables equal the triples written here with pyarrow; manifests
list shards whose bytes and sha256 match the files; re-runs are no-ops; every user mistake is a one-line
UserError; and altered shards are caught."""

import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from safetensors import safe_open

from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS
from actstore.store.exports import FORMATS, export_activations, export_features, verify_export
from actstore.store.root import Store
from tests.helpers import snapshot
from tests.shard_data import SyntheticStore, write_synthetic_store

CTX, CHUNK, N_SEQS = 32, 64, 16  # 512 tokens in 8 chunks
SITES = {
    "blocks.0.hook_resid_post": (8, "float32"),
    "blocks.1.hook_resid_post": (6, "float16"),
    "blocks.2.hook_resid_post": (5, "bfloat16"),
}
DTYPE_OF_SITE = {dtype: site for site, (_, dtype) in SITES.items()}
TOKEN_COLS = ("doc", "seq", "pos", "token_id", "split")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, SyntheticStore]:
    root = tmp_path_factory.mktemp("exports")
    return Store(root), write_synthetic_store(root, N_SEQS, CTX, CHUNK, [SITES])


@pytest.fixture(scope="module")
def tokens(synth: tuple[Store, SyntheticStore]) -> pl.DataFrame:
    store, made = synth
    table = pl.read_parquet(store.corpus_dir(made.corpus_id) / "part-*.parquet").sort("tok")
    return table.with_columns(pl.col("split").cast(pl.String))


def raw_rows(store: Store, made: SyntheticStore, site: str) -> np.ndarray:
    """The stored bits, read with zarr directly (uint16 for bf16)."""
    return zarr.open_array(store.harvest_dir(made.harvest_ids[0]) / f"{site}.zarr", mode="r")[:]


def bits(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """The bit patterns of floats, so equality is bit-exact (NaN and -0.0 included)."""
    if isinstance(values, torch.Tensor):
        values = (
            values.contiguous()
            .view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[values.dtype])
            .numpy()
        )
    return np.ascontiguousarray(values).view(f"u{np.asarray(values).dtype.itemsize}")


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 bits widened to float32 by torch (an independent path from the exporter's bit shift)."""
    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()


# --- reading exports back with each format's own reader -----------------------------------------------------------


def arrow_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Numpy columns of an Arrow table: fixed-size lists as 2-D arrays, `split` as Python strings."""
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            columns[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        else:
            columns[name] = np.asarray(column.to_pylist(), dtype=object) if name == "split" else column.to_numpy()
    return columns


def read_parquet(out: Path) -> dict[str, np.ndarray]:
    parts = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(p) for p in parts)
    return arrow_columns(table)


def read_datasets(out: Path) -> dict[str, np.ndarray]:
    loaded = datasets.load_from_disk(str(out))
    assert isinstance(loaded, datasets.Dataset)
    table = loaded.with_format("arrow")[:]
    return arrow_columns(table)


def read_npy(out: Path) -> dict[str, np.ndarray]:
    names = sorted({p.name.rsplit("-", 1)[0] for p in out.glob("*.npy")})
    return {
        name: np.concatenate([np.load(p, mmap_mode="r") for p in sorted(out.glob(f"{name}-*.npy"))]) for name in names
    }


def read_safetensors(out: Path) -> dict[str, Any]:
    pieces: dict[str, list[torch.Tensor]] = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                pieces.setdefault(key, []).append(f.get_tensor(key))
    return {key: torch.cat(values) for key, values in pieces.items()}


READERS = {"parquet": read_parquet, "datasets": read_datasets, "npy": read_npy, "safetensors": read_safetensors}


def check_act(fmt: str, logical: str, got: Any, raw: np.ndarray) -> None:
    """Exported activations equal the stored bits: bf16 exact in safetensors, widened exactly elsewhere."""
    if fmt == "safetensors":
        expected = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[logical]
        assert got.dtype == expected
        assert np.array_equal(bits(got), raw.view(bits(got).dtype))
        return
    got = np.asarray(got)
    if logical == "bfloat16":
        assert got.dtype == np.float32
        assert np.array_equal(bits(got), bits(bf16_to_f32(raw)))
        narrowed = torch.from_numpy(np.array(got)).to(torch.bfloat16)
        assert np.array_equal(bits(narrowed), raw)  # narrowing gives the stored bits back
    else:
        assert got.dtype == np.dtype(logical)
        assert np.array_equal(bits(got), bits(raw))


def as_numpy(values: Any) -> np.ndarray:
    return values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def check_manifest_files(out: Path, rows: int, shard_rows: int) -> dict[str, Any]:
    """Shards are contiguous row ranges, full but the last (except datasets, which reshards), with true sizes."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "export" and manifest["counts"]["rows"] == rows
    shards = manifest["extra"]["shards"]
    assert [s["start"] for s in shards] == [0] + [s["stop"] for s in shards[:-1]] and shards[-1]["stop"] == rows
    if manifest["extra"]["format"] != "datasets":
        assert all(s["rows"] == shard_rows for s in shards[:-1]) and 0 < shards[-1]["rows"] <= shard_rows
    for shard in shards:
        for entry in shard["files"]:
            data = (out / entry["path"]).read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    return manifest


# --- activations -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("logical", ["float32", "float16", "bfloat16"])
def test_whole_array_round_trips_bit_exact(
    synth: tuple[Store, SyntheticStore], tmp_path: Path, fmt: str, logical: str
) -> None:
    store, made = synth
    site = DTYPE_OF_SITE[logical]
    raw = raw_rows(store, made, site)
    result = export_activations(store, made.harvest_ids[0], site, tmp_path / "out", fmt, shard_rows=100)
    assert result.written and result.path == tmp_path / "out"
    got = READERS[fmt](result.path)
    assert set(got) == {"tok", "act"}
    assert np.array_equal(as_numpy(got["tok"]), np.arange(len(raw))) and as_numpy(got["tok"]).dtype == np.int64
    check_act(fmt, logical, got["act"], raw)
    manifest = check_manifest_files(result.path, len(raw), 100)
    assert manifest["extra"]["logical_dtype"] == logical
    assert manifest["config"]["source"]["site"] == site
    assert manifest["config"]["source"]["harvest_id"] == made.harvest_ids[0]
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_subset_with_token_columns_matches_numpy_mask(
    synth: tuple[Store, SyntheticStore], tokens: pl.DataFrame, tmp_path: Path, fmt: str
) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["bfloat16"]
    raw = raw_rows(store, made, site)
    result = export_activations(
        store,
        made.harvest_ids[0],
        site,
        tmp_path / "out",
        fmt,
        rows=(37, 455),
        split="train",
        token_columns=TOKEN_COLS,
        shard_rows=70,
    )
    tok = np.arange(len(raw))
    keep = (tok >= 37) & (tok < 455) & (tokens["split"].to_numpy() == "train")
    assert 0 < keep.sum() < 418
    got = READERS[fmt](result.path)
    assert np.array_equal(as_numpy(got["tok"]), tok[keep])
    check_act(fmt, "bfloat16", got["act"], raw[keep])
    for name in ("doc", "seq", "pos", "token_id"):
        values = as_numpy(got[name])
        assert values.dtype == tokens[name].to_numpy().dtype
        assert np.array_equal(values, tokens[name].to_numpy()[keep])
    split = as_numpy(got["split"])
    if fmt in ("parquet", "datasets"):
        assert set(split.tolist()) == {"train"}
    else:
        assert split.dtype == np.int8 and set(split.tolist()) == {SPLITS.index("train")}
    check_manifest_files(result.path, int(keep.sum()), 70)


@pytest.mark.parametrize(
    ("fmt", "where"),
    [
        ("parquet", pl.col("pos") % 3 == 1),
        ("npy", "pos % 3 = 1 AND doc >= 2"),
        ("safetensors", pl.col("token_id") < 20_000),
    ],
)
def test_where_filter_matches_polars_filter(
    synth: tuple[Store, SyntheticStore], tokens: pl.DataFrame, tmp_path: Path, fmt: str, where: pl.Expr | str
) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["float16"]
    raw = raw_rows(store, made, site)
    expected = tokens.filter(pl.sql_expr(where) if isinstance(where, str) else where)["tok"].to_numpy()
    result = export_activations(store, made.harvest_ids[0], site, tmp_path / "out", fmt, where=where)
    got = READERS[fmt](result.path)
    assert np.array_equal(as_numpy(got["tok"]), expected)
    check_act(fmt, "float16", got["act"], raw[expected])
    assert result.manifest.config["subset"]["where"] == (where if isinstance(where, str) else str(where))


def test_parquet_is_readable_by_polars_and_carries_the_logical_dtype(
    synth: tuple[Store, SyntheticStore], tmp_path: Path
) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["bfloat16"]
    raw = raw_rows(store, made, site)
    out = export_activations(store, made.harvest_ids[0], site, tmp_path / "out", "parquet", shard_rows=200).path
    frame = pl.read_parquet(out / "part-*.parquet")
    assert frame.schema["act"] == pl.Array(pl.Float32, 5) and frame.height == len(raw)
    assert np.array_equal(bits(frame["act"].to_numpy()), bits(bf16_to_f32(raw)))
    metadata = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"actstore"])
    assert metadata["logical_dtype"] == "bfloat16" and metadata["format"].startswith("actstore.export")
    with safe_open(
        str(
            export_activations(store, made.harvest_ids[0], site, tmp_path / "st", "safetensors").path
            / "shard-00000.safetensors"
        ),
        framework="pt",
    ) as f:
        assert f.metadata()["logical_dtype"] == "bfloat16"


def test_datasets_export_feeds_a_torch_trainer(synth: tuple[Store, SyntheticStore], tmp_path: Path) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["float32"]
    out = export_activations(store, made.harvest_ids[0], site, tmp_path / "out", "datasets", shard_rows=128).path
    loaded = datasets.load_from_disk(str(out)).with_format("torch")
    batch = loaded[:64]
    assert batch["act"].shape == (64, 8) and batch["act"].dtype == torch.float32
    assert torch.equal(batch["act"], torch.from_numpy(raw_rows(store, made, site)[:64]))
    assert len(list(out.glob("data-*.arrow"))) == 4 and not (out / "_staging").exists()


def test_rerun_is_a_no_op_and_other_settings_are_refused(synth: tuple[Store, SyntheticStore], tmp_path: Path) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["float16"]
    out = tmp_path / "out"
    for fmt in FORMATS:
        first = export_activations(store, made.harvest_ids[0], site, out / fmt, fmt, split="holdout", shard_rows=50)
        before = snapshot(out / fmt)
        again = export_activations(store, made.harvest_ids[0], site, out / fmt, fmt, split="holdout", shard_rows=50)
        assert first.written and not again.written
        assert again.manifest == first.manifest and snapshot(out / fmt) == before
        with pytest.raises(UserError, match="made with other settings") as error:
            export_activations(store, made.harvest_ids[0], site, out / fmt, fmt, split="train", shard_rows=50)
        assert "\n" not in str(error.value) and snapshot(out / fmt) == before


def test_array_formats_stream_in_bounded_memory(tmp_path: Path) -> None:
    """A 16 MiB array exported through numpy-only writers never holds more than a few chunks."""
    store = Store(tmp_path / "store")
    made = write_synthetic_store(store.root, 512, 64, 1024, [{"a": (128, "float32")}])  # 32768 x 128 x 4 B
    total = 32768 * 128 * 4
    for fmt in ("npy", "safetensors"):
        tracemalloc.start()
        try:
            export_activations(store, made.harvest_ids[0], "a", tmp_path / fmt, fmt, shard_rows=10_000, split="train")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < total / 4, f"{fmt} peaked at {peak} bytes for a {total}-byte array"


# --- feature tables ----------------------------------------------------------------------------------------------


D_SAE = 20


def write_feature_table(directory: Path, value_dtype: str, seed: int = 0) -> pl.DataFrame:
    """Triples of 3 distinct features per token over the synthetic corpus, written with pyarrow in both copies
    (two parts each, small row groups); returns them as a frame."""
    rng = np.random.default_rng(seed)
    n = N_SEQS * CTX
    feature = np.stack([rng.choice(D_SAE, 3, replace=False) for _ in range(n)]).reshape(-1).astype(np.int32)
    tok = np.repeat(np.arange(n, dtype=np.int64), 3)
    value = rng.exponential(2.0, len(tok)).astype(value_dtype)
    frame = pl.DataFrame({"feature": feature, "tok": tok, "value": value.astype(np.float32)})
    orders = {
        "by_feature": np.lexsort((tok, -value.astype(np.float64), feature)),
        "by_token": np.lexsort((feature, tok)),
    }
    schema = pa.schema(
        [
            pa.field("feature", pa.int32(), nullable=False),
            pa.field("tok", pa.int64(), nullable=False),
            pa.field("value", pa.from_numpy_dtype(np.dtype(value_dtype)), nullable=False),
        ]
    )
    for name, order in orders.items():
        (directory / name).mkdir(parents=True)
        for i, part in enumerate(np.array_split(order, 2)):
            table = pa.Table.from_arrays(
                [pa.array(feature[part]), pa.array(tok[part]), pa.array(value[part])], schema=schema
            )
            pq.write_table(table, directory / name / f"part-{i:06d}.parquet", row_group_size=100)
    return frame.with_columns(pl.Series("value_bits", value.view(f"u{value.itemsize}")))


@pytest.fixture(scope="module", params=["float16", "float32"])
def feature_table(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pl.DataFrame, str]:
    directory = tmp_path_factory.mktemp("features") / "sae-x" / "harvest-x"
    return directory, write_feature_table(directory, request.param), request.param


def triples(got: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return as_numpy(got["feature"]), as_numpy(got["tok"]), as_numpy(got["value"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_table_round_trips_in_both_orders(
    feature_table: tuple[Path, pl.DataFrame, str], tmp_path: Path, fmt: str
) -> None:
    directory, frame, value_dtype = feature_table
    for order, sort in (
        ("feature", [pl.col("feature"), -pl.col("value"), pl.col("tok")]),
        ("token", [pl.col("tok"), pl.col("feature")]),
    ):
        expected = frame.sort(sort)
        result = export_features(directory, tmp_path / order, fmt, order=order, shard_rows=333)  # type: ignore[arg-type]
        feature, tok, value = triples(READERS[fmt](result.path))
        assert feature.dtype == np.int32 and tok.dtype == np.int64 and value.dtype == np.dtype(value_dtype)
        assert np.array_equal(feature, expected["feature"].to_numpy())
        assert np.array_equal(tok, expected["tok"].to_numpy())
        assert np.array_equal(bits(value), expected["value_bits"].to_numpy())
        check_manifest_files(result.path, frame.height, 333)
        assert result.manifest.config["source"]["table"] == "sae-x/harvest-x"


@pytest.mark.parametrize("fmt", FORMATS)
def test_feature_subsets(
    synth: tuple[Store, SyntheticStore],
    tokens: pl.DataFrame,
    feature_table: tuple[Path, pl.DataFrame, str],
    tmp_path: Path,
    fmt: str,
) -> None:
    store, made = synth
    directory, frame, _ = feature_table
    by_feature = export_features(directory, tmp_path / "f", fmt, features=[3, 17, 7], rows=(100, 400))
    expected = frame.filter(pl.col("feature").is_in([3, 7, 17]) & pl.col("tok").is_between(100, 399))
    expected = expected.sort([pl.col("feature"), -pl.col("value"), pl.col("tok")])
    feature, tok, value = triples(READERS[fmt](by_feature.path))
    assert np.array_equal(feature, expected["feature"].to_numpy()) and np.array_equal(tok, expected["tok"].to_numpy())
    assert np.array_equal(bits(value), expected["value_bits"].to_numpy())

    by_token = export_features(
        directory,
        tmp_path / "t",
        fmt,
        order="token",
        features=[5, 6],
        split="holdout",
        where=pl.col("pos") > 3,
        token_table=store.corpus_dir(made.corpus_id),
        token_columns=("pos", "doc"),
    )
    expected = (
        frame.join(tokens, on="tok")
        .filter(pl.col("feature").is_in([5, 6]) & (pl.col("split") == "holdout") & (pl.col("pos") > 3))
        .sort(["tok", "feature"])
    )
    got = READERS[fmt](by_token.path)
    feature, tok, value = triples(got)
    assert len(tok) == expected.height > 0
    assert np.array_equal(tok, expected["tok"].to_numpy()) and np.array_equal(feature, expected["feature"].to_numpy())
    assert np.array_equal(as_numpy(got["pos"]), expected["pos"].to_numpy())
    assert np.array_equal(as_numpy(got["doc"]), expected["doc"].to_numpy())


# --- errors ------------------------------------------------------------------------------------------------------


def one_line_error(call: Any, match: str) -> None:
    with pytest.raises(UserError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_activation_errors_are_one_line(synth: tuple[Store, SyntheticStore], tmp_path: Path) -> None:
    store, made = synth
    harvest, site = made.harvest_ids[0], DTYPE_OF_SITE["float32"]
    out = tmp_path / "out"

    def export(**kwargs: Any) -> Any:
        args = {"store": store, "harvest_id": harvest, "site": site, "out": out, "format": "parquet"} | kwargs
        return lambda: export_activations(**args)

    one_line_error(export(format="csv"), "unknown export format 'csv'")
    one_line_error(export(harvest_id="harvest-nope"), "no harvest 'harvest-nope'")
    one_line_error(export(site="blocks.9.hook_resid_post"), "has no site")
    one_line_error(export(rows=(10, 10_000)), "row range")
    one_line_error(export(rows=(5, 5)), "row range")
    one_line_error(export(split="test"), "split 'test' is not a split")
    one_line_error(export(token_columns=("doc", "text")), "token columns")
    one_line_error(export(where=pl.col("logit") > 0), "lacks")
    one_line_error(export(where="pos >>> 3"), "not an SQL expression")
    one_line_error(export(where=pl.col("pos").sum() > 3), "row-wise")
    one_line_error(export(where=pl.col("pos") > 10_000), "keep no rows")
    one_line_error(export(format="npy", where=pl.col("pos") > 10_000), "keep no rows")
    one_line_error(export(shard_rows=0), "shard_rows")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(export(), "is not an export")
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    one_line_error(export(out=tmp_path / "file"), "is a file")


def test_feature_errors_are_one_line(feature_table: tuple[Path, pl.DataFrame, str], tmp_path: Path) -> None:
    directory, _, _ = feature_table
    one_line_error(lambda: export_features(tmp_path / "none", tmp_path / "o", "npy"), "no feature table")
    one_line_error(lambda: export_features(directory, tmp_path / "o", "npy", split="train"), "order='token'")
    one_line_error(
        lambda: export_features(directory, tmp_path / "o", "npy", order="token", token_columns=("pos",)), "token_table"
    )
    one_line_error(lambda: export_features(directory, tmp_path / "o", "npy", order="rank"), "order 'rank'")  # type: ignore[arg-type]
    one_line_error(lambda: export_features(directory, tmp_path / "o", "npy", features=[]), "features")
    one_line_error(lambda: export_features(directory, tmp_path / "o", "npy", features=[D_SAE + 5]), "keep no rows")
    bad = tmp_path / "bad" / "by_feature"
    bad.mkdir(parents=True)
    pq.write_table(
        pa.table({"feature": pa.array([1], pa.int64()), "tok": [0], "value": [1.0]}), bad / "part-000000.parquet"
    )
    one_line_error(lambda: export_features(bad.parent, tmp_path / "o", "npy"), "not a feature table part")


def test_verify_catches_altered_shards(synth: tuple[Store, SyntheticStore], tmp_path: Path) -> None:
    store, made = synth
    site = DTYPE_OF_SITE["bfloat16"]
    for fmt in FORMATS:
        out = export_activations(store, made.harvest_ids[0], site, tmp_path / fmt, fmt, shard_rows=200).path
        assert verify_export(out).counts["rows"] == N_SEQS * CTX
    # A shard replaced by a valid file of other rows: caught at header level.
    parquet = tmp_path / "parquet" / "part-00000.parquet"
    pq.write_table(pq.read_table(parquet).slice(0, 150), parquet)
    one_line_error(lambda: verify_export(tmp_path / "parquet", checksums=False), "150")
    np.save(tmp_path / "npy" / "act-00001.npy", np.zeros((200, 5), np.float16))
    one_line_error(lambda: verify_export(tmp_path / "npy", checksums=False), "float16")
    # One flipped value bit, same size and header: only the checksum sees it.
    shard = tmp_path / "safetensors" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    verify_export(tmp_path / "safetensors", checksums=False)
    one_line_error(lambda: verify_export(tmp_path / "safetensors"), "sha256")
    (tmp_path / "datasets" / "data-00000-of-00003.arrow").unlink()
    one_line_error(lambda: verify_export(tmp_path / "datasets"), "missing")
    one_line_error(lambda: verify_export(tmp_path), "not a finished export")
