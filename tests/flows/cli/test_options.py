"""The CLI against the configs it is derived from: every flag has its field's default, bounds and help; every
value out of bounds is one `error: --flag: ...` line with exit 2; options work before or after a sub-query; a
step runs without a Prefect server when none is configured, and Prefect's INFO lines stay off the terminal."""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from actstore.flows.cli import analysis, steps
from actstore.flows.cli.main import COMMANDS, build_parser, main
from actstore.flows.cli.options import ConfigOptions, bounds, field_docs, non_negative_int, positive_int
from tests.helpers import ROOT, stored_data, write_text_corpus
from tests.tiny_models import build_tiny_model


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def declared() -> list[ConfigOptions]:
    return [v for module in (steps, analysis) for v in vars(module).values() if isinstance(v, ConfigOptions)]


def declared_defaults() -> dict[tuple[type[BaseModel], str], Any]:
    """The CLI defaults the commands declare as differing from their fields."""
    return {(o.model, name): default for o in declared() for name, default in o.defaults.items()}


def field_actions() -> list[tuple[str, argparse.Action]]:
    return [
        (name, action)
        for name, parser in command_parsers().items()
        for action in parser._actions
        if hasattr(action, "config_field")
    ]


def test_every_flag_has_its_fields_default_bounds_and_help() -> None:
    defaults = declared_defaults()
    optional = {(o.model, name) for o in declared() for name in o.optional}
    checked = 0
    for command, action in field_actions():
        model, name = action.config_field  # type: ignore[attr-defined]
        info = model.model_fields[name]
        where = f"{command} {action.option_strings[0]} ({model.__name__}.{name})"
        if (model, name) in defaults:
            assert action.default == defaults[model, name], where
        elif info.is_required():
            assert action.required != ((model, name) in optional) and action.default is None, where
        else:
            expected = info.get_default(call_default_factory=True)
            if isinstance(action, argparse._StoreFalseAction):  # a flag that turns a True field off
                assert expected is True and action.default is True, where
            elif isinstance(expected, tuple) and getattr(action, "nargs", None) in (None, "*", "+"):
                assert action.default is None and action.nargs is None, where  # repeatable: absent = field default
            else:
                assert action.default == expected, where
        doc = field_docs(model).get(name)
        assert doc and action.help.startswith(doc), where
        for bound in bounds(info):
            assert bound in action.help, where
        checked += 1
    assert checked > 80  # every step and analysis command exposes its configs


def test_the_declared_cli_defaults_are_the_only_ones() -> None:
    from actstore.schemas.train import TrainConfig

    assert declared_defaults() == {(TrainConfig, "total_tokens"): 2_000_000, (TrainConfig, "warmup_steps"): 100}


def violations(action: argparse.Action) -> list[str]:
    """Texts that break the flag's field: past each bound, and not a number at all."""
    model, name = action.config_field  # type: ignore[attr-defined]
    info = model.model_fields[name]
    is_int = "int" in str(info.annotation) and "float" not in str(info.annotation)
    bad = []
    for item in info.metadata:
        for attr, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
            value = getattr(item, attr, None)
            if value is not None:
                bad.append(str(value + step if is_int else value + step / 2))
    return [*bad, "abc"] if bad else []


def run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", dict(os.environ))  # main sets Prefect's console level for its process
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def test_every_value_out_of_bounds_is_one_line_naming_the_flag() -> None:
    cases = [(command, action, text) for command, action in field_actions() for text in violations(action)]
    cli_only = [
        (command, action, text)
        for command, parser in command_parsers().items()
        for action in parser._actions
        if action.type in (positive_int, non_negative_int) and action.option_strings
        for text in ("-1", "1.5") + (("0",) if action.type is positive_int else ())
    ]
    assert len(cases) > 40 and len(cli_only) > 10
    for command, action, text in cases + cli_only:
        flag = action.option_strings[0]
        code, err = run_main([command, flag, text])
        assert code == 2, (command, flag, text, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), (command, flag, text, err)
        assert "give" in lines[0], lines[0]  # the fix: what to give instead


def test_options_work_before_or_after_a_sub_query() -> None:
    parser = build_parser()
    options = ["--store", "S", "--sae", "sae-x", "--harvest", "h-y", "--limit", "3", "--context", "2", "--json"]
    before = parser.parse_args(["query", *options, "top", "5"])
    after = parser.parse_args(["query", "top", "5", *options])
    split = parser.parse_args(["query", *options[:4], "top", "5", *options[4:]])
    assert vars(before) == vars(after) == vars(split)
    assert (after.store, after.sae, after.limit, after.context, after.json, after.feature) == (
        "S",
        "sae-x",
        3,
        2,
        True,
        5,
    )
    code, err = run_main(["query", "density", "--dead"])
    assert code == 2 and err.strip() == "error: the following arguments are required: --sae, --harvest"


def test_every_command_is_in_the_table_and_takes_store_options() -> None:
    parsers = command_parsers()
    assert set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        flags = {f for a in parser._actions for f in a.option_strings}
        assert {"--verbose", "--json"} <= flags and ("--store" in flags or name == "serve"), name


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("untracked")
    return build_tiny_model("llama", base / "model"), write_text_corpus(base / "docs", 20)


def _ingest(store: Path, corpus: tuple[Path, Path], env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    model, docs = corpus
    argv = ["ingest", "--store", str(store), "--source", "text", "--path", str(docs), "--model", str(model), "--json"]
    return subprocess.run(
        [sys.executable, "-m", "actstore", *argv, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_step_without_a_prefect_server_starts_none_and_stores_the_same(
    tmp_path: Path, corpus_dir: tuple[Path, Path]
) -> None:
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    bare["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    untracked = _ingest(tmp_path / "a", corpus_dir, bare)
    assert untracked.returncode == 0, untracked.stderr
    # the temporary server Prefect would start keeps its database in PREFECT_HOME
    assert (
        "temporary server" not in untracked.stderr.lower() and not (tmp_path / "prefect-home" / "prefect.db").exists()
    )
    tracked = _ingest(tmp_path / "b", corpus_dir, dict(os.environ))  # the session's server records the run
    assert tracked.returncode == 0, tracked.stderr
    assert json.loads(untracked.stdout.splitlines()[-1]) == json.loads(tracked.stdout.splitlines()[-1])
    assert stored_data(tmp_path / "a") == stored_data(tmp_path / "b")


def test_prefect_info_lines_reach_the_terminal_only_with_verbose(tmp_path: Path, corpus_dir: tuple[Path, Path]) -> None:
    quiet = _ingest(tmp_path / "q", corpus_dir, dict(os.environ))
    loud = _ingest(tmp_path / "v", corpus_dir, dict(os.environ), "--verbose")
    assert quiet.returncode == loud.returncode == 0
    assert "| INFO" not in quiet.stderr and "| INFO" in loud.stderr  # e.g. "Finished in state Completed()"
