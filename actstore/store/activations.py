"""Dense activation arrays: a harvest is a Zarr v3 group, one array per site, row = global token index `tok`.

The group's members are `<site>.zarr` and `loss.zarr`, each with dimension names (`tok`, `d`) and attributes
naming the harvest, model, site and dtype, so `xarray.open_zarr(harvest_dir)` is a Dataset with one variable per
site (bf16 sites are their uint16 bits there, `logical_dtype` says so; `Store.activations` gives bf16 back).

Arrays are pre-sized when a harvest starts (resizing rewrites metadata, DESIGN.md), chunked by whole forward
batches and uncompressed. Each batch is written to its own chunk-aligned region, fsynced, and only then marked
done by an atomic marker file; a resumed harvest rewrites every chunk without a marker, so a kill at any
moment ends, after re-running, bit-identical to an uninterrupted run.
"""

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import zarr

from actstore.schemas.arrays import PHYSICAL_DTYPE, ActivationAttrs
from actstore.schemas.errors import UserError
from actstore.schemas.manifest import MANIFEST_NAME
from actstore.store.files import atomic_write_bytes, fsync_path

if TYPE_CHECKING:  # torch is imported where a tensor is met: listing and reading a store need none
    import torch

PROGRESS_DIR = "_progress"
WRITES_LOG = "writes.log"
"""`<chunk> <host> <pid>` per completed chunk write, appended after its done marker: the audit trail that shows
each chunk was written once however many workers and restarts a harvest took."""
SHARD_LOCKS = "_shards"
"""Per-shard lock directories of a scaled-out harvest: two tasks of the same shard never run at once."""
LOSS_SITE = "loss"


class ArraySpec(NamedTuple):
    """One array of a harvest."""

    attrs: ActivationAttrs
    """Its attributes; `attrs.site` names the file `<site>.zarr`."""
    squeeze: bool = False
    """Store as a 1-D array of `n_tokens` (per-token loss) instead of `(n_tokens, d)`."""


def chunk_rows(chunk: int, chunk_tokens: int, n_tokens: int) -> slice:
    """Rows (= toks) of one chunk; the last chunk of an array may be short."""
    start = chunk * chunk_tokens
    return slice(start, min(start + chunk_tokens, n_tokens))


def done_chunks(harvest_dir: Path) -> set[int]:
    """Chunks of a harvest marked done (their data was fsynced before the marker was written)."""
    return {int(p.name[6:14]) for p in (harvest_dir / PROGRESS_DIR).glob("chunk-*.done")}


def writer_identity() -> bytes:
    """What a chunk's done marker holds: the host and process that wrote it, so a scaled-out run can be
    audited chunk by chunk."""
    return f"{socket.gethostname()} {os.getpid()}".encode()


def array_path(harvest_dir: Path, site: str) -> Path:
    if "/" in site or site.startswith("."):
        raise UserError(f"site name {site!r} cannot be a file name: use blocks.L.hook_X or a dotted module path")
    return harvest_dir / f"{site}.zarr"


def to_storable(values: "torch.Tensor | np.ndarray", logical_dtype: str) -> np.ndarray:
    """The physical array for Zarr: bf16 becomes its uint16 bit pattern, others stay as they are."""
    if not isinstance(values, np.ndarray):
        import torch

        values = values.detach().cpu()
        if logical_dtype == "bfloat16":
            return values.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
        return values.to(getattr(torch, logical_dtype)).contiguous().numpy()
    if logical_dtype == "bfloat16":
        raise UserError("bfloat16 values must be passed as torch tensors: numpy has no bfloat16")
    return np.ascontiguousarray(values, dtype=logical_dtype)


GROUP_ATTRS = ("harvest_id", "corpus_id", "model", "n_tokens", "ctx_len", "chunk_tokens")
"""Attributes every array of a harvest shares, which its group carries too."""


