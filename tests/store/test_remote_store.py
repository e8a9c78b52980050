"""Store roots in object storage: objects written by the real flows and writers travel through fsspec filesystems
(`memory://`, and a local directory as a `file://` remote) and come back bit-identical to the numpy data they were
made from; a push killed midway publishes nothing; pulls never take unpublished objects; failures are one line."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations

from actstore.flows.synthetic import GROUND_TRUTH, synthetic
from actstore.schemas.errors import UserError
from actstore.schemas.manifest import MANIFEST_NAME, Manifest
from actstore.schemas.synthetic import SYNTHETIC_SITE, SyntheticConfig
from actstore.store.features import FeatureWriter
from actstore.store.files import LOCK_NAME, TMP_MARK, object_lock, staged_directory, write_manifest
from actstore.store.objects import code_version, utc_now
from actstore.store.remote import RemoteRoot, is_remote
from actstore.store.root import CACHE_ENV, Store, cache_dir
from actstore.transforms.synthetic import mixture_parameters, sample_chunk

URL = "memory://actstore-remote/store"
CONFIG = SyntheticConfig(
    kind="gaussian_mixture", n_tokens=2048, d=4, components=2, ctx_len=32, chunk_tokens=512, seed=3
)
SAE_ID = "sae-remote-test-0001"
D_SAE = 8


class FlakyMemory(MemoryFileSystem):
    """An in-memory filesystem (own contents, protocol `flaky`) whose uploads fail after `puts_left` of them, as a
    connection dropped mid-push would."""

    protocol = "flaky"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    puts_left: ClassVar[int | None] = None
    puts: ClassVar[int] = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def put_file(self, lpath: Any, rpath: Any, **kwargs: Any) -> None:
        if FlakyMemory.puts_left is not None:
            if FlakyMemory.puts_left == 0:
                raise ConnectionError("connection reset by peer")
            FlakyMemory.puts_left -= 1
        FlakyMemory.puts += 1
        super().put_file(lpath, rpath, **kwargs)


class DeniedMemory(MemoryFileSystem):
    """An in-memory filesystem (protocol `denied`) that refuses every read and listing, as s3fs does on a bucket
    without access rights (fsspec's generic `walk` would hide a refused listing)."""

    protocol = "denied"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return super()._strip_protocol(str(path).removeprefix("denied://"))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        raise PermissionError(f"Access Denied: {path}")

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(f"Access Denied: {path}")

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        raise PermissionError(f"Access Denied: {path}")


fsspec.register_implementation("flaky", FlakyMemory, clobber=True)
fsspec.register_implementation("denied", DeniedMemory, clobber=True)


def _clear() -> None:
    for cls in (MemoryFileSystem, FlakyMemory):
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
    FlakyMemory.puts_left, FlakyMemory.puts = None, 0


@pytest.fixture(autouse=True)
def empty_filesystems() -> Iterator[None]:
    _clear()
    yield
    _clear()


class Written(NamedTuple):
    """A cache directory holding finished objects, and the data they were made from."""

    cache: Path
    """The local working directory (`Store(URL).root`) the objects were written into."""
    corpus_id: str
    harvest_id: str
    triples: tuple[np.ndarray, np.ndarray, np.ndarray]
    """(feature, tok, value float16) written into the feature store."""
    per_feature: pa.Table
    """The table of the attribution object nested inside the feature store's directory."""


def expected_activations() -> np.ndarray:
    """The synthetic rows as the generator draws them, chunk by chunk, without any store."""
    params = mixture_parameters(CONFIG)
    return np.concatenate(
        [sample_chunk(CONFIG, c, CONFIG.chunk_tokens, params).x for c in range(CONFIG.n_tokens // CONFIG.chunk_tokens)]
    )


def seeded_triples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two distinct features per token with positive float16 values."""
    rng = np.random.default_rng(11)
    n = CONFIG.n_tokens
    features = np.stack([rng.choice(D_SAE, 2, replace=False) for _ in range(n)]).reshape(-1).astype(np.int32)
    toks = np.repeat(np.arange(n, dtype=np.int64), 2)
    values = rng.uniform(0.1, 4.0, 2 * n).astype(np.float16)
    return features, toks, values


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A synthetic corpus + harvest written by the flow into a local directory that the tests use as a remote
    root's cache, a feature store written by `FeatureWriter` and an attribution object nested in it; nothing
    pushed yet (a flow on the remote root itself would upload each object as it publishes it)."""
    store = Store(tmp_path_factory.mktemp("cache") / "store")
    harvest = synthetic(str(store.root), CONFIG, progress=False)
    feature, tok, value = seeded_triples()
    directory = store.root / "features" / SAE_ID / harvest.id
    with FeatureWriter(directory, D_SAE, CONFIG.n_tokens, "float16", top_k=4) as writer:
        for chunk in range(4):
            rows = (tok >= chunk * 512) & (tok < (chunk + 1) * 512)
            writer.add_chunk(chunk, feature[rows], tok[rows], value[rows])
        writer.finish(4)
    write_manifest(directory, _manifest("features", f"{SAE_ID}/{harvest.id}"))
    per_feature = pa.table(
        {
            "feature": pa.array(range(D_SAE), pa.int32()),
            "attribution": pa.array(np.linspace(-1, 1, D_SAE), pa.float64()),
        }
    )
    with staged_directory(directory / "attribution") as tmp:
        pq.write_table(per_feature, tmp / "per_feature.parquet")
        write_manifest(tmp, _manifest("attribution", f"{SAE_ID}/{harvest.id}"))
    return Written(store.root, harvest.extra["corpus_id"], harvest.id, (feature, tok, value), per_feature)


def _manifest(kind: str, object_id: str) -> Manifest:
    return Manifest(
        kind=kind,
        id=object_id,
        config={},
        code_version=code_version(),
        created=utc_now(),
        counts={"n_tokens": CONFIG.n_tokens},
    )


def writer_store(monkeypatch: pytest.MonkeyPatch, written: Written, cache: Path, url: str = URL) -> Store:
    """A Store on `url` whose cache (under `cache`) already holds the written objects."""
    monkeypatch.setenv(CACHE_ENV, str(cache))
    shutil.copytree(written.cache, cache_dir(url))
    return Store(url)


def relpaths(written: Written) -> list[str]:
    features = f"features/{SAE_ID}/{written.harvest_id}"
    return [f"corpora/{written.corpus_id}", f"activations/{written.harvest_id}", features, f"{features}/attribution"]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def object_files(directory: Path) -> list[Path]:
    """The files a push sends for an object: all but lock files and the nested attribution's."""
    return [
        p for p in files_under(directory) if p.name != LOCK_NAME and "attribution" not in p.relative_to(directory).parts
    ]


# --- roots ------------------------------------------------------------------------------------------------------


def test_file_urls_and_paths_are_local_roots(tmp_path: Path) -> None:
    assert is_remote("s3://bucket/store") and is_remote(URL) and is_remote("simplecache::s3://b/x")
    assert not any(is_remote(r) for r in ("/data/store", "./actstore-data", "file:///data/store", tmp_path))
    by_url, by_path = Store(f"file://{tmp_path}/s"), Store(tmp_path / "s")
    assert by_url.root == by_path.root == tmp_path / "s"
    assert by_url.url is None and by_url.remote is None and by_url.push_published() == []
    assert by_url.harvest_dir("h") == tmp_path / "s" / "activations" / "h"


def test_each_url_has_its_own_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    store = Store(URL)
    assert store.url == URL and isinstance(store.remote, RemoteRoot)
    assert store.root.parent == tmp_path and store.root.name.startswith("memory-actstore-remote-store-")
    assert Store(f"{URL}/").root == store.root != Store("memory://actstore-remote/other").root
    assert store.harvest_dir("h") == store.root / "activations" / "h" and not store.root.exists()
    monkeypatch.delenv(CACHE_ENV)
    assert Store(URL).root.parent == Path.home() / ".cache" / "actstore"


# --- round trip -------------------------------------------------------------------------------------------------


def test_objects_pushed_by_one_cache_read_back_bit_identical_from_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, written: Written
) -> None:
    writer = writer_store(monkeypatch, written, tmp_path / "a")
    assert sorted(writer.push_published()) == sorted(relpaths(written))
    assert writer.push_published() == []  # published once; a re-push sends nothing
    fs, base = fsspec.core.url_to_fs(URL)
    remote_files = fs.find(base)
    assert all(LOCK_NAME not in p and TMP_MARK not in p and "/_spill/" not in p for p in remote_files)
    assert sorted(writer.remote.list_published()) == sorted(relpaths(written))

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "b"))
    reader = Store(URL)
    assert reader.root != writer.root
    listing = {(e.kind, e.id): e for e in reader.ls()}
    features_id = f"{SAE_ID}/{written.harvest_id}"
    assert set(listing) == {
        ("corpus", written.corpus_id),
        ("harvest", written.harvest_id),
        ("features", features_id),
        ("attribution", features_id),
    }
    assert all(e.complete for e in listing.values())
    assert listing["harvest", written.harvest_id].counts["n_tokens"] == CONFIG.n_tokens
    assert reader.manifest("harvest", written.harvest_id).extra["corpus_id"] == written.corpus_id
    assert files_under(reader.root) == []  # listing and manifests read no object data

    # dense activations: the generator's float32 rows, bit for bit
    x = reader.activations(written.harvest_id, SYNTHETIC_SITE)[:]
    assert x.dtype == np.float32 and np.array_equal(x.view(np.uint32), expected_activations().view(np.uint32))
    with np.load(reader.harvest_dir(written.harvest_id) / GROUND_TRUTH, allow_pickle=False) as truth:
        params = mixture_parameters(CONFIG)
        assert all(np.array_equal(truth[k], getattr(params, k)) for k in ("weights", "means", "stds"))

    # the token table through the Store, and with pyarrow straight from the filesystem
    tokens = reader.tokens(written.corpus_id).collect().sort("tok")
    assert tokens["tok"].to_list() == list(range(CONFIG.n_tokens))
    parts = fs.glob(f"{base}/corpora/{written.corpus_id}/part-*.parquet")
    table = pq.read_table(parts, filesystem=fs)
    tok = np.sort(table["tok"].to_numpy())
    assert np.array_equal(tok, np.arange(CONFIG.n_tokens))
    assert np.array_equal(table.sort_by("tok")["pos"].to_numpy(), tok % CONFIG.ctx_len)

    # the feature store: sorted as numpy sorts the written triples, and the summary read with polars remotely
    feature, tok, value = written.triples
    order = np.lexsort((tok, -value.astype(np.float32), feature))
    queries = reader.features(SAE_ID, written.harvest_id)
    by_feature = queries.by_feature.collect()
    assert np.array_equal(by_feature["feature"].to_numpy(), feature[order])
    assert np.array_equal(by_feature["tok"].to_numpy(), tok[order])
    assert np.array_equal(by_feature["value"].cast(pl.Float32).to_numpy(), value[order].astype(np.float32))
    assert not (queries.dir / "attribution").exists()  # a nested object comes only when asked for
    with pytest.raises(UserError, match=f"features of sae-nope on {written.harvest_id} does not exist in store {URL}"):
        reader.features("sae-nope", written.harvest_id)
    summary = pl.read_parquet(reader.open_url(f"features/{features_id}/summary.parquet"))
    assert summary["count"].to_list() == np.bincount(feature, minlength=D_SAE).tolist()
    remote_by_token = pq.read_table(
        writer.remote.path(f"features/{features_id}/by_token/part-000000.parquet"), filesystem=writer.remote.fs
    )
    assert np.array_equal(remote_by_token["tok"].to_numpy(), np.sort(tok))

    attribution = reader.features_dir(SAE_ID, written.harvest_id) / "attribution"
    assert pq.read_table(attribution / "per_feature.parquet").equals(written.per_feature)
    assert reader.push_published() == []  # downloaded objects are already published


