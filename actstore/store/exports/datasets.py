"""The Hugging Face `datasets` format: Arrow files staged and written by `Dataset.save_to_disk`."""

import shutil
from pathlib import Path

import pyarrow as pa

from actstore.store.exports.columns import Column, Piece, Shard, arrow_schema, arrow_table
from actstore.store.exports.verify import arrow_stream_rows

FORMATS: tuple[str, ...] = ("parquet", "datasets", "npy", "safetensors")


class DatasetsWriter:
    """Arrow IPC files staged under `_staging/`, then `Dataset.save_to_disk` writes the final `data-*.arrow`."""

    def __init__(self, directory: Path, columns: list[Column], metadata: dict[str, str]) -> None:
        self.dir, self.schema = directory, arrow_schema(columns, metadata)
        self.staging = directory / "_staging"
        self.staging.mkdir()
        self.sink: pa.NativeFile | None = None
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None

    def open_shard(self, index: int, rows: int | None) -> None:
        self.sink = pa.OSFile(str(self.staging / f"part-{index:05d}.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, block: Piece, offset: int) -> None:
        assert self.writer is not None
        self.writer.write_table(arrow_table(block, self.schema))

    def close_shard(self) -> list[str]:
        assert self.writer is not None and self.sink is not None
        self.writer.close()
        self.sink.close()
        return []

    def finish(self, shards: list[Shard]) -> list[Shard]:
        import datasets  # imported here: it is slow to import and only this format needs it

        staged = sorted(self.staging.glob("part-*.arrow"))
        dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in staged])
        dataset.save_to_disk(str(self.dir), num_shards=len(staged))
        del dataset
        shutil.rmtree(self.staging)
        found, start = [], 0
        for path in sorted(self.dir.glob("data-*.arrow")):
            rows = arrow_stream_rows(path)
            found.append(Shard(start, start + rows, [path.name]))
            start += rows
        return found
