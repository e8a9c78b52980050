"""Atomic publishing, locks, the background writer and the activation arrays' bf16 round trip."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.flows.writer_thread import BackgroundWriter
from actstore.schemas.arrays import ActivationAttrs
from actstore.schemas.errors import UserError
from actstore.store.activations import ActivationArray, ArraySpec, HarvestArrays
from actstore.store.files import atomic_write_json, object_lock, remove_temp_files, staged_directory


def _attrs(site: str, dtype: str, n: int, d: int, chunk: int) -> ActivationAttrs:
    return ActivationAttrs(
        harvest_id="h",
        corpus_id="c",
        site=site,
        module="m",
        model="x",
        logical_dtype=dtype,
        n_tokens=n,
        d=d,
        ctx_len=4,
        chunk_tokens=chunk,
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_arrays_round_trip_every_dtype_bit_exact(tmp_path: Path, dtype: str) -> None:
    n, d, chunk = 10, 6, 4
    source = torch.randn(n, d).to(getattr(torch, dtype))
    arrays = HarvestArrays(tmp_path, [ArraySpec(_attrs("s", dtype, n, d, chunk))], n, chunk)
    for c in range(arrays.n_chunks):
        rows = arrays.chunk_rows(c)
        arrays.write_chunk(c, {"s": source[rows]})
    assert arrays.done_chunks() == {0, 1, 2}
    read = ActivationArray(tmp_path / "s.zarr")
    back = read[:]
    if dtype == "bfloat16":
        assert isinstance(back, torch.Tensor) and back.dtype == torch.bfloat16
        assert torch.equal(back.view(torch.int16), source.view(torch.int16))
        raw = zarr.open_array(tmp_path / "s.zarr", mode="r")
        assert str(raw.dtype) == "uint16"  # what other Zarr readers see
    else:
        assert back.dtype == np.dtype(dtype)
        assert np.array_equal(back.view(np.uint8), source.numpy().view(np.uint8))
    assert read.shape == (n, d) and read.attrs.logical_dtype == dtype
    assert torch.equal(
        torch.as_tensor(np.asarray(read[5:7], dtype=np.float32)) if dtype != "bfloat16" else read[5:7].float(),
        source[5:7].float(),
    )


def test_reopening_checks_shape_and_keeps_done_markers(tmp_path: Path) -> None:
    spec = ArraySpec(_attrs("s", "float32", 8, 3, 4))
    first = HarvestArrays(tmp_path, [spec], 8, 4)
    first.write_chunk(1, {"s": np.ones((4, 3), np.float32)})
    again = HarvestArrays(tmp_path, [spec], 8, 4)
    assert again.done_chunks() == {1}
    other = ArraySpec(_attrs("s", "float32", 8, 5, 4))
    with pytest.raises(UserError, match="exists with shape"):
        HarvestArrays(tmp_path, [other], 8, 4)


def test_wrong_chunk_shape_is_refused_and_not_marked(tmp_path: Path) -> None:
    arrays = HarvestArrays(tmp_path, [ArraySpec(_attrs("s", "float32", 8, 3, 4))], 8, 4)
    with pytest.raises(ValueError, match="shape"):
        arrays.write_chunk(0, {"s": np.ones((3, 3), np.float32)})
    assert arrays.done_chunks() == set()


def test_loss_array_is_one_dimensional(tmp_path: Path) -> None:
    arrays = HarvestArrays(tmp_path, [ArraySpec(_attrs("loss", "float32", 6, 1, 4), squeeze=True)], 6, 4)
    arrays.write_chunk(0, {"loss": torch.arange(4.0)})
    arrays.write_chunk(1, {"loss": torch.tensor([7.0, float("nan")])})
    got = ActivationArray(tmp_path / "loss.zarr")[:]
    assert got.shape == (6,) and np.array_equal(got[:5], [0, 1, 2, 3, 7]) and np.isnan(got[5])


def test_staged_directory_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "corpora" / "c1"
    with pytest.raises(RuntimeError), staged_directory(final) as staging:
        (staging / "part.parquet").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not final.exists() and list((tmp_path / "corpora").iterdir()) == []
    with staged_directory(final) as staging:
        atomic_write_json(staging / "manifest.json", {"a": 1})
    assert json.loads((final / "manifest.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]


def test_lock_refuses_a_second_holder_and_frees_on_sigkill(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    code = (
        f"import time\nfrom pathlib import Path\nfrom actstore.store.files import object_lock\n"
        f"with object_lock(Path({str(target)!r})):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"), object_lock(target):
        pass
    holder.kill()
    holder.wait()
    with object_lock(target):  # the OS released it with the process
        pass


def test_remove_temp_files(tmp_path: Path) -> None:
    (tmp_path / "a.zarr" / "c" / "0").mkdir(parents=True)
    (tmp_path / "a.zarr" / "c" / "0" / "0.abc.partial").write_bytes(b"x")
    (tmp_path / "m.json.tmp-1234").write_bytes(b"x")
    (tmp_path / "keep").write_bytes(b"x")
    assert remove_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep"]


def test_background_writer_keeps_order_bounds_queue_and_reraises() -> None:
    seen: list[int] = []

    def slow_write(i: int) -> None:
        time.sleep(0.01)
        seen.append(i)

    with BackgroundWriter(slow_write, max_pending=2) as writer:
        for i in range(10):
            writer.submit(i)
            assert writer._queue.qsize() <= 2
    assert seen == list(range(10))

    def failing(i: int) -> None:
        if i == 3:
            raise OSError(28, "No space left on device")

    writer2: BackgroundWriter[int] = BackgroundWriter(failing, max_pending=1)
    with pytest.raises(OSError, match="No space"):
        for i in range(50):
            writer2.submit(i)
        writer2.close()