# --- atomic publish ---------------------------------------------------------------------------------------------


def test_a_push_killed_midway_publishes_nothing_and_a_re_push_completes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, written: Written
) -> None:
    url = "flaky://bucket/store"
    writer = writer_store(monkeypatch, written, tmp_path / "a", url)
    corpus, harvest = relpaths(written)[:2]
    # the corpus goes through, then two files of the harvest, then the connection drops
    FlakyMemory.puts_left = len(object_files(writer.root / corpus)) + 2
    with pytest.raises(UserError, match=r"cannot upload to flaky://bucket/store/activations/.*check the network") as e:
        writer.push_published()
    assert "\n" not in str(e.value)
    fs = FlakyMemory()
    partial = fs.find(f"/bucket/store/{harvest}")
    assert len(partial) == 2 and not any(p.endswith(MANIFEST_NAME) for p in partial)
    assert writer.remote.list_published() == [corpus]

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "b"))
    reader = Store(url)
    assert [(e.kind, e.complete) for e in reader.ls()] == [("corpus", True)]
    with pytest.raises(UserError, match=f"no harvest '{written.harvest_id}' in store {url}"):
        reader.activations(written.harvest_id, SYNTHETIC_SITE)
    assert not reader.harvest_dir(written.harvest_id).exists()  # an unpublished object is never downloaded

    FlakyMemory.puts_left, FlakyMemory.puts = None, 0
    pushed = writer.push_published()
    assert pushed == relpaths(written)[1:]
    # the two files that made it before the drop are not sent again
    assert FlakyMemory.puts == sum(len(object_files(writer.root / r)) for r in pushed) - 2
    x = Store(url).activations(written.harvest_id, SYNTHETIC_SITE)[:]
    assert np.array_equal(x.view(np.uint32), expected_activations().view(np.uint32))


