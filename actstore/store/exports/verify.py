"""Reading an export back: every shard's rows, columns, dtypes and checksums against its manifest."""

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.schemas.errors import UserError
from actstore.schemas.manifest import Manifest
from actstore.store.exports.columns import SAFETENSORS_DTYPES, Column, first_line
from actstore.store.files import read_manifest

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


def verify_export(out: str | Path, checksums: bool = True) -> Manifest:
    """Re-read a finished export's shards and compare them with its manifest: files, bytes, rows, columns, dtypes,
    shapes (and sha256 with `checksums`). Returns the manifest; any difference is a UserError naming the file."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.kind != "export":
        raise UserError(f"{out} is not a finished export (no export manifest.json): run the export to make it")
    fmt = manifest.extra["format"]
    columns = [
        Column(spec["name"], spec["dtype"], spec["shape"][0] if spec["shape"] else None)
        for spec in manifest.extra["columns"]
    ]
    for shard in manifest.extra["shards"]:
        check_shard(out, fmt, columns, [f["path"] for f in shard["files"]], shard["rows"])
        for entry in shard["files"]:
            path = out / entry["path"]
            size = path.stat().st_size
            if size != entry["bytes"]:
                problem = f"has {size} bytes, its manifest says {entry['bytes']}"
            elif checksums and sha256(path) != entry["sha256"]:
                problem = "does not match the sha256 in its manifest"
            else:
                continue
            raise UserError(
                f"export file {path} {problem}: the export was altered; delete the directory and re-run the export"
            )
    if fmt == "datasets":
        check_loadable_dataset(out, columns, manifest.counts["rows"])
    return manifest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def arrow_stream_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


def _arrow_columns(schema: pa.Schema) -> dict[str, Column]:
    def dtype(t: pa.DataType) -> str:
        return "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else np.dtype(t.to_pandas_dtype()).name

    return {
        f.name: Column(f.name, dtype(f.type.value_type), f.type.list_size)
        if pa.types.is_fixed_size_list(f.type)
        else Column(f.name, dtype(f.type))
        for f in schema
    }


def _shard_contents(directory: Path, fmt: str, files: list[str]) -> tuple[dict[str, Column], set[int]]:
    """The columns a shard's files hold and the row counts they claim, read from headers and footers."""
    if fmt == "parquet":
        metadata = pq.read_metadata(directory / files[0])
        return _arrow_columns(metadata.schema.to_arrow_schema()), {metadata.num_rows}
    if fmt == "datasets":
        with pa.memory_map(str(directory / files[0])) as source:
            table = pa.ipc.open_stream(source).read_all()
        return _arrow_columns(table.schema), {table.num_rows}
    if fmt == "npy":
        found, rows = {}, set()
        for name in files:
            values = np.load(directory / name, mmap_mode="r")
            column = name.rsplit("-", 1)[0]
            found[column] = Column(column, values.dtype.name, values.shape[1] if values.ndim == 2 else None)
            rows.add(values.shape[0])
        return found, rows
    from safetensors import safe_open

    names = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    found, rows = {}, set()
    with safe_open(str(directory / files[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_slice(key)
            shape = tensor.get_shape()
            found[key] = Column(
                key, names.get(tensor.get_dtype(), tensor.get_dtype()), shape[1] if len(shape) == 2 else None
            )
            rows.add(shape[0])
    return found, rows


def check_shard(directory: Path, fmt: str, columns: list[Column], files: list[str], rows: int) -> None:
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UserError(f"export file {directory / missing[0]} is missing: delete the export directory and re-run")
    try:
        found, counts = _shard_contents(directory, fmt, files)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise UserError(
            f"export shard {directory / files[0]} cannot be read back ({first_line(error)}): delete "
            "the export directory and re-run"
        ) from None
    expected = {c.name: c for c in columns}
    if found != expected or counts != {rows}:
        raise UserError(
            f"export shard {directory / files[0]} holds {sorted(counts)} rows of {list(found.values())}, "
            f"expected {rows} rows of {columns}: delete the export directory and re-run"
        )


def check_loadable_dataset(directory: Path, columns: list[Column], rows: int) -> None:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(directory))
    except (OSError, ValueError) as error:
        raise UserError(
            f"{directory} does not load with datasets.load_from_disk ({first_line(error)}): delete "
            "it and re-run the export"
        ) from None
    names = [c.name for c in columns]
    if not isinstance(dataset, datasets.Dataset) or dataset.num_rows != rows or list(dataset.features) != names:
        found = (
            f"{dataset.num_rows} rows of {list(dataset.features)}"
            if isinstance(dataset, datasets.Dataset)
            else type(dataset).__name__
        )
        raise UserError(
            f"{directory} loads as {found}, expected {rows} rows of {names}: delete it and re-run the export"
        )
