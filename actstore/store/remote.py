"""A store root in object storage (any fsspec URL: `s3://`, `gs://`, `az://`, `memory://`, ...).

Flows keep writing to local disk (a cache directory per URL); finished objects move as whole directories:

- `push` uploads every file of a published local object, and its manifest last. Object stores make each
  upload atomic, so a remote object is readable exactly when its manifest exists, as on local disk; a push
  killed midway leaves files without a manifest, which nobody reads and the next push completes.
- `pull` downloads a published object into a temp sibling of its local directory and renames it into place,
  so a local reader never sees part of a download under the object's name. Unpublished objects are never
  downloaded.

Objects nest (an attribution lives inside `features/<sae>/<harvest>/`): a sub-directory holding its own
manifest is a separate object, left out when its parent is pushed or pulled.
"""

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from actstore.schemas.errors import UserError
from actstore.schemas.manifest import MANIFEST_NAME, Manifest
from actstore.store.files import LOCK_NAME, TMP_MARK, explain_os_error, fsync_path, object_lock, read_manifest

LOCAL_PROTOCOLS = ("file", "local")
_AUTH_WORDS = ("credential", "authenticat", "unauthorized", "forbidden", "accessdenied", "expiredtoken")


def is_remote(root: str | Path) -> bool:
    """True for an fsspec URL of anything but the local filesystem (`file://` and `local://` are local paths)."""
    if isinstance(root, Path):
        return False
    protocol, _ = split_protocol(root)
    return protocol is not None and protocol not in LOCAL_PROTOCOLS


def local_path(root: str | Path) -> Path:
    """The local directory a non-remote root names: `file:///x` and `/x` are the same store."""
    if isinstance(root, Path):
        return root.expanduser()
    if split_protocol(root)[0] in LOCAL_PROTOCOLS:
        return Path(LocalFileSystem._strip_protocol(root))
    return Path(root).expanduser()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_auth_error(exc: BaseException) -> bool:
    """Credential failures of cloud SDKs (botocore, google-auth, azure) are not OSErrors; know them by name."""
    names = " ".join(cls.__name__.lower() for cls in type(exc).__mro__) + " " + str(exc).lower()
    return any(word in names for word in _AUTH_WORDS)


@contextlib.contextmanager
def remote_errors(url: str, action: str, local: Path | None = None) -> Iterator[None]:
    """Turn a failed remote operation into a one-line UserError that names the URL and the likely fix.

    `local`: the local directory the operation writes, so a full or unwritable cache disk is reported as a
    local problem rather than as the remote's."""
    try:
        yield
    except UserError:
        raise
    except OSError as exc:
        if local is not None and (
            exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
            or str(exc.filename or "").startswith(str(local.parent))
        ):
            raise explain_os_error(exc, local) from exc
        if isinstance(exc, PermissionError) or _is_auth_error(exc):
            raise UserError(
                f"cannot {action} {url}: permission denied ({_one_line(exc)}); check credentials (e.g. "
                "AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) and the bucket's access rights"
            ) from exc
        if isinstance(exc, FileNotFoundError):
            raise UserError(
                f"cannot {action} {url}: not found ({_one_line(exc)}); check that the bucket exists "
                "and the URL is spelled right"
            ) from exc
        raise UserError(
            f"cannot {action} {url}: {_one_line(exc)}; check the network and that the bucket is "
            "reachable, then re-run (finished objects are kept)"
        ) from exc
    except Exception as exc:
        if _is_auth_error(exc):
            raise UserError(
                f"cannot {action} {url}: {_one_line(exc)}; check credentials (e.g. AWS_PROFILE, "
                "GOOGLE_APPLICATION_CREDENTIALS)"
            ) from exc
        raise


def _skipped(relative: str) -> bool:
    """Lock files and leftovers of killed writes are never part of an object."""
    parts = relative.split("/")
    return parts[-1] == LOCK_NAME or parts[-1].endswith(".partial") or any(TMP_MARK in p for p in parts)


def _outside_nested(files: Iterable[str]) -> list[str]:
    """Relative file names of one object, without those of objects nested in it (sub-directories with their
    own manifest)."""
    files = list(files)
    nested = [f[: -len(MANIFEST_NAME)] for f in files if f.endswith(f"/{MANIFEST_NAME}")]
    return [f for f in files if not any(f.startswith(prefix) for prefix in nested)]


