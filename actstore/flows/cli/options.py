"""Command-line options derived from the configs: one field, one flag, with its type, bounds, default and help.

A step command declares which fields of which config it exposes (`ConfigOptions`); the flag's type, choices,
bounds and default come from the pydantic field and its help from the field's docstring, so they live in one
place. Every value is checked against its field as it is parsed: `--max-tokens -5` ends in one line,
`error: --max-tokens: -5 is not > 0: give a value > 0`, exit 2, before any work starts. Cross-field rules stay
in the configs' own validators and surface when `build` constructs the config.

Why not a library: tyro, cyclopts, jsonargparse and pydantic-settings' CLI each add 0.1-0.3 s of start-up here
(argparse + pydantic: 0.27-0.30 s; those: 0.35-0.72 s for the same two-field model) and print a bad value as a
boxed multi-line panel, a dotted `--cfg.max_tokens` flag or a traceback, not the one-line, exit-2 contract.
"""

import argparse
import ast
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from actstore.schemas.errors import ConfigError, UserError

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def bounds(info: FieldInfo) -> list[str]:
    """`['> 0', '<= 1']`: the numeric bounds of a field."""
    found = []
    for item in info.metadata:
        if isinstance(
            item,
            annotated_types.Interval
            | annotated_types.Gt
            | annotated_types.Ge
            | annotated_types.Lt
            | annotated_types.Le,
        ):
            for attr, symbol in _BOUNDS.items():
                if getattr(item, attr, None) is not None:
                    found.append(f"{symbol} {getattr(item, attr)}")
    return found