def column_dimensions(specs: list[ArraySpec]) -> dict[str, str]:
    """The name of each array's second dimension: `d` when every site has the same width (xarray then aligns
    them), else `d_<width>`, since one dimension name must have one size across a Dataset."""
    widths = {s.attrs.d for s in specs if not s.squeeze}
    return {s.attrs.site: "d" if len(widths) == 1 else f"d_{s.attrs.d}" for s in specs}


def write_group(harvest_dir: Path, specs: list[ArraySpec]) -> None:
    """The harvest directory's Zarr group metadata, written atomically (a torn one would hide every array)."""
    attrs = specs[0].attrs.model_dump(mode="json")
    group = {"zarr_format": 3, "node_type": "group", "attributes": {k: attrs[k] for k in GROUP_ATTRS}}
    harvest_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(harvest_dir / "zarr.json", (json.dumps(group, indent=2, sort_keys=True) + "\n").encode())


def upgrade_harvest(harvest_dir: Path) -> bool:
    """Give a harvest written before harvests were Zarr groups its group metadata and dimension names (metadata
    only: no chunk is touched). Returns False when there was nothing to do."""
    paths = sorted(p for p in harvest_dir.glob("*.zarr") if (p / "zarr.json").is_file())
    specs = []
    for path in paths:
        meta = json.loads((path / "zarr.json").read_text())
        specs.append(ArraySpec(ActivationAttrs.model_validate(meta["attributes"]), squeeze=len(meta["shape"]) == 1))
    if not specs:
        return False
    dims = column_dimensions(specs)
    changed = False
    for path, spec in zip(paths, specs, strict=True):
        meta = json.loads((path / "zarr.json").read_text())
        names = ["tok"] if spec.squeeze else ["tok", dims[spec.attrs.site]]
        if meta.get("dimension_names") != names:
            meta["dimension_names"] = names
            atomic_write_bytes(path / "zarr.json", json.dumps(meta, indent=2).encode())
            changed = True
    if not (harvest_dir / "zarr.json").exists():
        write_group(harvest_dir, specs)
        changed = True
    return changed


