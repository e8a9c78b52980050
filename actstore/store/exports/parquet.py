"""The Parquet format: one file per shard, row groups of up to BLOCK_BYTES."""

from pathlib import Path

import pyarrow.parquet as pq

from actstore.store.exports.columns import Column, Piece, Shard, arrow_schema, arrow_table

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class ParquetWriter:
    """`part-NNNNN.parquet`: one row group per block; activations uncompressed (they compress ~5%) and without
    statistics, the rest zstd with statistics (a `tok` or `feature` filter skips row groups)."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.schema = directory, arrow_schema(columns, metadata)
        self.compression = {c.name: "none" if c.name == "act" else "zstd" for c in columns}
        self.statistics = [c.name for c in columns if c.name != "act"]  # min/max of dense values prune nothing
        self.writer: pq.ParquetWriter | None = None
        self.name = ""

    def open_shard(self, index: int, rows: int | None) -> None:
        self.name = f"part-{index:05d}.parquet"
        self.writer = pq.ParquetWriter(
            self.dir / self.name,
            self.schema,
            compression=self.compression,
            use_dictionary=["split"],
            write_statistics=self.statistics,
        )

    def write(self, block: Piece, offset: int) -> None:
        assert self.writer is not None
        table = arrow_table(block, self.schema)
        self.writer.write_table(table, row_group_size=table.num_rows)

    def close_shard(self) -> list[str]:
        assert self.writer is not None
        self.writer.close()
        self.writer = None
        return [self.name]

    def finish(self, shards: list[Shard]) -> list[Shard]:
        return shards
