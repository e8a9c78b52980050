"""The store root and its layout: where every object lives, and read access to finished ones.

A root is a local directory or an fsspec URL (`s3://bucket/store`, `gs://...`, `memory://...`; `file:///x` is the
local directory `/x`). A remote root is worked through a local cache directory: flows write objects there as on
any local root, each object is uploaded as it is published (`StoredObject.publish`, manifest last), and every
read of an object that is not in the cache downloads it when it is published remotely. See `Store` for reading a
remote store's Parquet tables with polars or pyarrow directly.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import IO, Any, NamedTuple

import polars as pl

from actstore.schemas.attribution import ATTRIBUTION_DIR
from actstore.schemas.errors import NotFoundError, UserError
from actstore.schemas.eval_tables import EVAL_SUMMARY_SCHEMA, TRANSFER_SUMMARY_SCHEMA
from actstore.schemas.manifest import MANIFEST_NAME, Manifest
from actstore.store.activations import ActivationArray, open_activation
from actstore.store.evals import scan_results
from actstore.store.feature_queries import Decode, Encode, FeatureQueries
from actstore.store.files import TMP_MARK, read_manifest
from actstore.store.objects import StoredObject
from actstore.store.remote import RemoteRoot, is_remote, local_path

DEFAULT_ROOT = "./actstore-data"
KIND_DIRS = {
    "corpus": "corpora",
    "harvest": "activations",
    "sae": "saes",
    "eval": "evals",
    "transfer": "transfers",
    "forecast": "forecasts",
    "direction": "directions",
}
KIND_ORDER = [*KIND_DIRS, "features", "attribution"]
CACHE_ENV = "ACTSTORE_CACHE"
DEFAULT_CACHE = "~/.cache/actstore"


def cache_dir(url: str) -> Path:
    """The local working directory of a remote root: `$ACTSTORE_CACHE/<readable slug>-<hash of the URL>`.

    One per URL, shared by every process on the machine, so objects downloaded or written once are reused."""
    base = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", url).strip("-.")[:60] or "store"
    return base / f"{slug}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:10]}"


class Listing(NamedTuple):
    """One object of the store, finished or not."""

    kind: str
    id: str
    complete: bool
    """True when its manifest exists."""
    counts: dict[str, int]
    created: str


class Store:
    """A store root; see DESIGN.md for the layout.

    With a remote root, `root` is the local cache directory, `url` the root's URL and `remote` its `RemoteRoot`;
    with a local root both are None. Every `*_dir` method returns a local directory, downloading the object
    first when it is published remotely and not yet in the cache, so flows read and write local paths alike.

    Reading a remote store without actstore: every object directory holding a `manifest.json` is complete and
    never changes again; its Parquet files are plain Parquet:

        import fsspec, polars as pl, pyarrow.parquet as pq
        fs, root = fsspec.core.url_to_fs("s3://bucket/store")
        tokens = pq.read_table(fs.glob(f"{root}/corpora/<corpus_id>/part-*.parquet"), filesystem=fs)
        features = f"{root}/features/<sae_id>/<harvest_id>"
        summary = pl.read_parquet(fs.open(f"{features}/summary.parquet"))
        top = pq.read_table(fs.glob(f"{features}/by_feature/part-*.parquet"), filesystem=fs,
                            filters=[("feature", "=", 123)])
        # polars' own cloud reader takes s3://, gs:// and az:// URLs (not memory://) without fsspec:
        by_token = pl.scan_parquet("s3://bucket/store/features/<sae_id>/<harvest_id>/by_token/*.parquet")

    Through a Store, `store.open_url(relpath)` opens one such file (e.g. `pl.read_parquet(store.open_url(
    "features/<sae>/<harvest>/summary.parquet"))`) and `store.remote.fs` / `store.remote.path(relpath)` are what
    pyarrow's `filesystem=` and the file paths need."""

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        """`storage_options`: passed to the fsspec filesystem of a remote root (credentials, endpoint)."""
        self.url: str | None = None
        self.remote: RemoteRoot | None = None
        if is_remote(root):
            self.url = str(root)
            self.remote = RemoteRoot(self.url, storage_options)
            self.root = cache_dir(self.url)
        else:
            self.root = local_path(root)

    @property
    def location(self) -> str:
        """The root as the user named it, for messages."""
        return self.url or str(self.root)

    def _relpath(self, kind: str, object_id: str) -> str:
        if kind == "features":
            return f"features/{object_id}"
        if kind == "attribution":
            return f"features/{object_id}/{ATTRIBUTION_DIR}"
        return f"{KIND_DIRS[kind]}/{object_id}"

    def object(self, kind: str, object_id: str) -> StoredObject:
        """One object of the layout: where it lives, and the one way to publish it (`StoredObject.publish`)."""
        relpath = self._relpath(kind, object_id)
        return StoredObject(kind, object_id, self.root / relpath, relpath, self.remote)

    def published(self, kind: str, object_id: str) -> Manifest | None:
        """The manifest of a finished object, or None: what a step checks before making it again."""
        return self.object(kind, object_id).published()

    def object_dir(self, kind: str, object_id: str) -> Path:
        """The object's local directory, downloaded first when only the remote has it published."""
        return self.object(kind, object_id).fetch()

    def corpus_dir(self, corpus_id: str) -> Path:
        return self.object_dir("corpus", corpus_id)

    def harvest_dir(self, harvest_id: str) -> Path:
        return self.object_dir("harvest", harvest_id)

    def sae_dir(self, sae_id: str) -> Path:
        return self.object_dir("sae", sae_id)

    def features_dir(self, sae_id: str, harvest_id: str) -> Path:
        """The feature store of an SAE on a harvest; its attribution (if any) is the `attribution/` inside."""
        directory = self.object_dir("features", f"{sae_id}/{harvest_id}")
        self.object_dir("attribution", f"{sae_id}/{harvest_id}")
        return directory

    def eval_dir(self, eval_id: str) -> Path:
        return self.object_dir("eval", eval_id)

    def direction_dir(self, direction_id: str) -> Path:
        return self.object_dir("direction", direction_id)

    def transfer_dir(self, transfer_id: str) -> Path:
        return self.object_dir("transfer", transfer_id)

    def forecast_dir(self, forecast_id: str) -> Path:
        return self.object_dir("forecast", forecast_id)

    def manifest(self, kind: str, object_id: str) -> Manifest:
        """The manifest of a finished object; a missing or incomplete one is a clear error.

        Of a remote object not in the cache, only the manifest is read: the data comes with its directory."""
        stored = self.object(kind, object_id)
        found = read_manifest(stored.local)
        if found is None and self.remote is not None:
            found = self.remote.manifest(stored.relpath)
        if found is None:
            if stored.local.exists():
                raise NotFoundError(f"{kind} {object_id} is incomplete: re-run the command that makes it to resume")
            known = [entry.id for entry in self.ls() if entry.kind == kind and entry.complete]
            hint = f"known: {', '.join(known[:8])}" if known else f"run `actstore {_MAKER[kind]}` first"
            raise NotFoundError(f"no {kind} {object_id!r} in store {self.location}: {hint}")
        return found

    def tokens(self, corpus_id: str) -> pl.LazyFrame:
        """The token table: tok, doc, seq, pos, token_id, split."""
        self.manifest("corpus", corpus_id)
        return pl.scan_parquet(self.corpus_dir(corpus_id) / "part-*.parquet")

    def activations(self, harvest_id: str, site: str) -> ActivationArray:
        """One site's activations (or `loss`), row = tok; slices like numpy."""
        manifest = self.manifest("harvest", harvest_id)
        arrays = list(manifest.extra.get("arrays", {}))
        return open_activation(self.harvest_dir(harvest_id), site, arrays)

    def features(
        self, sae_id: str, harvest_id: str, decode: Decode | None = None, encode: Encode | None = None
    ) -> FeatureQueries:
        """Queries over an SAE's sparse features on a harvest, joined to that harvest's token table.

        `decode` (token ids -> text) and `encode` (text -> ids) come from the model's tokenizer; the store
        cannot load tokenizers itself, so callers pass them (the CLI does)."""
        harvest = self.manifest("harvest", harvest_id)
        directory = self.object_dir("features", f"{sae_id}/{harvest_id}")
        if read_manifest(directory) is None:
            state = "is incomplete: re-run the encode to resume it" if directory.exists() else "does not exist"
            raise UserError(f"features of {sae_id} on {harvest_id} {state} in store {self.location} (actstore encode)")
        return FeatureQueries(directory, self.tokens(harvest.extra["corpus_id"]), decode, encode)

    def evals(self) -> pl.LazyFrame:
        """One summary row per finished evaluation (ids of the SAE, harvest and site, and every metric)."""
        self._fetch_all("eval")
        return scan_results(self.root / KIND_DIRS["eval"], "summary.parquet", EVAL_SUMMARY_SCHEMA)

    def eval_table(self, eval_id: str, table: str) -> pl.LazyFrame:
        """`summary`, `per_token`, `per_feature` or `density_histogram` of one finished evaluation."""
        return self._result_table("eval", eval_id, table)

    def transfers(self) -> pl.LazyFrame:
        """One row per site of every finished transfer analysis: global mean cosine and distance."""
        self._fetch_all("transfer")
        return scan_results(self.root / KIND_DIRS["transfer"], "summary.parquet", TRANSFER_SUMMARY_SCHEMA)

    def transfer_table(self, transfer_id: str, table: str) -> pl.LazyFrame:
        """`summary`, `per_token`, `per_position`, `histograms`, `sae_transfer` or `feature_transfer`."""
        return self._result_table("transfer", transfer_id, table)

    def forecast_table(self, forecast_id: str, table: str) -> pl.LazyFrame:
        """`runs`, `positions`, `saes`, `fits` or `forecasts` of one finished forecast."""
        return self._result_table("forecast", forecast_id, table)

    def _result_table(self, kind: str, object_id: str, table: str) -> pl.LazyFrame:
        self.manifest(kind, object_id)
        path = self.object_dir(kind, object_id) / f"{table}.parquet"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.parquet"))
            raise UserError(f"{kind} {object_id} has no table {table!r}: choose one of {', '.join(names)}")
        return pl.scan_parquet(path)

    def _fetch_all(self, kind: str) -> None:
        """Download every remotely published object of a kind that the cache lacks."""
        if self.remote is not None:
            for relpath in self.remote.list_published([f"{KIND_DIRS[kind]}/*"]):
                key = self._key(relpath)
                if key is not None:
                    self.object_dir(*key)

    def _patterns(self) -> list[str]:
        """Glob patterns of every object directory of the layout."""
        return [f"{sub}/*" for sub in KIND_DIRS.values()] + ["features/*/*", f"features/*/*/{ATTRIBUTION_DIR}"]

    def _key(self, relpath: str) -> tuple[str, str] | None:
        """(kind, id) of an object's relative path; None for a path outside the layout."""
        parts = relpath.split("/")
        if parts[0] == "features" and len(parts) in (3, 4):
            if len(parts) == 3:
                return "features", f"{parts[1]}/{parts[2]}"
            return ("attribution", f"{parts[1]}/{parts[2]}") if parts[3] == ATTRIBUTION_DIR else None
        kinds = {sub: kind for kind, sub in KIND_DIRS.items()}
        return (kinds[parts[0]], parts[1]) if len(parts) == 2 and parts[0] in kinds else None

    def open_url(self, relpath: str) -> IO[bytes]:
        """One stored file by its path under the root (`corpora/<id>/part-000000.parquet`), read from the remote
        when the root is remote: `pl.read_parquet(store.open_url(...))`, `pq.read_table(store.open_url(...))`."""
        if self.remote is not None:
            return self.remote.open(relpath)
        path = self.root / relpath
        if not path.is_file():
            raise UserError(f"no file {relpath} in store {self.location}: list the object's files with `actstore ls`")
        return path.open("rb")

    def push_published(self) -> list[str]:
        """Upload every finished object of the cache that the remote root lacks; returns their relative paths.

        Each object's manifest goes last, so a push killed midway publishes nothing and the next one completes
        it. A no-op (empty list) for a local root."""
        if self.remote is None:
            return []
        published = set(self.remote.list_published(self._patterns()))
        pushed: list[str] = []
        for entry in self._local_listing():
            relpath = self._relpath(entry.kind, entry.id)
            if entry.complete and relpath not in published:
                self.remote.push(self.root / relpath, relpath)
                pushed.append(relpath)
        return pushed

    def ls(self) -> list[Listing]:
        """Every object of the store, finished or not (temp directories of live ingests excluded); with a remote
        root, the objects in the cache and the ones published remotely."""
        local = self._local_listing()
        if self.remote is None:
            return local
        found = {(entry.kind, entry.id): entry for entry in local}
        wanted: dict[str, tuple[str, str]] = {}
        for relpath in self.remote.list_published(self._patterns()):
            key = self._key(relpath)
            if key is not None and not (key in found and found[key].complete):
                wanted[relpath] = key
        for relpath, manifest in self.remote.manifests(wanted).items():
            found[wanted[relpath]] = Listing(*wanted[relpath], True, manifest.counts, manifest.created)
        return sorted(found.values(), key=lambda entry: (KIND_ORDER.index(entry.kind), entry.id))

    def _local_listing(self) -> list[Listing]:
        """Every object under the local root (the cache of a remote root)."""
        found: list[Listing] = []
        for kind, sub in KIND_DIRS.items():
            base = self.root / sub
            if not base.is_dir():
                continue
            for directory in sorted(base.iterdir()):
                if not directory.is_dir() or TMP_MARK in directory.name:
                    continue
                path = directory / MANIFEST_NAME
                if path.exists():
                    data = json.loads(path.read_text())
                    found.append(Listing(kind, directory.name, True, data.get("counts", {}), data.get("created", "")))
                else:
                    found.append(Listing(kind, directory.name, False, {}, ""))
        for directory in sorted((self.root / "features").glob("*/*")):
            if not directory.is_dir() or TMP_MARK in directory.name:
                continue
            object_id = f"{directory.parent.name}/{directory.name}"
            # an attribution lives in its own sub-directory and may exist without an encode of the same pair
            parts = [
                (kind, path)
                for kind, path in (("features", directory), ("attribution", directory / ATTRIBUTION_DIR))
                if path.is_dir()
            ]
            if not any(p.name != ATTRIBUTION_DIR and TMP_MARK not in p.name for p in directory.iterdir()):
                parts = parts[1:]
            for kind, path in parts:
                manifest = read_manifest(path)
                found.append(
                    Listing(
                        kind,
                        object_id,
                        manifest is not None,
                        manifest.counts if manifest else {},
                        manifest.created if manifest else "",
                    )
                )
        return found


_MAKER = {
    "corpus": "ingest",
    "harvest": "harvest",
    "sae": "train` or `actstore encode --sae PATH",
    "features": "encode",
    "eval": "eval",
    "transfer": "transfer",
    "forecast": "forecast",
    "direction": "direction",
}


def open_store(root: str | Path = DEFAULT_ROOT, storage_options: dict[str, Any] | None = None) -> Store:
    """Open a store root (a directory or an fsspec URL) for reading (it need not exist yet: writers create it)."""
    return Store(root, storage_options)