class HarvestArrays:
    """The writable arrays of one (possibly incomplete) harvest, with per-chunk done markers."""

    def __init__(
        self, harvest_dir: Path, specs: list[ArraySpec], n_tokens: int, chunk_tokens: int, create: bool = True
    ) -> None:
        """`create=False` opens arrays another process created (shard writers must not race to create them)."""
        self.dir = harvest_dir
        self.create = create
        self.n_tokens = n_tokens
        self.chunk_tokens = chunk_tokens
        self.n_chunks = -(-n_tokens // chunk_tokens)
        self.progress = harvest_dir / PROGRESS_DIR
        self.progress.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, tuple[zarr.Array, ArraySpec]] = {}
        self.dims = column_dimensions(specs)
        if create:
            write_group(harvest_dir, specs)
        for spec in specs:
            self.arrays[spec.attrs.site] = (self._create_or_open(spec), spec)

    def _create_or_open(self, spec: ArraySpec) -> zarr.Array:
        path = array_path(self.dir, spec.attrs.site)
        shape = (self.n_tokens,) if spec.squeeze else (self.n_tokens, spec.attrs.d)
        dtype = PHYSICAL_DTYPE[spec.attrs.logical_dtype]
        attrs = spec.attrs.model_dump(mode="json")
        if (path / "zarr.json").exists():
            arr = zarr.open_array(path, mode="r+")
            if arr.shape != shape or str(arr.dtype) != dtype or dict(arr.attrs) != attrs:
                raise UserError(
                    f"{path} exists with shape {arr.shape} {arr.dtype}, expected {shape} {dtype}: "
                    "the harvest directory was altered; delete it and re-run"
                )
            return arr
        if not self.create:
            raise UserError(
                f"{path} does not exist: the harvest's arrays are created before its shards run; "
                "re-run the pipeline to resume"
            )
        chunks = (self.chunk_tokens,) if spec.squeeze else (self.chunk_tokens, spec.attrs.d)
        return zarr.create_array(
            store=path,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=None,
            fill_value=0,
            attributes=attrs,
            dimension_names=("tok",) if spec.squeeze else ("tok", self.dims[spec.attrs.site]),
        )

    def _marker(self, chunk: int) -> Path:
        return self.progress / f"chunk-{chunk:08d}.done"

    def done_chunks(self) -> set[int]:
        """Chunks whose data is durable on disk."""
        return done_chunks(self.dir)

    def chunk_rows(self, chunk: int) -> slice:
        return chunk_rows(chunk, self.chunk_tokens, self.n_tokens)

    def write_chunk(self, chunk: int, values: Mapping[str, "torch.Tensor | np.ndarray"]) -> int:
        """Write one chunk of every array, make it durable, then mark it done. Returns bytes written."""
        if set(values) != set(self.arrays):
            raise ValueError(f"chunk {chunk} has arrays {sorted(values)}, expected {sorted(self.arrays)}")
        rows = self.chunk_rows(chunk)
        written = 0
        for site, value in values.items():
            arr, spec = self.arrays[site]
            data = to_storable(value, spec.attrs.logical_dtype)
            expected = (rows.stop - rows.start,) + (() if spec.squeeze else (spec.attrs.d,))
            if data.shape != expected:
                raise ValueError(f"chunk {chunk} of {site} has shape {data.shape}, expected {expected}")
            arr[rows] = data
            written += data.nbytes
            chunk_file = array_path(self.dir, site) / "c" / str(chunk)
            if not spec.squeeze:
                chunk_file = chunk_file / "0"
            fsync_path(chunk_file)
            fsync_path(chunk_file.parent)
        atomic_write_bytes(self._marker(chunk), writer_identity())
        with open(self.progress / WRITES_LOG, "ab") as log:  # one short O_APPEND write: lines never interleave
            log.write(b"%d %s\n" % (chunk, writer_identity()))
        return written


class ActivationArray:
    """Read access to one stored array: slices like numpy; bf16 arrays come back as bf16 tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arr = zarr.open_array(path, mode="r")
        self.attrs = ActivationAttrs.model_validate(dict(self._arr.attrs))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._arr.shape)

    @property
    def dtype(self) -> str:
        """The logical dtype (`bfloat16` for arrays stored as uint16 bits)."""
        return self.attrs.logical_dtype

    @property
    def chunk_tokens(self) -> int:
        return self.attrs.chunk_tokens

    @property
    def zarr(self) -> zarr.Array:
        """The underlying Zarr array (physical dtype), for tools that read Zarr directly."""
        return self._arr

    def __len__(self) -> int:
        return self._arr.shape[0]

    def __getitem__(self, key: Any) -> "np.ndarray | torch.Tensor":
        data = self._arr[key]
        if self.attrs.logical_dtype == "bfloat16":
            import torch

            return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
        return data

    def __repr__(self) -> str:
        return f"ActivationArray({self.attrs.site!r}, shape={self.shape}, dtype={self.dtype})"


def open_activation(harvest_dir: Path, site: str, valid_sites: list[str]) -> ActivationArray:
    """Open a finished harvest's array; unknown sites and incomplete harvests are clear errors."""
    if not (harvest_dir / MANIFEST_NAME).exists():
        raise UserError(f"harvest {harvest_dir.name} is incomplete: re-run its harvest command to resume it")
    if site not in valid_sites:
        raise UserError(f"harvest {harvest_dir.name} has no site {site!r}: it holds {', '.join(valid_sites)}")
    return ActivationArray(array_path(harvest_dir, site))


def disk_bytes(path: Path) -> int:
    """Bytes on disk under a directory (for bytes/token figures)."""
    return sum(os.path.getsize(p) for p in path.rglob("*") if p.is_file())
