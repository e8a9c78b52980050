"""One object of a store, and the one way to publish it: located, fetched, locked and published here.

Every step that makes an object (a corpus, a harvest, an SAE, an evaluation, ...) writes it through
`StoredObject.publish`, which keeps the exactly-once rule in one place:

    with store.object("eval", eval_id).publish(config) as pub:     # staged: built in a temp sibling
        write_tables(pub.directory)
        pub.counts["tokens"] = n
    return pub.manifest                                             # ours, or a concurrent run's (same id)

- staged (the default): the object is built in a temp sibling directory and renamed into place with its
  manifest, so a killed run leaves nothing readable under the final name and a re-run starts over;
- in place (`staged=False`): for objects written chunk by chunk and resumed (harvests, feature stores, SAE
  training); the directory is the final one and the manifest, written last, is what makes it complete.

On exit the manifest (kind, id, config, code version, time, counts, timings, extra) is written, and for a
remote root the finished object is uploaded, manifest last. `published()` is the matching read: the finished
object's manifest or None, completing the upload of an object a killed run published only locally.
"""

import contextlib
import datetime as dt
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from actstore.schemas.errors import UserError
from actstore.schemas.manifest import Manifest
from actstore.store.files import explain_os_error, read_manifest, staged_directory, write_manifest
from actstore.store.remote import RemoteRoot


def code_version() -> str:
    """The installed actstore version; it goes into every manifest."""
    try:
        return metadata.version("actstore")
    except metadata.PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def new_manifest(
    kind: str,
    object_id: str,
    config: BaseModel | dict[str, Any],
    counts: dict[str, int] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """A manifest stamped with this code version and the time now."""
    return Manifest(
        kind=kind,
        id=object_id,
        config=config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config),
        code_version=code_version(),
        created=utc_now(),
        counts=counts or {},
        timings=timings or {},
        extra=extra or {},
    )


class Publication:
    """An object being written: where its files go, and what its manifest will say.

    Fill `counts`, `timings` and `extra` inside the `publish` block; `manifest` is set once it is published."""

    def __init__(self, kind: str, object_id: str, config: BaseModel | dict[str, Any], directory: Path) -> None:
        self.kind = kind
        self.id = object_id
        self.config = config
        self.directory = directory
        """Where to write the object's files (a temp sibling of the final directory when staged)."""
        self.counts: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self._manifest: Manifest | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError(f"{self.kind} {self.id} is read before its publish block ended")
        return self._manifest

    def _stamp(self) -> Manifest:
        return new_manifest(self.kind, self.id, self.config, self.counts, self.timings, self.extra)


class StoredObject:
    """One object of a store root: its local directory (the cache of a remote root) and its remote twin."""

    def __init__(self, kind: str, object_id: str, local: Path, relpath: str, remote: RemoteRoot | None) -> None:
        self.kind = kind
        self.id = object_id
        self.local = local
        self.relpath = relpath
        self.remote = remote

    def fetch(self) -> Path:
        """The local directory, downloaded first when only the remote has the object published."""
        if self.remote is not None and read_manifest(self.local) is None:
            self.remote.pull(self.relpath, self.local)
        return self.local

    def published(self) -> Manifest | None:
        """The finished object's manifest, or None while it is absent or incomplete.

        A remote object is read without downloading it; a local one the remote lacks (a run killed between
        publishing and uploading) is uploaded now, so finishing is never skipped by a re-run."""
        local = read_manifest(self.local)
        if self.remote is None:
            return local
        if local is not None:
            self.remote.push(self.local, self.relpath)
            return local
        return self.remote.manifest(self.relpath)

    @contextlib.contextmanager
    def publish(self, config: BaseModel | dict[str, Any], *, staged: bool = True) -> Iterator[Publication]:
        """Write the object in the block, then publish it exactly once (see the module docstring).

        A full disk or an unwritable root while writing becomes a one-line error naming the object."""
        what = f"{self.kind} {self.id}"
        try:
            if staged:
                with staged_directory(self.local) as tmp:
                    publication = Publication(self.kind, self.id, config, tmp)
                    yield publication
                    write_manifest(tmp, publication._stamp())
            else:
                self.local.mkdir(parents=True, exist_ok=True)
                publication = Publication(self.kind, self.id, config, self.local)
                yield publication
                write_manifest(self.local, publication._stamp())
        except OSError as exc:
            raise explain_os_error(exc, self.local) from exc
        manifest = read_manifest(self.local)  # ours, or that of a run of the same id that finished first
        if manifest is None:
            raise UserError(f"{what} was not published: re-run the command")
        if self.remote is not None:
            self.remote.push(self.local, self.relpath)
        publication._manifest = manifest
