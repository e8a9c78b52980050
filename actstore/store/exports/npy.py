"""The NumPy format: one pre-sized `.npy` file per column per shard, written in place."""

from pathlib import Path

import numpy as np

from actstore.store.exports.columns import Column, Piece, Shard

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class NpyWriter:
    """`<column>-NNNNN.npy` memmaps, pre-sized per shard and filled block by block."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.columns = directory, columns
        self.maps: dict[str, np.memmap] = {}

    def open_shard(self, index: int, rows: int | None) -> None:
        assert rows is not None
        self.maps = {
            c.name: np.lib.format.open_memmap(
                self.dir / f"{c.name}-{index:05d}.npy",
                mode="w+",
                dtype=c.dtype,
                shape=(rows,) if c.width is None else (rows, c.width),
            )
            for c in self.columns
        }

    def write(self, block: Piece, offset: int) -> None:
        for name, target in self.maps.items():
            target[offset : offset + len(block[name])] = block[name]

    def close_shard(self) -> list[str]:
        names = []
        for target in self.maps.values():
            target.flush()
            names.append(Path(str(target.filename)).name)
        self.maps = {}
        return names

    def finish(self, shards: list[Shard]) -> list[Shard]:
        return shards