def test_pull_completes_a_partial_local_copy_and_keeps_nested_objects(tmp_path: Path, written: Written) -> None:
    remote = RemoteRoot(f"file://{tmp_path}/remote")  # any fsspec filesystem serves as a remote
    relpath = f"features/{SAE_ID}/{written.harvest_id}"
    source = written.cache / relpath
    remote.push(source, relpath)
    assert remote.list_published() == [relpath]  # the nested attribution was not pushed with it
    assert not (tmp_path / "remote" / relpath / "attribution").exists()

    # into an absent directory: one rename, no temp left behind
    target = tmp_path / "pulled" / relpath
    assert remote.pull(relpath, target)
    assert sorted(p.relative_to(target) for p in files_under(target)) == sorted(
        p.relative_to(source) for p in object_files(source)
    )
    assert [p.name for p in target.parent.iterdir()] == [target.name]

    # into a partial copy holding a nested object: completed in place, the nested object kept
    partial = tmp_path / "partial" / relpath
    shutil.copytree(source / "attribution", partial / "attribution")
    (partial / "summary.parquet").write_bytes(b"torn")
    assert remote.pull(relpath, partial)
    assert (partial / "summary.parquet").read_bytes() == (source / "summary.parquet").read_bytes()
    assert (partial / "attribution" / MANIFEST_NAME).exists() and (partial / MANIFEST_NAME).exists()

    # a live writer's directory is left alone, and an unpublished object is never downloaded
    busy = tmp_path / "busy" / relpath
    with object_lock(busy):
        assert not remote.pull(relpath, busy)
    assert not (busy / MANIFEST_NAME).exists()
    (tmp_path / "remote" / relpath / MANIFEST_NAME).unlink()
    assert not remote.pull(relpath, tmp_path / "fresh" / relpath)
    assert not (tmp_path / "fresh").exists() or files_under(tmp_path / "fresh") == []
    with pytest.raises(UserError, match="not a finished object"):
        remote.push(tmp_path / "fresh", "corpora/x")


