"""Every corpus source kind yields the documents written to it, in a deterministic order, and every input the
user can get wrong fails with a one-line UserError naming it."""

import ast
import gzip
import json
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.store.sources import iter_documents


def docs_of(**fields: object) -> list[str]:
    return list(iter_documents(CorpusConfig(**fields)))


def assert_one_line_error(excinfo: pytest.ExceptionInfo[UserError], *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# --- text -------------------------------------------------------------------------------------------------------


def test_text_directory_walked_sorted_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inner.txt").write_text("inner file\n")
    (tmp_path / "a.txt").write_text("first file\nsecond line\n")
    (tmp_path / "c.md").write_text("markdown too")
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("never read either")

    # os.walk lists a folder's files before descending into its subfolders.
    assert docs_of(source="text", paths=(str(tmp_path),)) == [
        "first file\nsecond line\n",
        "markdown too",
        "inner file\n",
    ]


def test_text_paragraphs_glob_and_max_docs(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("para one\nstill one\n\n  \npara two\n\n\n")
    (tmp_path / "two.txt").write_text("para three")
    (tmp_path / "skip.md").write_text("not matched by the glob")
    pattern = str(tmp_path / "*.txt")

    assert docs_of(source="text", paths=(pattern,), split_paragraphs=True) == [
        "para one\nstill one",
        "para two",
        "para three",
    ]
    assert docs_of(source="text", paths=(pattern,), split_paragraphs=True, max_docs=2) == [
        "para one\nstill one",
        "para two",
    ]


def test_text_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as excinfo:
        docs_of(source="text", paths=(str(missing),))
    assert_one_line_error(excinfo, str(missing), "--path")

    with pytest.raises(UserError) as excinfo:
        docs_of(source="text", paths=(str(tmp_path / "*.none"),))
    assert_one_line_error(excinfo, "*.none", "matched no files")

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(tmp_path / "empty_dir"),))
    assert_one_line_error(excinfo, "empty_dir", ".jsonl")

    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(UserError) as excinfo:
        docs_of(source="text", paths=(str(binary),))
    assert_one_line_error(excinfo, str(binary), "UTF-8")


# --- jsonl ------------------------------------------------------------------------------------------------------


def test_jsonl_plain_and_gzip_round_trip(tmp_path: Path) -> None:
    texts = ["alpha ü", "beta\nwith newline", "", 'gamma "quoted"']
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n")  # a trailing blank line is no record
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join([*lines[2:], json.dumps({"id": 9, "body": None})]) + "\n")
    (tmp_path / "notes.txt").write_text("not a jsonl file")

    got = docs_of(source="jsonl", paths=(str(tmp_path),), text_field="body")
    assert got == [t for t in texts if t]  # the empty string and the null are skipped


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(bad_json),))
    assert_one_line_error(excinfo, f"{bad_json}:2", "invalid JSON")

    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"content": "x", "id": 1}\n')
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(no_field),))
    assert_one_line_error(excinfo, f"{no_field}:2", "'text'", "content, id", "--text-field")

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 100)[:40])
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(truncated),))
    assert_one_line_error(excinfo, str(truncated), "EOFError")

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(latin1),))
    assert_one_line_error(excinfo, str(latin1), "UTF-8")

    not_text = tmp_path / "number.jsonl"
    not_text.write_text('{"text": 42}\n')
    with pytest.raises(UserError) as excinfo:
        docs_of(source="jsonl", paths=(str(not_text),))
    assert_one_line_error(excinfo, f"{not_text}:1", "int", "--text-field")


# --- parquet ----------------------------------------------------------------------------------------------------


def test_parquet_round_trip_across_batches(tmp_path: Path) -> None:
    texts = [f"document number {i}" for i in range(2500)]  # more rows than one read batch
    texts[7] = None  # type: ignore[call-overload]
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), tmp_path / "a.parquet", row_group_size=700)
    pq.write_table(pa.table({"text": ["last one"]}), tmp_path / "b.parquet")

    got = docs_of(source="parquet", paths=(str(tmp_path),))
    assert got == [t for t in texts if t] + ["last one"]


