"""Ingest: corpus source -> tokenized, packed token table (`store/corpora/<corpus_id>/part-*.parquet`)."""

import time
from collections.abc import Iterator
from typing import Any

import polars as pl

from actstore.flows.runtime import flow, task
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.manifest import Manifest
from actstore.store.root import Store
from actstore.store.sources import iter_documents
from actstore.store.tokens import scan_tokens, write_token_table
from actstore.transforms.models import load_tokenizer
from actstore.transforms.packing import pack_documents


def flat_counts(counts: dict[str, Any]) -> dict[str, int]:
    """`{"tokens_by_split": {"train": 9}}` -> `{"tokens_by_split.train": 9}`: manifests keep flat int counts."""
    flat: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": int(v) for k, v in value.items()})
        else:
            flat[key] = int(value)
    return flat


def publish_corpus(
    store_root: str, corpus_id: str, identity: dict[str, Any], batches: Iterator[Any], extra: dict[str, Any]
) -> Manifest:
    """Write a token table from record batches and publish it as the corpus `corpus_id`, unless it exists."""
    corpus = Store(store_root).object("corpus", corpus_id)
    existing = corpus.published()
    if existing is not None:
        return existing
    start = time.perf_counter()
    with corpus.publish(identity) as pub:
        pub.counts = flat_counts(write_token_table(pub.directory, batches))
        pub.counts["max_token_id"] = int(scan_tokens(pub.directory).select(pl.col("token_id").max()).collect().item())
        pub.timings["seconds"] = round(time.perf_counter() - start, 3)
        pub.extra = extra
    return pub.manifest


@task(name="ingest-corpus")
def ingest_corpus(store_root: str, config: CorpusConfig) -> Manifest:
    """Tokenize and pack the corpus into a token table, published atomically with its manifest."""
    existing = Store(store_root).published("corpus", config.corpus_id())
    if existing is not None:
        return existing
    tokenizer = load_tokenizer(config.tokenizer)
    extra = {"ctx_len": config.ctx_len, "bos_token_id": tokenizer.bos_token_id, "vocab_size": len(tokenizer)}
    batches = pack_documents(iter_documents(config), tokenizer, config)
    return publish_corpus(store_root, config.corpus_id(), config.corpus_identity(), batches, extra)


@flow(name="ingest", log_prints=True)
def ingest(store_root: str, config: CorpusConfig) -> Manifest:
    """Corpus source -> token table; a finished corpus with the same config is reused, not rebuilt."""
    return ingest_corpus(store_root, config)