# --- errors -----------------------------------------------------------------------------------------------------


def test_failures_are_one_line_errors_naming_the_url_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    missing = next(
        p
        for p, spec in known_implementations.items()
        if p in ("s3", "gs", "az", "oci") and not _importable(spec["class"])
    )
    cases = [
        (lambda: Store("nosuch://x/y"), r"nosuch://x/y: unknown protocol 'nosuch'; use a local path or an fsspec URL"),
        (lambda: Store(f"{missing}://bucket/x"), rf"cannot open store {missing}://bucket/x: .*install"),
        (lambda: Store("denied://bucket/x").ls(), r"cannot list denied://bucket/x: permission denied .*credentials"),
        (lambda: Store(URL).manifest("harvest", "harvest-nope"), rf"no harvest 'harvest-nope' in store {URL}: run"),
        (lambda: Store(URL).features("sae-x", "harvest-y"), rf"no harvest 'harvest-y' in store {URL}"),
        (lambda: Store(tmp_path).open_url("corpora/c/part-000000.parquet"), "no file corpora/c/part-000000.parquet"),
    ]
    for make, needle in cases:
        with pytest.raises(UserError, match=needle) as info:
            make()
        assert "\n" not in str(info.value)


def _importable(class_path: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(class_path.split(".")[0]) is not None