class RemoteRoot:
    """One store root in object storage, addressed by paths relative to it (`activations/<harvest_id>`)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        """`storage_options` go to the fsspec filesystem (e.g. `{"anon": True}` or `{"profile": "lab"}` for
        s3fs); credentials otherwise come from the environment as each fsspec implementation reads them."""
        self.url = url.rstrip("/")
        protocol = split_protocol(self.url)[0]
        try:
            self.fs, base = url_to_fs(self.url, **(storage_options or {}))
        except ImportError as exc:
            raise UserError(
                f"cannot open store {url}: {_one_line(exc)} (pip install the fsspec package for "
                f"{protocol}://, e.g. s3fs, gcsfs or adlfs)"
            ) from exc
        except ValueError as exc:
            if "protocol" not in str(exc).lower():
                raise UserError(f"cannot open store {url}: {_one_line(exc)}; check the URL") from exc
            raise UserError(
                f"cannot open store {url}: unknown protocol {protocol!r}; use a local path or an fsspec "
                "URL such as s3://bucket/path, gs://bucket/path or memory://name"
            ) from exc
        self.base = base.rstrip("/")

    def path(self, relpath: str = "") -> str:
        """The filesystem path of `relpath` (what `self.fs` and pyarrow's `filesystem=self.fs` take)."""
        relpath = relpath.strip("/")
        return f"{self.base}/{relpath}" if relpath else self.base

    def url_of(self, relpath: str = "") -> str:
        """The full URL of `relpath` (what polars' `scan_parquet` takes for s3://, gs:// and az:// stores)."""
        return f"{self.url}/{relpath.strip('/')}" if relpath.strip("/") else self.url

    def open(self, relpath: str, mode: str = "rb") -> IO[bytes]:
        """A file of the remote store, opened through fsspec."""
        with remote_errors(self.url_of(relpath), "open"):
            return self.fs.open(self.path(relpath), mode)

    def has_object(self, relpath: str) -> bool:
        """True when the object at `relpath` is published remotely (its manifest exists)."""
        with remote_errors(self.url_of(relpath), "read"):
            self.fs.invalidate_cache(self.path(relpath))  # another process may have published it since
            return bool(self.fs.exists(self.path(f"{relpath}/{MANIFEST_NAME}")))

    def manifest(self, relpath: str) -> Manifest | None:
        """The remote object's manifest without downloading the object; None while it is unpublished."""
        return self.manifests([relpath]).get(relpath)

    def manifests(self, relpaths: Iterable[str]) -> dict[str, Manifest]:
        """Manifests of several remote objects in one batched read; unpublished ones are absent."""
        strip = self.fs._strip_protocol
        paths = {strip(self.path(f"{r}/{MANIFEST_NAME}")): r for r in relpaths}
        if not paths:
            return {}
        with remote_errors(self.url, "read"):
            data = self.fs.cat(list(paths), on_error="omit")
        return {
            paths[strip(p)]: Manifest.model_validate_json(raw)
            for p, raw in data.items()
            if strip(p) in paths and not isinstance(raw, BaseException)
        }

    def list_published(self, patterns: Iterable[str] | None = None) -> list[str]:
        """Relative paths of every published remote object, sorted.

        `patterns`: glob patterns of object directories (`activations/*`), which list a few prefixes instead of
        every file under the root; None lists every file under the root to find the manifests."""
        prefix = self.path()
        with remote_errors(self.url, "list"):
            self.fs.invalidate_cache(prefix)
            if patterns is None:
                manifests = [p for p in self.fs.find(prefix) if p.rsplit("/", 1)[-1] == MANIFEST_NAME]
            else:
                manifests = [
                    p for pattern in patterns for p in self.fs.glob(f"{prefix}/{pattern.strip('/')}/{MANIFEST_NAME}")
                ]
        found = {p[len(prefix) + 1 : -len(MANIFEST_NAME) - 1] for p in manifests if p.startswith(prefix + "/")}
        return sorted(r for r in found if r and not _skipped(r))

    def _remote_files(self, relpath: str) -> dict[str, int]:
        """Relative name -> size of every file of the remote object (nested objects and temp files left out)."""
        prefix = self.path(relpath)
        self.fs.invalidate_cache(prefix)
        listing = self.fs.find(prefix, detail=True)
        sizes = {
            p[len(prefix) + 1 :]: int(info.get("size") or 0)
            for p, info in listing.items()
            if p.startswith(prefix + "/") and info.get("type", "file") == "file"
        }
        return {f: sizes[f] for f in _outside_nested(sizes) if not _skipped(f)}

    def pull(self, relpath: str, local: Path) -> bool:
        """Download the published object at `relpath` into the local directory `local`.

        False (and nothing downloaded) when the remote has no manifest for it, or when a live local writer holds
        `local`'s lock. A `local` that already exists without a manifest (a partial local write, or only the
        container of a nested object) is completed in place: the downloaded entries replace its same-named ones
        and the manifest comes last. A `local` that is already complete is left as it is."""
        if read_manifest(local) is not None:
            return True
        if not self.has_object(relpath):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{TMP_MARK}pull-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            # locked, so that a concurrent `staged_directory` of the same object leaves this temp alone
            with object_lock(tmp):
                with remote_errors(self.url_of(relpath), "download", local):
                    files = [f for f in self._remote_files(relpath) if f != MANIFEST_NAME] + [MANIFEST_NAME]
                    for name in {str(Path(f).parent) for f in files}:
                        (tmp / name).mkdir(parents=True, exist_ok=True)
                    self.fs.get([self.path(f"{relpath}/{f}") for f in files], [str(tmp / f) for f in files])
                (tmp / LOCK_NAME).unlink()
                return _publish(tmp, local)
        except OSError as exc:
            raise explain_os_error(exc, local) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def push(self, local: Path, relpath: str) -> None:
        """Upload the published local object `local` to `relpath`: every file, then the manifest last.

        A no-op when the remote object is already published (same id, same content). Files a killed push already
        uploaded (same name, same size) are not sent again."""
        if read_manifest(local) is None:
            raise UserError(f"{local} is not a finished object (no {MANIFEST_NAME}): finish it before pushing")
        if self.has_object(relpath):
            return
        files = [
            f
            for f in _outside_nested(
                str(p.relative_to(local).as_posix()) for p in sorted(local.rglob("*")) if p.is_file()
            )
            if not _skipped(f) and f != MANIFEST_NAME
        ]
        with remote_errors(self.url_of(relpath), "upload to"):
            uploaded = self._remote_files(relpath)
            todo = [f for f in files if uploaded.get(f) != (local / f).stat().st_size]
            if isinstance(self.fs, LocalFileSystem):  # object stores have no directories to make
                for parent in {str(Path(f).parent) for f in [*todo, MANIFEST_NAME]}:
                    self.fs.makedirs(self.path(f"{relpath}/{parent}"), exist_ok=True)
            if todo:
                self.fs.put([str(local / f) for f in todo], [self.path(f"{relpath}/{f}") for f in todo])
            self.fs.put_file(str(local / MANIFEST_NAME), self.path(f"{relpath}/{MANIFEST_NAME}"))
            self.fs.invalidate_cache(self.path(relpath))


def _publish(tmp: Path, local: Path) -> bool:
    """Move a complete download into place: one rename when `local` is absent, else entry by entry under
    `local`'s lock with the manifest last. False when a live writer holds `local`."""
    if read_manifest(local) is not None:
        return True  # another pull (or the writer) finished it first: same id, same content
    try:
        os.replace(tmp, local)  # succeeds when `local` is absent (or an empty directory)
        fsync_path(local.parent)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    try:
        with object_lock(local):
            for entry in sorted(tmp.iterdir()):
                if entry.name == MANIFEST_NAME:
                    continue
                target = local / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif entry.is_dir() and (target.exists() or target.is_symlink()):
                    target.unlink()
                os.replace(entry, target)
            os.replace(tmp / MANIFEST_NAME, local / MANIFEST_NAME)
            fsync_path(local)
    except UserError:
        return False  # being written right now; the writer's own result will be complete
    return True
