"""Local files of the store written exactly once: atomic files, fsync, manifests written last, and per-object locks.

Every object directory (`corpora/<id>`, `activations/<id>`, ...) is complete exactly when its manifest
exists. Writers publish files by write-to-temp + fsync + rename, so a reader or a resumed writer never sees a
half-written file under its final name.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actstore.schemas.errors import UserError
from actstore.schemas.manifest import MANIFEST_NAME, Manifest

TMP_MARK = ".tmp-"
LOCK_NAME = ".lock"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old content or all of the new, never a part."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    """JSON (indented, sorted keys) published atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Publish the manifest: the last write of an object, after which it is complete and readable."""
    atomic_write_json(directory / MANIFEST_NAME, manifest.model_dump(mode="json"))


def read_manifest(directory: Path) -> Manifest | None:
    """The object's manifest, or None while the object is incomplete (or absent)."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        return None
    return Manifest.model_validate_json(path.read_text())


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of writes killed before their rename (ours and zarr's `.partial` files)."""
    removed = 0
    for path in directory.rglob("*"):
        if path.is_file() and (TMP_MARK in path.name or path.name.endswith(".partial")):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Build an object in a sibling temp directory and rename it into place only if the block succeeds.

    Used for objects that are cheap to rebuild (token tables): a killed run leaves only a temp directory,
    which the next run removes. If another run published the same id first, ours is discarded: same id,
    same content.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}{TMP_MARK}*"):
        try:
            with object_lock(stale, wait=False):
                shutil.rmtree(stale, ignore_errors=True)
        except UserError:
            continue  # a live run is building it
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with object_lock(tmp, wait=False):
            yield tmp
            (tmp / LOCK_NAME).unlink()
            if read_manifest(final) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                fsync_path(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def object_lock(directory: Path, wait: bool = False) -> Iterator[None]:
    """An exclusive lock on an object directory, released by the OS even when the holder is SIGKILLed.

    Two runs of the same config would write the same chunks; the second one is refused instead.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"{directory.name} is being written by {holder}: wait for it to finish, "
                "then re-run to resume or read it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def explain_os_error(exc: OSError, what: Path) -> UserError:
    """Turn disk-full / permission / not-a-directory errors into a one-line UserError naming the path."""
    if exc.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {what}: free space or use another --store, then re-run to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {what}: permission denied or read-only; choose a writable --store")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"cannot create the store at {what}: a file is in the way; choose a directory for --store")
    return UserError(f"cannot write {what}: {exc.strerror or exc}; check the --store path")
