"""Tokenize documents and pack them into full windows of `ctx_len` tokens: the rows of the token table.

Documents are concatenated (each followed by its separator token) and cut into windows, so no position is
padding and every token of every window is a real prediction target. Documents run across window edges; when
`add_bos` is set each window starts with BOS, which models trained with a BOS at position 0 need to behave.
"""

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.tables import SPLITS, TOKEN_SCHEMA

TOKENIZE_DOCS = 256
"""Documents per tokenizer call: the fast tokenizer parallelises a batch, one call per document is slow."""

TOKENIZE_CHARS = 1 << 20
"""Characters per tokenizer call at most, so a batch of huge documents stays small in memory."""

_HOLDOUT = SPLITS.index("holdout")
_TRAIN = SPLITS.index("train")


def document_split(text: str, holdout_fraction: float) -> str:
    """`holdout` or `train` for a document, from a hash of its text: the same document lands in the same split
    whatever corpus order, source or machine it comes from."""
    draw = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "holdout" if draw < holdout_fraction else "train"


def pack_documents(
    docs: Iterable[str], tokenizer: Any, cfg: CorpusConfig, batch_windows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Token table rows (TOKEN_SCHEMA) for `docs`, `batch_windows` windows per batch, in `tok` order from 0.

    `tokenizer` is a Hugging Face tokenizer (called on a list of texts). `doc` is a document's index in `docs`;
    the separator token belongs to the document it ends; a window's BOS row belongs to the document of the
    window's first corpus token. Reading stops as soon as `cfg.max_tokens` worth of whole windows are packed.
    """
    if batch_windows < 1:
        raise ValueError(f"batch_windows must be positive, got {batch_windows}")
    max_windows = None if cfg.max_tokens is None else cfg.max_tokens // cfg.ctx_len
    if max_windows == 0:
        raise UserError(
            f"corpus max_tokens={cfg.max_tokens} is less than one window of ctx_len={cfg.ctx_len}: "
            "raise --max-tokens or lower --ctx-len"
        )
    separator = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "none": None}[cfg.separator]
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    body = cfg.ctx_len - (bos is not None)  # corpus tokens per window

    pending = _Pending()
    n_windows = 0
    for ids, doc_ids, splits in _tokenized(docs, tokenizer, separator, cfg.holdout_fraction):
        pending.append(ids, doc_ids, splits)
        while pending.size >= body * batch_windows:
            take = batch_windows if max_windows is None else min(batch_windows, max_windows - n_windows)
            yield _windows(*pending.pop(take * body), first_seq=n_windows, ctx_len=cfg.ctx_len, bos=bos)
            n_windows += take
            if n_windows == max_windows:
                return
    take = pending.size // body
    if max_windows is not None:
        take = min(take, max_windows - n_windows)
    if take:
        yield _windows(*pending.pop(take * body), first_seq=n_windows, ctx_len=cfg.ctx_len, bos=bos)
        n_windows += take
    if n_windows == 0:
        name = cfg.hf_name or ", ".join(cfg.paths) or cfg.source
        raise UserError(
            f"corpus {name} produced {pending.seen} tokens, fewer than one window of ctx_len={cfg.ctx_len}: "
            "add documents or lower --ctx-len"
        )


def _tokenized(
    docs: Iterable[str], tokenizer: Any, separator: int | None, holdout_fraction: float
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(token ids, doc index, split code) per token, separators included, one tuple per tokenizer batch."""
    first_doc = 0
    for texts in _text_batches(docs):
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        lengths = [len(ids) + (separator is not None) for ids in encoded["input_ids"]]
        flat: list[int] = []
        for ids in encoded["input_ids"]:
            flat.extend(ids)
            if separator is not None:
                flat.append(separator)
        codes = [_HOLDOUT if document_split(t, holdout_fraction) == "holdout" else _TRAIN for t in texts]
        doc_index = np.arange(first_doc, first_doc + len(texts), dtype=np.int64)
        yield (
            np.asarray(flat, dtype=np.int32),
            np.repeat(doc_index, lengths),
            np.repeat(np.asarray(codes, dtype=np.int8), lengths),
        )
        first_doc += len(texts)


def _text_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Pending:
    """Tokens tokenized but not yet packed: appended per tokenizer batch, popped per window batch."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0
        self.seen = 0

    def append(self, ids: np.ndarray, docs: np.ndarray, splits: np.ndarray) -> None:
        self.parts.append((ids, docs, splits))
        self.size += len(ids)
        self.seen += len(ids)

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first `n` pending tokens, removed."""
        ids, docs, splits = (np.concatenate(column) for column in zip(*self.parts, strict=True))
        self.parts = [(ids[n:], docs[n:], splits[n:])]
        self.size -= n
        return ids[:n], docs[:n], splits[:n]


def _windows(
    ids: np.ndarray, docs: np.ndarray, splits: np.ndarray, first_seq: int, ctx_len: int, bos: int | None
) -> pa.RecordBatch:
    """Rows for whole windows cut from a run of corpus tokens, a BOS row in front of each when `bos` is set."""
    if bos is not None:
        body = ctx_len - 1
        n = len(ids) // body
        ids = np.concatenate([np.full((n, 1), bos, np.int32), ids.reshape(n, body)], axis=1).ravel()
        docs = np.concatenate([docs.reshape(n, body)[:, :1], docs.reshape(n, body)], axis=1).ravel()
        splits = np.concatenate([splits.reshape(n, body)[:, :1], splits.reshape(n, body)], axis=1).ravel()
    tok = np.arange(first_seq * ctx_len, first_seq * ctx_len + len(ids), dtype=np.int64)
    split = pa.DictionaryArray.from_arrays(pa.array(splits, pa.int8()), pa.array(SPLITS, pa.string()))
    seq = tok // ctx_len
    pos = (tok % ctx_len).astype(np.int32)
    columns = [pa.array(tok), pa.array(docs), pa.array(seq), pa.array(pos), pa.array(ids), split]
    return pa.RecordBatch.from_arrays(columns, schema=TOKEN_SCHEMA)