def test_parquet_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), path)
    with pytest.raises(UserError) as excinfo:
        docs_of(source="parquet", paths=(str(path),))
    assert_one_line_error(excinfo, str(path), "'text'", "id, content", "--text-field")

    with pytest.raises(UserError) as excinfo:
        docs_of(source="parquet", paths=(str(path),), text_field="id")
    assert_one_line_error(excinfo, "'id'", "int64", "--text-field")

    fake = tmp_path / "fake.parquet"
    fake.write_text("plain text")
    with pytest.raises(UserError) as excinfo:
        docs_of(source="parquet", paths=(str(fake),))
    assert_one_line_error(excinfo, str(fake), "not a Parquet file")


# --- Hugging Face datasets ----------------------------------------------------------------------------------------


def test_hf_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    texts = ["first row", "", "third row"]
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "flat"))
    assert docs_of(source="hf", hf_name=str(tmp_path / "flat")) == ["first row", "third row"]

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["train row"]}),
            "validation": datasets.Dataset.from_dict({"body": ["validation row"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    got = docs_of(source="hf", hf_name=str(tmp_path / "dict"), hf_split="validation", text_field="body")
    assert got == ["validation row"]

    with pytest.raises(UserError) as excinfo:
        docs_of(source="hf", hf_name=str(tmp_path / "dict"), hf_split="test", text_field="body")
    assert_one_line_error(excinfo, "'test'", "train, validation", "--hf-split")

    with pytest.raises(UserError) as excinfo:
        docs_of(source="hf", hf_name=str(tmp_path / "flat"), text_field="content")
    assert_one_line_error(excinfo, "'content'", "text, n", "--text-field")


def test_hf_local_path_streamed_by_load_dataset(tmp_path: Path) -> None:
    """A folder of data files goes through `load_dataset(..., streaming=True)`, the same call as a hub id."""
    lines = [json.dumps({"text": f"streamed {i}"}) for i in range(5)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert docs_of(source="hf", hf_name=str(tmp_path), max_docs=3) == ["streamed 0", "streamed 1", "streamed 2"]


def test_hf_unreachable_hub_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cannot be reached here; offline mode gives the same failure without ~25 s of retries."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as excinfo:
        docs_of(source="hf", hf_name="NeelNanda/pile-10k")
    assert_one_line_error(excinfo, "'NeelNanda/pile-10k'", "network", "save_to_disk")


# --- pydocs -----------------------------------------------------------------------------------------------------


DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def test_pydocs_first_documents_match_ast_of_first_stdlib_files() -> None:
    """The first docstrings come from the stdlib's top-level files in name order, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    expected: list[str] = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_bytes())
        nodes = [n for n in ast.walk(tree) if isinstance(n, DOCUMENTED)]
        found = sorted((getattr(n, "lineno", 0), ast.get_docstring(n) or "") for n in nodes)
        expected.extend(text for _, text in found if len(text) >= 40)
        if len(expected) >= 60:
            break
    assert docs_of(source="pydocs", max_docs=60) == expected[:60]


def test_pydocs_whole_corpus_is_large_deterministic_and_imports_nothing() -> None:
    before = set(sys.modules)
    docs = docs_of(source="pydocs")
    assert sum(map(len, docs)) > 1_000_000
    assert min(map(len, docs)) >= 40
    assert not {"antigravity", "this", "idlelib", "turtledemo"} & (set(sys.modules) - before)
    assert docs_of(source="pydocs", max_docs=200) == docs[:200]

    # Docstrings found only in skipped folders (idlelib/__init__.py, test/support/__init__.py).
    for skipped in ("The idlelib package implements the Idle application", "Assert that the __all__ variable"):
        assert not any(doc.startswith(skipped) for doc in docs)
