"""A synthetic store for the shard reader's tests and benchmark: a token table and a finished harvest of random
activations, written through the store's own writers (token table parts, HarvestArrays, manifests).

No model runs, so the store can be as large as a benchmark needs; documents have random lengths and run across
window edges like packed corpora, and each document is `train` or `holdout` at random.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from actstore.schemas.arrays import ActivationAttrs, LogicalDtype
from actstore.schemas.manifest import Manifest
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA
from actstore.store.activations import ArraySpec, HarvestArrays
from actstore.store.files import write_manifest
from actstore.store.objects import code_version, utc_now
from actstore.store.root import Store
from actstore.store.tokens import write_token_table


class SyntheticStore(NamedTuple):
    """What `write_synthetic_store` made."""

    corpus_id: str
    harvest_ids: list[str]
    """One harvest per entry of `harvests`, all over the same tokens."""
    doc: np.ndarray
    """Document of every token (`tok` order), the same as the token table's `doc` column."""


def write_synthetic_store(
    root: Path,
    n_seqs: int,
    ctx_len: int,
    chunk_tokens: int,
    harvests: list[dict[str, tuple[int, LogicalDtype]]],
    seed: int = 0,
    doc_tokens: tuple[int, int] = (20, 200),
    holdout_fraction: float = 0.2,
) -> SyntheticStore:
    """A corpus of `n_seqs` windows and, per entry of `harvests` (`{site: (d, dtype)}`), a harvest of it."""
    rng = np.random.default_rng(seed)
    n = n_seqs * ctx_len
    lengths = rng.integers(*doc_tokens, size=n // doc_tokens[0] + 1)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)[:n]
    holdout = rng.random(len(lengths)) < holdout_fraction
    corpus_id = f"corpus-synthetic-{seed}-{n}"
    store = Store(root)
    corpus_dir = store.corpus_dir(corpus_id)
    counts = write_token_table(corpus_dir, _token_batches(doc, holdout, ctx_len, rng))
    write_manifest(
        corpus_dir,
        Manifest(
            kind="corpus",
            id=corpus_id,
            config={"synthetic": seed},
            code_version=code_version(),
            created=utc_now(),
            counts={"n_tokens": counts["n_tokens"], "n_seqs": counts["n_seqs"], "n_docs": counts["n_docs"]},
            extra={"ctx_len": ctx_len},
        ),
    )
    harvest_ids = [
        write_synthetic_harvest(store, corpus_id, f"harvest-synthetic-{seed}-{i}", sites, n, ctx_len, chunk_tokens, rng)
        for i, sites in enumerate(harvests)
    ]
    return SyntheticStore(corpus_id, harvest_ids, doc)


def _token_batches(
    doc: np.ndarray, holdout: np.ndarray, ctx_len: int, rng: np.random.Generator, rows: int = 1 << 20
) -> Iterator[pa.RecordBatch]:
    for start in range(0, len(doc), rows):
        tok = np.arange(start, min(start + rows, len(doc)), dtype=np.int64)
        docs = doc[tok]
        split = pa.DictionaryArray.from_arrays(pa.array(holdout[docs].astype(np.int8)), pa.array(SPLITS))
        columns = [
            tok,
            docs,
            tok // ctx_len,
            (tok % ctx_len).astype(np.int32),
            rng.integers(0, 50_000, len(tok)).astype(np.int32),
        ]
        yield pa.RecordBatch.from_arrays([*map(pa.array, columns), split], schema=TOKEN_SCHEMA)


def write_synthetic_harvest(
    store: Store,
    corpus_id: str,
    harvest_id: str,
    sites: dict[str, tuple[int, LogicalDtype]],
    n: int,
    ctx_len: int,
    chunk_tokens: int,
    rng: np.random.Generator,
) -> str:
    """A finished harvest of the first `n` tokens of a corpus: random normal rows, one array per site."""
    directory = store.harvest_dir(harvest_id)
    specs = [
        ArraySpec(
            ActivationAttrs(
                harvest_id=harvest_id,
                corpus_id=corpus_id,
                site=site,
                module=site,
                model="synthetic",
                logical_dtype=dtype,
                n_tokens=n,
                d=d,
                ctx_len=ctx_len,
                chunk_tokens=chunk_tokens,
            )
        )
        for site, (d, dtype) in sites.items()
    ]
    arrays = HarvestArrays(directory, specs, n, chunk_tokens)
    for chunk in range(arrays.n_chunks):
        rows = arrays.chunk_rows(chunk)
        arrays.write_chunk(
            chunk,
            {
                site: torch.from_numpy(rng.standard_normal((rows.stop - rows.start, d), dtype=np.float32))
                for site, (d, _) in sites.items()
            },
        )
    write_manifest(
        directory,
        Manifest(
            kind="harvest",
            id=harvest_id,
            config={"synthetic": harvest_id},
            code_version=code_version(),
            created=utc_now(),
            counts={"n_tokens": n, "chunk_tokens": chunk_tokens, "n_chunks": arrays.n_chunks},
            extra={
                "arrays": {site: {"d": d, "dtype": dtype, "module": site} for site, (d, dtype) in sites.items()},
                "corpus_id": corpus_id,
                "ctx_len": ctx_len,
            },
        ),
    )
    return harvest_id
