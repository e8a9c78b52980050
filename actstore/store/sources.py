"""Documents from a corpus source, one string each, in an order that is the same on every run.

The order matters: a document's index in this order is its `doc` id in the token table, and windows are packed
in this order, so two ingests of the same config must see the same sequence. Directories are walked sorted,
globs are sorted, and sources that stream (Parquet, Hugging Face) are read in file/row order.
"""

import ast
import glob
import gzip
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError

PARQUET_BATCH_ROWS = 1024
"""Rows per Parquet read: bounds memory for huge files while keeping per-batch overhead small."""

PYDOCS_MIN_CHARS = 40
"""Docstrings shorter than this (`Return self.`) add tokens but no prose."""

PYDOCS_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"})
"""Stdlib folders that hold third-party code, test suites, the IDE or test data (Python 2 files in lib2to3)."""

_SUFFIXES = {"text": None, "jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}
"""File names taken when a directory is walked; `None` takes every non-hidden file."""

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield the corpus' non-empty documents in a deterministic order, at most `cfg.max_docs` of them."""
    readers = {"text": _text, "jsonl": _jsonl, "parquet": _parquet, "hf": _hf, "pydocs": _pydocs}
    docs = (doc for doc in readers[cfg.source](cfg) if doc.strip())
    return itertools.islice(docs, cfg.max_docs)


def source_files(cfg: CorpusConfig) -> list[Path]:
    """The files a file-based source reads, in reading order (globs and directories expanded, sorted)."""
    suffixes = _SUFFIXES[cfg.source]
    files: list[Path] = []
    for pattern in cfg.paths:
        if any(char in pattern for char in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise UserError(f"corpus path glob '{pattern}' matched no files: check the pattern passed to --path")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(pattern).expanduser()]
        for path in paths:
            if path.is_dir():
                found = _walk(path, suffixes)
                if not found:
                    wanted = "files" if suffixes is None else " / ".join(suffixes) + " files"
                    raise UserError(f"corpus directory '{path}' holds no {wanted}: pass a --path that does")
                files.extend(found)
            elif path.is_file():
                files.append(path)
            else:
                raise UserError(f"corpus path '{path}' does not exist: check --path")
    return files


def _walk(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under `root`, sorted, skipping hidden files and folders (`.git`, editor swap files)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and (suffixes is None or name.endswith(suffixes)):
                found.append(Path(dirpath) / name)
    return found


def _text(cfg: CorpusConfig) -> Iterator[str]:
    for path in source_files(cfg):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"corpus file '{path}' is not UTF-8 text (byte {err.start}): convert it or leave it out of --path"
            ) from err
        if cfg.split_paragraphs:
            yield from (p.strip() for p in _PARAGRAPH_BREAK.split(text))
        else:
            yield text


def _jsonl(cfg: CorpusConfig) -> Iterator[str]:
    for path in source_files(cfg):
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        yield _json_text(line, f"{path}:{number}", cfg.text_field)
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
            raise UserError(
                f"corpus file '{path}' is not UTF-8 JSON lines ({type(err).__name__}: {_first_line(err)}): "
                "fix or recompress it, or leave it out of --path"
            ) from err


def _json_text(line: str, where: str, field: str) -> str:
    """The text field of one JSON line; `null` counts as an empty document."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg}): each line must be one JSON object") from err
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise UserError(f"{where}: no field '{field}' (found {fields}): pass --text-field NAME")
    return _as_text(record[field], where, field)


def _as_text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field '{field}' holds {type(value).__name__}, not text: pass the --text-field of a string"
        )
    return value


def _parquet(cfg: CorpusConfig) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in source_files(cfg):
        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowInvalid as err:
            raise UserError(f"corpus file '{path}' is not a Parquet file ({err}): check --path") from err
        names = parquet.schema_arrow.names
        if cfg.text_field not in names:
            raise UserError(
                f"{path}: no column '{cfg.text_field}' (columns: {', '.join(names)}): pass --text-field NAME"
            )
        kind = parquet.schema_arrow.field(cfg.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise UserError(f"{path}: column '{cfg.text_field}' is {kind}, not text: pass --text-field NAME")
        with parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[cfg.text_field]):
                yield from (text or "" for text in batch.column(0).to_pylist())


def _hf(cfg: CorpusConfig) -> Iterator[str]:
    name = cfg.hf_name or ""
    rows = _hf_rows(cfg)
    where = f"Hugging Face dataset '{name}'"
    try:
        for number, row in enumerate(rows):
            if cfg.text_field not in row:
                raise UserError(
                    f"{where}: no field '{cfg.text_field}' (fields: {', '.join(row)}): pass --text-field NAME"
                )
            yield _as_text(row[cfg.text_field], f"{where} row {number}", cfg.text_field)
    except OSError as err:  # a stream from the hub dropping mid-way (ConnectionError is an OSError)
        raise UserError(f"{where}: reading failed ({type(err).__name__}: {_first_line(err)}): retry") from err


def _hf_rows(cfg: CorpusConfig) -> Iterable[dict[str, Any]]:
    """Rows of a dataset saved with `save_to_disk`, or streamed by `load_dataset` (hub id or local path)."""
    import datasets

    name = cfg.hf_name or ""
    local = Path(name).expanduser()
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.hf_split not in loaded:
                raise UserError(
                    f"dataset '{name}' has no split '{cfg.hf_split}' (splits: {', '.join(loaded)}): pass --hf-split"
                )
            loaded = loaded[cfg.hf_split]
        return loaded
    try:
        return datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
    # load_dataset raises a dozen unrelated types (ConnectionError, DatasetNotFoundError, ValueError for a bad
    # config or split, hub HTTP errors); all of them mean the same thing to the user.
    except Exception as err:
        raise UserError(
            f"cannot load Hugging Face dataset '{name}' (config {cfg.hf_config}, split {cfg.hf_split}): "
            f"{type(err).__name__}: {_first_line(err)}; check the name and network access, or pass a local "
            "directory saved with Dataset.save_to_disk as --hf-name"
        ) from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _pydocs(cfg: CorpusConfig) -> Iterator[str]:
    """Docstrings of the standard library's `.py` files: real English prose present on every machine.

    Files are parsed with `ast`, never imported (importing `antigravity` opens a browser, `this` prints).
    The result depends only on the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PYDOCS_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield from _docstrings(Path(dirpath) / name)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):  # stray template or data files among the sources
        return
    yield from _docstrings_in(tree)


def _docstrings_in(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and the modules, classes and functions under it, in source order."""
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= PYDOCS_MIN_CHARS:
            yield text
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt):  # definitions only live in statements (also under `if`/`try`)
            yield from _docstrings_in(child)
