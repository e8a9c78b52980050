"""The safetensors format: one pre-sized file per shard with every column a tensor."""

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from actstore.store.exports.columns import SAFETENSORS_DTYPES, Column, Piece, Shard

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class SafetensorsWriter:
    """`shard-NNNNN.safetensors`, written without holding a shard in memory: the header is known from the row
    count, each tensor's bytes are contiguous, so a block lands at `tensor offset + row * row bytes`."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.metadata = directory, metadata
        # Widest items first, as safetensors' own writer does, so every tensor starts aligned to its item size.
        self.columns = sorted(columns, key=lambda c: -(c.row_bytes() // (c.width or 1)))
        self.fd = -1
        self.name = ""
        self.offsets: dict[str, int] = {}

    def open_shard(self, index: int, rows: int | None) -> None:
        assert rows is not None
        header: dict[str, Any] = {"__metadata__": self.metadata}
        at = 0
        for c in self.columns:
            size = rows * c.row_bytes()
            shape = [rows] if c.width is None else [rows, c.width]
            header[c.name] = {"dtype": SAFETENSORS_DTYPES[c.dtype], "shape": shape, "data_offsets": [at, at + size]}
            self.offsets[c.name] = at
            at += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        prefix = struct.pack("<Q", len(raw)) + raw
        self.offsets = {name: offset + len(prefix) for name, offset in self.offsets.items()}
        self.name = f"shard-{index:05d}.safetensors"
        self.fd = os.open(self.dir / self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, len(prefix) + at)
        _pwrite_all(self.fd, prefix, 0)

    def write(self, block: Piece, offset: int) -> None:
        for c in self.columns:
            values = np.ascontiguousarray(block[c.name])
            _pwrite_all(self.fd, memoryview(values).cast("B"), self.offsets[c.name] + offset * c.row_bytes())

    def close_shard(self) -> list[str]:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        return [self.name]

    def finish(self, shards: list[Shard]) -> list[Shard]:
        return shards


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