@functools.cache
def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field of a config class (and of its bases), read from the source: the help text."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` -> `int`; other annotations as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _phrase(error: dict[str, Any], constraint: str) -> str:
    """What is wrong with one value and how to fix it, from pydantic's error."""
    value, kind = error.get("input"), error["type"]
    if kind.startswith(("greater_than", "less_than")):
        return f"{value} is not {constraint}: give a value {constraint}"
    if kind in ("int_parsing", "int_from_float"):
        return f"{value!r} is not an integer: give a whole number"
    if kind == "float_parsing":
        return f"{value!r} is not a number: give a number such as 0.5"
    return f"{value!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def checked(annotation: Any, info: FieldInfo | None = None) -> Callable[[str], Any]:
    """An argparse `type=` that converts a flag's text with pydantic against the field's type and bounds."""
    metadata = tuple(info.metadata) if info is not None else ()
    adapter: TypeAdapter[Any] = TypeAdapter(typing.Annotated[annotation, *metadata] if metadata else annotation)
    constraint = " and ".join(bounds(info)) if info else ""

    def convert(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(_phrase(exc.errors()[0], constraint)) from None

    convert.__name__ = getattr(annotation, "__name__", "value")
    return convert


positive_int = checked(int, Field(gt=0))
"""A CLI-only count (rows to print, workers): a whole number > 0."""
non_negative_int = checked(int, Field(ge=0))
"""A CLI-only count that may be 0 (tokens of context)."""


def add_field(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    name: str,
    flag: str | None = None,
    *,
    default: Any = ...,
    negated: str | None = None,
    required: bool | None = None,
) -> argparse.Action:
    """One flag from one config field: its type, choices, bounds and default, its docstring as help.

    `flag`: the flag's name where it is not the field's; `default`: a CLI default that differs from the field's;
    `negated`: a boolean field set False by this flag (`exclude_bos` <- `--keep-bos`). The action records the
    field it stands for (`action.config_field`), so a test can hold every flag against its field."""
    info = model.model_fields[name]
    annotation = _unwrap_optional(info.annotation)
    taken = [a.option_strings for a in getattr(parser, "_actions", ()) if a.dest == name]
    assert not taken, f"{model.__name__}.{name}: a flag {taken} of this command already fills {name!r}"
    if default is ...:
        default = None if info.is_required() else info.get_default(call_default_factory=True)
    limits = bounds(info)
    notes = [" and ".join(limits)] if limits else []
    kwargs: dict[str, Any] = {"dest": name}
    option = "--" + (negated or (flag or name).replace("_", "-"))
    metavar = (flag or name).upper().replace("-", "_")
    if annotation is bool:
        if negated is None and default is True:
            option = "--no-" + (flag or name).replace("_", "-")
        kwargs.update(action="store_false" if (negated or default is True) else "store_true", default=bool(default))
    elif typing.get_origin(annotation) is Literal:
        kwargs.update(choices=list(typing.get_args(annotation)), default=default)
    elif typing.get_origin(annotation) is tuple and typing.get_args(annotation)[-1:] == (Ellipsis,):
        kwargs.update(action="append", type=checked(typing.get_args(annotation)[0]), default=None, metavar=metavar)
        notes.append("repeatable")
    elif typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        kwargs.update(nargs=len(items), type=checked(items[0]), default=default, metavar=metavar)
    else:
        kwargs.update(type=checked(annotation, info), default=default, metavar=metavar)
    if required if required is not None else default is None and info.is_required():
        kwargs["required"] = True
    elif default is not None and annotation is not bool and not isinstance(default, tuple):
        notes.append(f"default {default}")
    kwargs["help"] = field_docs(model).get(name, "") + (f" ({'; '.join(notes)})" if notes else "")
    action = parser.add_argument(option, **kwargs)
    action.config_field = (model, name)  # type: ignore[attr-defined]
    return action


@dataclass(frozen=True)
class ConfigOptions:
    """The flags a command takes from one config class."""

    model: type[BaseModel]
    fields: Sequence[str] | None = None
    """The fields exposed, in this order; None: every field not in `exclude`."""
    exclude: Sequence[str] = ()
    """Fields the command fills itself (ids, nested configs) or does not offer."""
    flags: Mapping[str, str] = field(default_factory=dict)
    """field -> flag name, where the flag is not the field's name (`holdout_fraction` -> `holdout`)."""
    negated: Mapping[str, str] = field(default_factory=dict)
    """Boolean fields set False by a flag of this name (`exclude_bos` -> `--keep-bos`)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """CLI defaults that differ from the field's (the CLI's own choice, e.g. a shorter warmup); listed here so
    the difference is declared, not drifted."""
    required: Sequence[str] = ()
    """Fields the CLI asks for although they have a default."""
    optional: Sequence[str] = ()
    """Required fields the CLI may leave out (the whole config is then absent, e.g. no `--control`)."""

    def names(self) -> list[str]:
        return [n for n in (self.fields or self.model.model_fields) if n not in self.exclude]

    def flag(self, name: str) -> str:
        """The flag of a field, for messages."""
        if name in self.negated:
            return "--" + self.negated[name]
        flag = self.flags.get(name, name).replace("_", "-")
        info = self.model.model_fields[name]
        return f"--no-{flag}" if _unwrap_optional(info.annotation) is bool and info.default is True else f"--{flag}"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(f"{self.model.__name__} (what is stored)")
        for name in self.names():
            add_field(
                group,
                self.model,
                name,
                self.flags.get(name),
                default=self.defaults.get(name, ...),
                negated=self.negated.get(name),
                required=True if name in self.required else False if name in self.optional else None,
            )

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """field -> value of every exposed field the command line (or its CLI default) gives."""
        found: dict[str, Any] = {}
        for name in self.names():
            value = getattr(args, name)
            if value is not None:
                found[name] = tuple(value) if isinstance(value, list) else value
        return found

    def build(self, args: argparse.Namespace, **fixed: Any) -> Any:
        """The config from the parsed flags and the values the command fills in itself."""
        return build(self.model, {**self.values(args), **fixed}, self.flag)


def build(model: type[BaseModel], values: dict[str, Any], flag: Callable[[str], str] | None = None) -> Any:
    """`model(**values)`; a failed check is one ConfigError naming the flag (or field) it came from."""
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, UserError):
            raise cause from None
        name = str(error["loc"][0]) if error["loc"] else ""
        where = flag(name) if flag is not None and name in model.model_fields else name
        raise ConfigError(f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line with exit 2, like every other error."""

    def error(self, message: str) -> typing.NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_shared(parsers: Sequence[argparse.ArgumentParser], options: Sequence[tuple[tuple[str, ...], dict]]) -> None:
    """Options a command and each of its sub-commands accept, so they work before or after the sub-command
    (`actstore query top 5 --store DIR`): the sub-command's copy leaves the value alone unless it is given.
    None is `required` here (argparse would ask for it before the sub-command): check with `require`."""
    first, *rest = parsers
    for flags, kwargs in options:
        kwargs = {k: v for k, v in kwargs.items() if k != "required"}
        first.add_argument(*flags, **kwargs)
        for parser in rest:
            parser.add_argument(*flags, **{**kwargs, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS})


def require(args: argparse.Namespace, *names: str) -> None:
    """A one-line error for a shared option that was not given."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is None]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)}")


def add_sae_on_harvest(parser: argparse.ArgumentParser, harvest_help: str = "harvest id (see `actstore ls`)") -> None:
    """`--sae`, `--harvest`, `--site`: an SAE applied to one site of a harvest (encode, eval, attribute)."""
    parser.add_argument(
        "--sae", required=True, help="SAE id, or checkpoint dir/file (SAELens, sparsify, Gemma Scope) to import"
    )
    parser.add_argument("--harvest", required=True, help=harvest_help)
    parser.add_argument(
        "--site", help="harvest site the SAE reads (default: the SAE's recorded hook, or the only site)"
    )
