"""Cutting the stream of kept rows into shards, and the export itself: write, verify, checksum, publish."""

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from actstore.schemas.errors import UserError
from actstore.schemas.ids import make_id, slug
from actstore.schemas.manifest import Manifest
from actstore.schemas.tables import SPLITS
from actstore.store.exports.columns import (
    BLOCK_BYTES,
    DEFAULT_SHARD_BYTES,
    EXPORT_FORMAT_TAG,
    Column,
    ExportResult,
    Piece,
    Shard,
    Writer,
)
from actstore.store.exports.datasets import DatasetsWriter
from actstore.store.exports.npy import NpyWriter
from actstore.store.exports.parquet import ParquetWriter
from actstore.store.exports.safetensors import SafetensorsWriter
from actstore.store.exports.verify import check_loadable_dataset, check_shard, sha256, verify_export
from actstore.store.files import explain_os_error, read_manifest, staged_directory, write_manifest
from actstore.store.objects import new_manifest

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class _ShardCutter:
    """Cuts the stream of kept rows into shards of `shard_rows` rows, so shard boundaries depend on the request
    only, never on how the source was chunked. With `block_rows` (table formats, whose row groups and batches
    should not be as small as a filtered chunk) rows are gathered into blocks of that many rows before writing;
    without it (pre-sized array files) every piece is written where it belongs as it comes."""

    def __init__(self, writer: Writer, shard_rows: int, block_rows: int | None, total: int | None) -> None:
        self.writer, self.shard_rows, self.block_rows, self.total = writer, shard_rows, block_rows, total
        self.buffer: list[Piece] = []
        self.buffered = 0
        self.in_shard = 0
        self.done_rows = 0
        self.shards: list[Shard] = []
        self.open = False

    def add(self, piece: Piece) -> None:
        n, at = len(piece["tok"]), 0
        while at < n:
            if not self.open:
                rows = None if self.total is None else min(self.shard_rows, self.total - self.done_rows)
                if rows is not None and rows <= 0:
                    raise UserError(
                        "the export source gave more rows than its count: the store changed while "
                        "exporting; re-run the export"
                    )
                self.writer.open_shard(len(self.shards), rows)
                self.open = True
            target = self.shard_rows - self.in_shard
            if self.block_rows is not None:
                target = min(target, self.block_rows)
            take = min(target - self.buffered, n - at)
            self.buffer.append(piece if take == n else {name: values[at : at + take] for name, values in piece.items()})
            self.buffered += take
            at += take
            if self.block_rows is None or self.buffered == target:
                self._flush()

    def _flush(self) -> None:
        if self.buffered:
            block = (
                self.buffer[0]
                if len(self.buffer) == 1
                else {name: np.concatenate([p[name] for p in self.buffer]) for name in self.buffer[0]}
            )
            self.writer.write(block, self.in_shard)
            self.in_shard += self.buffered
            self.buffer, self.buffered = [], 0
        if self.in_shard == self.shard_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        files = self.writer.close_shard()
        self.shards.append(Shard(self.done_rows, self.done_rows + self.in_shard, files))
        self.done_rows += self.in_shard
        self.in_shard, self.open = 0, False

    def close(self) -> list[Shard]:
        self._flush()
        if self.open:
            self._close_shard()
        if self.total is not None and self.done_rows != self.total:
            raise UserError(
                f"the export source gave {self.done_rows} rows, {self.total} were counted: the store "
                "changed while exporting; re-run the export"
            )
        return self.shards


def write_export(
    out: Path,
    fmt: str,
    readable: str,
    source: dict[str, Any],
    subset: dict[str, Any],
    columns: list[Column],
    logical_dtype: str,
    pieces: Callable[[bool], Iterator[Piece]],
    count: Callable[[], int],
    shard_rows: int | None,
) -> ExportResult:
    """Write, verify, checksum and publish one export; a directory already holding it is returned untouched."""
    if shard_rows is not None and shard_rows < 1:
        raise UserError(f"shard_rows={shard_rows} must be a positive number of rows per shard")
    row_bytes = sum(c.row_bytes() for c in columns)
    shard_rows = shard_rows or max(1, DEFAULT_SHARD_BYTES // row_bytes)
    config = {
        "format": fmt,
        "source": source,
        "subset": subset,
        "columns": [c.name for c in columns],
        "shard_rows": shard_rows,
    }
    export_id = make_id("export", slug(readable), config)
    existing = _existing(out, export_id)
    if existing is not None:
        return ExportResult(out, existing, False)

    began = time.perf_counter()
    total = count() if fmt in ("npy", "safetensors") else None
    if total == 0:
        raise UserError(f"the filters ({_describe(subset)}) keep no rows of {_describe(source)}: loosen them")
    metadata = {"format": EXPORT_FORMAT_TAG, "export_id": export_id, "logical_dtype": logical_dtype}
    try:
        with staged_directory(out) as staged:
            writer = _WRITERS[fmt](staged, columns, metadata)
            block_rows = None if fmt in ("npy", "safetensors") else max(1, BLOCK_BYTES // row_bytes)
            cutter = _ShardCutter(writer, shard_rows, block_rows, total)
            for piece in pieces(True):
                cutter.add(piece)
            shards = cutter.close()
            if not shards:
                raise UserError(f"the filters ({_describe(subset)}) keep no rows of {_describe(source)}: loosen them")
            shards = writer.finish(shards)
            entries = []
            for shard in shards:
                check_shard(staged, fmt, columns, shard.files, shard.stop - shard.start)
                files = [
                    {"path": f, "bytes": (staged / f).stat().st_size, "sha256": sha256(staged / f)} for f in shard.files
                ]
                entries.append(
                    {"start": shard.start, "stop": shard.stop, "rows": shard.stop - shard.start, "files": files}
                )
            rows = shards[-1].stop
            if fmt == "datasets":
                check_loadable_dataset(staged, columns, rows)
            seconds = time.perf_counter() - began
            manifest = new_manifest(
                "export",
                export_id,
                config,
                counts={
                    "rows": rows,
                    "shards": len(entries),
                    "bytes": sum(f["bytes"] for e in entries for f in e["files"]),
                },
                timings={"export_s": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1)},
                extra={
                    "format": fmt,
                    "logical_dtype": logical_dtype,
                    "columns": [c.as_json() for c in columns],
                    "shards": entries,
                    **(
                        {"split_codes": list(SPLITS)}
                        if any(c.name == "split" and c.dtype == "int8" for c in columns)
                        else {}
                    ),
                },
            )
            write_manifest(staged, manifest)
    except OSError as error:
        raise explain_os_error(error, out) from None
    return ExportResult(out, read_manifest(out) or manifest, True)


def _existing(out: Path, export_id: str) -> Manifest | None:
    """The manifest of this very export already at `out`, None when `out` is free; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export directory {out} is a file: choose a directory path for the export")
    if not out.exists():
        return None
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise UserError(f"export directory {out} exists and is not an export: choose a new directory or delete it")
        return None
    if manifest.kind != "export" or manifest.id != export_id:
        raise UserError(
            f"export directory {out} already holds {manifest.kind} {manifest.id}, made with other "
            "settings: choose another directory or delete it"
        )
    return verify_export(out, checksums=False)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None and k not in ("where_hash", "parts"))


_WRITERS: dict[str, Callable[[Path, list[Column], dict[str, str]], Writer]] = {
    "parquet": ParquetWriter,
    "datasets": DatasetsWriter,
    "npy": NpyWriter,
    "safetensors": SafetensorsWriter,
}
