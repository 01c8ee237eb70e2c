"""The shared argument parser: flags declared once, four sources, one engine.

A component declares its settings once, as a pydantic model (usually a `RuntimeConfig`
subclass) with `Field(description=...)` per field. `DynFlexibleArgumentParser` derives from it
the command-line flags (`model_path` -> `--model-path`, `--model_path` accepted), `--help`, the
YAML keys (the flag names) and the environment variables (`env_var_name`: `DYN_<FIELD>` or the
field's `json_schema_extra={"env": ...}`). Sources, lowest to highest::

    defaults < --config FILE < environment < command line

`--config` takes a flat YAML map of flag names (as above), or a graph file (top-level
`components:`, read and validated by `dynamo_core.graph`, as `dynamo serve` reads it) with
`--component NAME`, which means exactly what `dynamo serve` means by that component::

    defaults < environment (the caller's, under the graph's: Deployment.env < graph env <
               component env < DYN_NAMESPACE from the graph's namespace)
             < components.NAME.args < command line

(the graph's args are the flags serve would pass, so they sit above the environment; the
graph's environment is `ParsedArgs.env_overlay`, which `run_component` puts in `os.environ`).

Choices worth knowing in review:

- Dynamo values are collected as raw text per source, converted by this module only where
  text needs interpreting (bools, lists, JSON dicts, choices, `none`), and validated once by
  pydantic on the merged result. An error therefore names the field *and the source its
  winning value came from*, which is what a user needs to fix it.
- Engine flags are left to the engine's own argparse code (`ServerArgs.add_cli_args`,
  `AsyncEngineArgs.add_cli_args`): its types, choices and actions are reused, never restated.
  To know which engine values the user actually gave, each source is parsed "sparse" (every
  default set to `SUPPRESS`, `required` off); the merged namespace is engine defaults < file <
  env < CLI. A YAML value for an engine flag is turned back into flag tokens by the one
  renderer launchers use (`dynamo_core.graph.render_arg`: the key names the flag, so
  `no-cache: true` gives `--no-cache`) and parsed the same way, so `tp-size: 2` in a file and
  `--tp-size 2` mean exactly the same. A launcher that did not load the engine writes an engine
  flag as one token (`--x`, `--x=VALUE`); `--x=false` for an on/off flag, `--x=3` for a counted
  one and `--x=[...]` for a list are read here as the tokens the flag's action takes.
- A flag both sides declare (`--model-path` in sglang, `--model` in vllm) is owned by the
  engine: it is parsed once by the engine's parser and its value also fills the Dynamo field,
  whose environment variable keeps working (env vars exist for Dynamo fields only).
- The engine parser is built lazily (on `parse`, `check` or `format_help`), so importing a
  component module or constructing its parser never imports an engine. When building it raises
  `ImportError`, `--help` still lists Dynamo's flags plus a line naming the extra to install,
  and unknown flags (and unknown file keys, as `--key=value`) go to `passthrough`.
- The environment is shared by every process of a graph, so a `DYN_*` variable that names no
  field of *this* component is normal (it may be another component's). It is reported only when
  it looks like a misspelling of one of ours (difflib ratio >= 0.85) and is not a runtime-only
  variable (`RUNTIME_ENV_ALLOWLIST`, extendable per parser).
- Errors are collected, not raised one by one: `check()` returns them all, `parse()` raises one
  `ConfigError` (messages joined by "; "), `parse_or_exit()`/`parse_component_args()` write one
  line each to stderr and exit 2. `--help` and `--print-config` write to stdout and exit 0.
- `--print-config` prints `key: value  # source` lines: valid YAML, usable as a `--config`
  file, with secrets masked, readable at 100 columns (a long value goes on indented lines, its
  source on the line above). Dynamo's flags come first, all of them; then the engine's, under
  the engine's own group titles, only those whose value differs from the engine's default
  (an engine has hundreds); `--print-config=all` lists every one.
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import difflib
import enum
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from dynamo_core.errors import ConfigError
from dynamo_core.graph import GraphError, component_env, graph_from_data, render_arg
from dynamo_core.runtime.config import RuntimeConfig, env_var_name

if typing.TYPE_CHECKING:
    from dynamo_core.llm.parsers import ParserSpec

__all__ = [
    "DEFAULT_MIGRATION_LIMIT",
    "RUNTIME_ENV_ALLOWLIST",
    "DynFlexibleArgumentParser",
    "EngineArgsBuilder",
    "ParsedArgs",
    "ParserFlags",
    "Preflight",
    "Resolution",
    "load_yaml_file",
    "migration_limit_field",
    "parse_component_args",
]

#: How often a broken stream may move to another worker, by default: on, as a user expects. The
#: frontend's `--migration-limit` and each worker's (its model card's) default to it; the
#: frontend uses the smaller of the two, so a worker can lower it for its model (0: never).
DEFAULT_MIGRATION_LIMIT = 3


def migration_limit_field() -> Any:
    """A worker's `--migration-limit` flag, declared once for every engine."""
    return Field(
        default=DEFAULT_MIGRATION_LIMIT,
        ge=0,
        description="How often the frontend may move a broken stream of this model to another "
        "worker (the frontend's own --migration-limit may lower it; 0: never).",
    )


class ParserFlags(BaseModel):
    """`--dyn-tool-call-parser` and `--dyn-reasoning-parser`, declared once for every worker.

    A worker's config inherits them and passes `parser_spec()` to `register_model`: the names
    travel in its model card, and the frontend parses that model's output with them
    (`dynamo_core.llm.parsers`). The frontend inherits them too, as overrides of every card
    (``none``: no parsing). A name is checked when the flags are parsed (an unknown one is an
    error that lists the valid names), so a typo stops the process before it serves anything.
    """

    dyn_tool_call_parser: str | None = Field(
        None,
        description="Parser of the model's tool calls (hermes, llama3_json, mistral, pythonic, "
        "deepseek_v3, deepseek_v3_2, qwen3_coder, harmony, kimi_k2, glm45, minimax_m2, granite, "
        "phi4, jamba, nemotron_deci; vLLM's and SGLang's names too); carried in the model card. "
        "On the frontend: overrides every model's ('none': no tool-call parsing).",
        json_schema_extra={"env": "DYN_TOOL_CALL_PARSER"},
    )
    dyn_reasoning_parser: str | None = Field(
        None,
        description="Parser of the model's reasoning (basic, deepseek_r1, qwen3, gpt_oss, "
        "granite, mistral, ...): it becomes reasoning_content; carried in the model card. On "
        "the frontend: overrides every model's ('none': no reasoning parsing).",
        json_schema_extra={"env": "DYN_REASONING_PARSER"},
    )

    @field_validator("dyn_tool_call_parser", "dyn_reasoning_parser")
    @classmethod
    def _known_parser(cls, value: str | None, info: Any) -> str | None:
        from dynamo_core.llm.parsers import get_reasoning_parser, get_tool_call_parser

        if value is None or value.strip().lower() == "none":
            return None if value is None else "none"
        find = (
            get_tool_call_parser
            if info.field_name == "dyn_tool_call_parser"
            else get_reasoning_parser
        )
        try:
            return find(value).name
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _parsers_fit(self) -> ParserFlags:
        try:
            self.parser_spec()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def parser_spec(self) -> ParserSpec:
        """The parsers these flags name (``none`` is no parser)."""
        from dynamo_core.llm.parsers import ParserSpec

        def named(value: str | None) -> str | None:
            return None if value in (None, "none") else value

        return ParserSpec(named(self.dyn_tool_call_parser), named(self.dyn_reasoning_parser))


C = TypeVar("C", bound=BaseModel)

#: Adds the engine's flags to a parser (sglang `ServerArgs.add_cli_args`, vllm
#: `AsyncEngineArgs.add_cli_args`); imports the engine inside, raising ImportError without it.
EngineArgsBuilder = Callable[[argparse.ArgumentParser], object]

#: Checks of the merged values that are cheap and need no engine (e.g. vLLM's --max-model-len
#: against the model's config.json): one message per problem. They run on every parse and on
#: `check()`, so `dynamo serve` and `--dry-run` report them before anything starts.
Preflight = Callable[["ParsedArgs[Any]"], list[str]]

#: `DYN_*` variables read by the runtime itself, not by any component's parser: never
#: reported as unknown, however close they are to a field's variable.
RUNTIME_ENV_ALLOWLIST: frozenset[str] = frozenset(
    {
        "DYN_LOG",
        "DYN_LOG_LEVEL",
        "DYN_LOGGING_JSONL",
        "DYN_LOG_USE_LOCAL_TZ",
        "DYN_SYSTEM_ENABLED",
        "DYN_SYSTEM_HOST",
        "DYN_SYSTEM_PORT",
        "DYN_COMPONENT_NAME",
        "DYN_GRAPH",
    }
)

_ENV_TYPO_CUTOFF = 0.85
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
_DEST_PREFIX = "dyn:"
_RESERVED_FLAGS = frozenset({"-h", "--help", "--config", "--component", "--print-config"})
_RESERVED_FIELDS = frozenset({"help", "config", "component", "print_config"})
_GENERIC_GROUP_TITLES = frozenset({"options", "optional arguments", "positional arguments"})

_Kind = Literal["bool", "list", "dict", "scalar"]


# --------------------------------------------------------------------------------------------
# Field analysis: what each pydantic field means on a command line.


@dataclass(frozen=True)
class _Field:
    name: str
    flag: str  # dashed, without the leading "--"
    env: str
    kind: _Kind
    choices: tuple[Any, ...] | None  # of the value, or of each item for lists
    optional: bool
    text_like: bool  # "none" is a legitimate value, not None
    secret: bool
    required: bool
    default: Any
    group: str
    description: str

    @property
    def dest(self) -> str:
        return _DEST_PREFIX + self.name


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            return _strip_annotated(rest[0]), optional
        return tp, optional
    return tp, False


def _choices_of(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(tp)
    return None


_LIST_ORIGINS = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.Set,
    collections.abc.MutableSequence,
)
_DICT_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _analyse(name: str, info: FieldInfo, group: str) -> _Field:
    tp, optional = _unwrap_optional(info.annotation)
    origin = typing.get_origin(tp)
    kind: _Kind = "scalar"
    choices = _choices_of(tp)
    if tp is bool:
        kind = "bool"
    elif tp in _LIST_ORIGINS or origin in _LIST_ORIGINS:
        kind = "list"
        item_args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        choices = _choices_of(_unwrap_optional(item_args[0])[0]) if item_args else None
    elif (
        tp in _DICT_ORIGINS
        or origin in _DICT_ORIGINS
        or (isinstance(tp, type) and issubclass(tp, BaseModel))
    ):
        kind = "dict"
    secret = isinstance(tp, type) and issubclass(tp, SecretStr)
    required = info.is_required()
    default: Any = None
    if not required:
        try:
            default = info.get_default(call_default_factory=True, validated_data={})
        except Exception:  # a factory needing other fields: shown as "computed"
            default = None
    return _Field(
        name=name,
        flag=name.replace("_", "-"),
        env=env_var_name(name, info.json_schema_extra),
        kind=kind,
        choices=choices,
        optional=optional,
        text_like=tp in (str, Path) or secret,
        secret=secret,
        required=required,
        default=default,
        group=group,
        description=info.description or "",
    )


def _show(value: Any) -> str:
    """A value as a user would type it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _show(value.value)
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(_show(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _help_text(f: _Field) -> str:
    notes: list[str] = []
    if f.required:
        notes.append("required")
    elif f.default is not None and not f.secret and f.default != []:
        notes.append(f"default: {_show(f.default)}")
    notes.append(f"env {f.env}")
    text = f"{f.description} ({'; '.join(notes)})" if f.description else f"({'; '.join(notes)})"
    return text.replace("%", "%%")


# --------------------------------------------------------------------------------------------
# Converting one source's raw value for a Dynamo field.


class _BadValue(Exception):
    """A raw value that cannot mean anything for its field (the message says why)."""


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _BadValue("expected true or false")


def _match_choice(choices: tuple[Any, ...], raw: Any) -> Any:
    for choice in choices:
        if isinstance(choice, enum.Enum):
            if raw is choice or raw == choice.value or str(raw) in (str(choice.value), choice.name):
                return choice
        elif raw == choice or str(raw) == str(choice):
            return choice
    raise _BadValue("choose from " + ", ".join(repr(_show(c)) for c in choices))


def _split_list(raw: str) -> list[Any]:
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _BadValue(f"not a JSON list ({exc.msg})") from None
        if not isinstance(value, list):
            raise _BadValue("not a JSON list")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _coerce(f: _Field, raw: Any, *, textual: bool) -> Any:
    """`raw` (text from the CLI or env, or a YAML value) as a value pydantic can validate."""
    if raw is None:
        return None
    if (
        textual
        and f.optional
        and isinstance(raw, str)
        and (raw == "" or (not f.text_like and raw.lower() in ("none", "null")))
    ):
        return None
    if f.kind == "bool":
        return _to_bool(raw)
    if f.kind == "list":
        if isinstance(raw, str):
            items = _split_list(raw)
        elif isinstance(raw, list | tuple | set | frozenset):
            items = []
            for item in raw:
                items.extend(_split_list(item) if textual and isinstance(item, str) else [item])
        else:
            items = [raw]
        return [_match_choice(f.choices, i) for i in items] if f.choices else items
    if f.kind == "dict" and isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _BadValue(f"expected a JSON object ({exc.msg})") from None
        if not isinstance(value, dict):
            raise _BadValue("expected a JSON object")
        return value
    if f.choices:
        return _match_choice(f.choices, raw)
    return raw


# --------------------------------------------------------------------------------------------
# argparse plumbing.


class _ParseFailure(Exception):
    """argparse rejected its input; the message is argparse's own."""


class _ArgParser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _ParseFailure(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps at spaces only, so flag names and `pip install 'dynamo-x[x]'` stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(
            text,
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )


@contextmanager
def _parsing_mode(parser: argparse.ArgumentParser, *, sparse: bool) -> Iterator[None]:
    """Required-ness is checked after merging (a required flag may come from a file); in sparse
    mode defaults are suppressed, so the namespace holds only what this source gave."""
    saved = [(a, a.default, a.required) for a in parser._actions]
    saved_mutex = [(g, g.required) for g in parser._mutually_exclusive_groups]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            if action.option_strings:
                action.required = False
            if sparse:
                action.default = argparse.SUPPRESS
        for group in parser._mutually_exclusive_groups:
            group.required = False
        if sparse:
            parser._defaults.clear()
        yield
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
        for group, required in saved_mutex:
            group.required = required
        parser._defaults.clear()
        parser._defaults.update(saved_defaults)


def _long_flag(action: argparse.Action) -> str:
    for opt in action.option_strings:
        if opt.startswith("--"):
            return opt
    return action.option_strings[0]


def _is_append(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction | argparse._ExtendAction)


def _engine_tokens(action: argparse.Action, value: Any) -> list[str]:
    """The CLI tokens that give `action` the (YAML or environment) `value`: the one renderer
    every launcher uses (`dynamo_core.graph.render_arg`). A value that cannot be a flag's on/off
    is refused here, with the reason, rather than by argparse."""
    zero_arg = action.nargs == 0 and not isinstance(action, argparse._CountAction)
    if zero_arg and value is not None and not isinstance(value, bool):
        _to_bool(value)  # raises _BadValue: expected true or false
    return render_arg(_long_flag(action), value, {opt: action for opt in action.option_strings})


def _suggest(
    word: str, candidates: Iterable[str], *, prefix: str = "", cutoff: float = 0.6
) -> str | None:
    """The closest candidate, compared without `prefix` (a shared "--" or "DYN_" would make
    every pair look alike)."""
    by_bare = {c.removeprefix(prefix): c for c in candidates}
    matches = difflib.get_close_matches(
        word.removeprefix(prefix), list(by_bare), n=1, cutoff=cutoff
    )
    return by_bare[matches[0]] if matches else None


def _wants_help(argv: list[str]) -> bool:
    end = argv.index("--") if "--" in argv else len(argv)
    return any(a in ("-h", "--help") for a in argv[:end])


# --------------------------------------------------------------------------------------------
# Sources.


@dataclass(frozen=True)
class _Origin:
    source: Literal["default", "file", "env", "cli"]
    label: str  # for --print-config: "file x.yaml", "env DYN_X", "cli", "default"
    where: str  # for errors: "in x.yaml", "in env DYN_X", "on command line"


_DEFAULT = _Origin("default", "default", "in the defaults")
_CLI = _Origin("cli", "cli", "on command line")


def _env_origin(var: str) -> _Origin:
    return _Origin("env", f"env {var}", f"in env {var}")


@dataclass
class _Target:
    field: _Field | None = None
    action: argparse.Action | None = None


@dataclass
class _Built:
    parser: _ArgParser
    fields: dict[str, _Field]
    shared: dict[str, argparse.Action]  # Dynamo field -> the engine action that owns its flag
    engine_actions: list[argparse.Action]
    engine_missing: bool
    keys: dict[str, _Target]
    #: The engine's flags were not asked for (`without_engine()`): they pass through unchecked,
    #: but a close misspelling of one of Dynamo's own flags is still an error.
    dynamo_only: bool = False

    def misspelt_dynamo_flag(self, flag: str) -> str | None:
        """In Dynamo-only mode: the Dynamo flag `flag` looks like a typo of, if any."""
        if not self.dynamo_only:
            return None
        ours = [o for o in self.parser._option_string_actions if o.startswith("--")]
        return _suggest(flag, ours, prefix="--", cutoff=_ENV_TYPO_CUTOFF)

    @property
    def engine_dests(self) -> set[str]:
        return {a.dest for a in self.engine_actions}

    def lookup_key(self, key: str) -> _Target | None:
        bare = key.lstrip("-")
        for candidate in (bare, bare.replace("_", "-"), bare.replace("-", "_")):
            if candidate in self.keys:
                return self.keys[candidate]
        return None

    def normalized(self, token: str) -> list[str]:
        """`--x=VALUE` for an on/off or counted flag, or `--x=[...]` for a list flag, as the
        tokens the flag's action reads (`dynamo_core.graph.render_arg`): what a launcher that
        did not load this parser's engine writes for an engine flag. Anything else unchanged."""
        flag, eq, text = token.partition("=")
        action = self.parser._option_string_actions.get(flag) if eq else None
        if action is None or not flag.startswith("--"):
            return [token]
        many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
        listed = text.lstrip().startswith("[") and (many or _is_append(action))
        if action.nargs != 0 and not listed:
            return [token]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return [token]  # argparse says what is wrong with it
        if action.nargs == 0 and not isinstance(value, bool | int):
            return [token]
        return render_arg(flag, value, {flag: action})

    def canonical_flag(self, token: str) -> str:
        """`--model_path` -> `--model-path` (and the reverse for engines with underscores)."""
        if not token.startswith("--") or token == "--":
            return token
        flag, eq, value = token.partition("=")
        opts = self.parser._option_string_actions
        if flag in opts:
            return token
        for alt in ("--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if alt in opts:
                return alt + eq + value
        return token


@dataclass(frozen=True)
class ParsedArgs(Generic[C]):
    """What a component gets: its typed config, the engine's own args, and provenance."""

    config: C
    engine_args: argparse.Namespace | None
    passthrough: list[str]
    #: field -> "default" | "file" | "env" | "cli"
    sources: dict[str, str]
    #: field -> "default" | "file x.yaml" | "env DYN_X" | "cli"
    origins: dict[str, str]
    #: engine dest -> "default" | "file" | "env" | "cli"
    engine_sources: dict[str, str]
    component: str | None = None
    #: What a graph file (`--config GRAPH --component X`) adds to the process's environment, as
    #: `dynamo serve` would set it (`dynamo_core.graph.component_env`); `run_component` applies it.
    env_overlay: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The command line parsed (what a process repeats to start a copy of itself:
    #: the frontend's `--http-workers`).
    argv: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Resolution(Generic[C]):
    """What `DynFlexibleArgumentParser.resolve` found: the errors, or the parse."""

    errors: list[str]
    parsed: ParsedArgs[C] | None


@dataclass
class _Outcome(Generic[C]):
    errors: list[str]
    parsed: ParsedArgs[C] | None = None
    print_config: str | None = None  # "changed" or "all"


class _Collected:
    """Everything one parse gathered, source by source."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.bad: set[str] = set()  # fields and engine dests whose value was rejected
        self.dyn: dict[str, tuple[Any, Any, _Origin]] = {}  # field -> (value, raw, origin)
        self.engine: dict[str, tuple[Any, _Origin]] = {}  # dest -> (value, origin)
        self.passthrough: list[str] = []

    def set_dyn(self, f: _Field, raw: Any, origin: _Origin, *, textual: bool) -> None:
        try:
            value = _coerce(f, raw, textual=textual)
        except _BadValue as exc:
            shown = "'***'" if f.secret else repr(_show(raw))
            self.errors.append(f"invalid value {shown} for '{f.flag}' {origin.where}: {exc}")
            self.bad.add(f.name)
            return
        self.dyn[f.name] = (value, raw, origin)


# --------------------------------------------------------------------------------------------
# The parser.


class DynFlexibleArgumentParser(Generic[C]):
    """Flags, `--help`, YAML keys and env vars of a component, derived from its config model.

    Construction is cheap and pure; the engine's parser (if any) is built on first use.
    """

    def __init__(
        self,
        config_model: type[C],
        *,
        prog: str | None = None,
        description: str | None = None,
        engine_args: EngineArgsBuilder | None = None,
        engine_name: str | None = None,
        engine_extra: str | None = None,
        group: str | None = None,
        env_allowlist: Iterable[str] = (),
        preflight: Preflight | None = None,
    ) -> None:
        if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
            raise TypeError(f"config_model must be a pydantic model class, got {config_model!r}")
        self.config_model = config_model
        self.prog = prog or Path(sys.argv[0]).name or "dynamo"
        self.description = description
        self.engine_args = engine_args
        self.engine_name = engine_name or ("engine" if engine_args is not None else None)
        self.engine_extra = engine_extra or (
            f"dynamo-{self.engine_name}[{self.engine_name}]" if self.engine_name else None
        )
        self.env_allowlist = RUNTIME_ENV_ALLOWLIST | frozenset(env_allowlist)
        self.preflight = preflight
        own_group = group or self.prog
        runtime_fields = (
            set(RuntimeConfig.model_fields) if issubclass(config_model, RuntimeConfig) else set()
        )
        self._fields: dict[str, _Field] = {}
        for name, info in config_model.model_fields.items():
            if name in _RESERVED_FIELDS:
                raise ConfigError(
                    f"{config_model.__name__}.{name} clashes with the parser's own --{name} flag"
                )
            extra = info.json_schema_extra
            title = "Runtime" if name in runtime_fields else own_group
            if isinstance(extra, dict) and isinstance(extra.get("group"), str):
                title = str(extra["group"])
            self._fields[name] = _analyse(name, info, title)
        self._built: _Built | None = None
        self._dynamo_only = False

    # -- public API -----------------------------------------------------------------------

    def without_engine(self) -> DynFlexibleArgumentParser[C]:
        """This parser in Dynamo-only mode: the engine's parser is never built (so its library
        is never imported), Dynamo's flags are validated as always, and the engine's flags pass
        through unchecked, except a close misspelling of one of Dynamo's (an error, with its
        suggestion). What a launcher plans with: each child parses again, with its engine."""
        if self.engine_args is None:  # every flag is Dynamo's already
            return self
        twin = copy.copy(self)
        twin._built = None
        twin._dynamo_only = True
        return twin

    def format_help(self) -> str:
        return self._build().parser.format_help()

    def option_actions(self) -> dict[str, argparse.Action]:
        """Every option string (Dynamo's and the engine's) and its argparse action: how a
        launcher writes a value as flags exactly as this parser reads them."""
        return dict(self._build().parser._option_string_actions)

    def parse(
        self,
        argv: list[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        module_env: Mapping[str, str] | None = None,
    ) -> ParsedArgs[C]:
        """Merge all sources. Raises `ConfigError`; `--help`/`--print-config` exit 0.

        `module_env`: the component module's `Deployment.env`, the lowest layer of the
        environment a graph file (`--config GRAPH --component X`) gives its processes."""
        outcome = self._outcome(argv, environ, module_env)
        if outcome.errors or outcome.parsed is None:
            raise ConfigError("; ".join(outcome.errors))
        return self._finish(outcome.parsed, outcome.print_config)

    def parse_or_exit(
        self,
        argv: list[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        module_env: Mapping[str, str] | None = None,
    ) -> ParsedArgs[C]:
        """`parse` for a `main()`: each error is one line on stderr, then exit status 2."""
        outcome = self._outcome(argv, environ, module_env)
        if outcome.errors or outcome.parsed is None:
            sys.stderr.write("".join(f"{self.prog}: error: {e}\n" for e in outcome.errors))
            raise SystemExit(2)
        return self._finish(outcome.parsed, outcome.print_config)

    def resolve(
        self,
        argv: list[str],
        *,
        environ: Mapping[str, str] | None = None,
        module_env: Mapping[str, str] | None = None,
    ) -> Resolution[C]:
        """The one parse a launcher does per component: every error `parse` would report, or
        the merged result; never exits or prints (`--help` and `--print-config` are not read)."""
        if _wants_help(argv):
            return Resolution([], None)
        outcome = self._resolve(list(argv), environ, module_env)
        return Resolution(outcome.errors, None if outcome.errors else outcome.parsed)

    def check(
        self, argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> list[str]:
        """The error messages `parse` would report (empty if none); never exits or prints."""
        args = list(sys.argv[1:] if argv is None else argv)
        return self.resolve(args, environ=environ).errors

    def _outcome(
        self,
        argv: list[str] | None,
        environ: Mapping[str, str] | None,
        module_env: Mapping[str, str] | None = None,
    ) -> _Outcome[C]:
        args = list(sys.argv[1:] if argv is None else argv)
        if _wants_help(args):
            sys.stdout.write(self.format_help())
            raise SystemExit(0)
        return self._resolve(args, environ, module_env)

    def _finish(self, parsed: ParsedArgs[C], print_config: str | None) -> ParsedArgs[C]:
        if print_config:
            sys.stdout.write(self.format_config(parsed, everything=print_config == "all"))
            raise SystemExit(0)
        return parsed

    def format_config(self, parsed: ParsedArgs[C], *, everything: bool = False) -> str:
        """The `--print-config` text: `key: value  # source` lines (valid YAML), Dynamo's flags
        first, then the engine's by group: those that differ from its defaults, or all."""
        built = self._build()
        dumped = parsed.config.model_dump(mode="json")
        rows = [
            (f.flag, dumped.get(name), parsed.origins.get(name, "default"))
            for name, f in self._fields.items()
        ]
        out = [f"# {self.prog}: merged configuration (default < file < env < cli)"]
        out += _format_rows(rows)
        if parsed.engine_args is not None:
            out += self._engine_config(built, parsed, everything)
        elif built.engine_missing:
            out.append(
                f"# {self.engine_name} engine not installed: pip install '{self.engine_extra}'"
            )
        if parsed.passthrough:
            out.append("# passed through unchecked: " + " ".join(parsed.passthrough))
        return "\n".join(out) + "\n"

    def _engine_config(self, built: _Built, parsed: ParsedArgs[C], everything: bool) -> list[str]:
        """The engine's rows, under its group titles; defaults left out unless `everything`."""
        values = parsed.engine_args
        assert values is not None
        with _parsing_mode(built.parser, sparse=False):
            defaults, _ = built.parser.parse_known_args([])
        shared = {a.dest for a in built.shared.values()}  # shown with Dynamo's flags
        engine = {id(a) for a in built.engine_actions}
        out: list[str] = []
        hidden = 0
        seen: set[str] = set()
        for group in built.parser._action_groups:
            rows: list[tuple[str, Any, str]] = []
            for action in group._group_actions:
                dest = action.dest
                if id(action) not in engine or dest in seen or dest in shared:
                    continue
                if not hasattr(values, dest):
                    continue
                seen.add(dest)
                value = getattr(values, dest)
                if not everything and value == getattr(defaults, dest, None):
                    hidden += 1
                    continue
                source = parsed.engine_sources.get(dest, "default")
                rows.append((_long_flag(action).lstrip("-"), value, source))
            if rows:
                out.append(f"# {group.title}")
                out += _format_rows(rows)
        if hidden:
            what = "every other flag" if out else f"all {hidden} flags"
            out.append(
                f"# {self.engine_name} engine: {what} at {self.engine_name}'s defaults "
                f"({hidden} not shown; --print-config=all lists them)"
            )
        return out

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> _Built:
        if self._built is None:
            self._built = self._make()
        return self._built

    def _make(self) -> _Built:
        parser = _ArgParser(
            prog=self.prog,
            description=self.description,
            usage="%(prog)s [flags]",
            formatter_class=_HelpFormatter,
            add_help=False,
            allow_abbrev=False,
            epilog="Every flag can also be a key of a --config YAML file (the flag name, dashes or "
            "underscores) and, for Dynamo's flags, the environment variable shown. Precedence: "
            "defaults < --config < environment < command line.",
        )
        parser.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
        parser.add_argument(
            "--config",
            dest=_DEST_PREFIX + "config",
            metavar="FILE",
            help="YAML file of flag values (keys are flag names), or a graph file with --component.",
        )
        parser.add_argument(
            "--component",
            dest=_DEST_PREFIX + "component",
            metavar="NAME",
            help="Which component of the graph file given by --config to take the args of.",
        )
        parser.add_argument(
            "--print-config",
            dest=_DEST_PREFIX + "print_config",
            nargs="?",
            const="changed",
            choices=["changed", "all"],
            metavar="all",
            help="Print the merged configuration and where each value came from, then exit: "
            "Dynamo's flags, and the engine's that differ from its defaults (=all: every one).",
        )

        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in self._fields.values():  # Dynamo groups first, in declaration order
            if f.group not in groups:
                groups[f.group] = parser.add_argument_group(f.group)

        engine_actions, engine_missing = (
            ([], False) if self._dynamo_only else self._add_engine_flags(parser)
        )

        shared: dict[str, argparse.Action] = {}
        opts = parser._option_string_actions
        for f in self._fields.values():
            owner = opts.get("--" + f.flag) or opts.get("--" + f.name)
            if owner is not None and owner in engine_actions:
                shared[f.name] = owner
                continue
            self._add_field(groups[f.group], f)
        for title, group in list(groups.items()):
            if not group._group_actions:  # every flag of the group is owned by the engine
                parser._action_groups.remove(group)
                del groups[title]

        keys: dict[str, _Target] = {}
        for action in engine_actions:
            for opt in action.option_strings:
                negative = isinstance(action, argparse.BooleanOptionalAction) and opt.startswith(
                    "--no-"
                )
                if opt.startswith("--") and not negative:
                    keys[opt[2:]] = _Target(action=action)
        for f in self._fields.values():
            if f.name not in shared:
                keys[f.flag] = _Target(field=f)
        return _Built(
            parser,
            self._fields,
            shared,
            engine_actions,
            engine_missing or self._dynamo_only,
            keys,
            dynamo_only=self._dynamo_only,
        )

    @staticmethod
    def _add_field(group: argparse._ArgumentGroup, f: _Field) -> None:
        help_text = _help_text(f)
        if f.kind == "bool":
            group.add_argument(
                "--" + f.flag,
                dest=f.dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            return
        metavar = f.name.upper()
        if f.choices:
            metavar = "{" + ",".join(_show(c) for c in f.choices) + "}"
        elif f.kind == "dict":
            metavar = "JSON"
        group.add_argument(
            "--" + f.flag,
            dest=f.dest,
            nargs="+" if f.kind == "list" else None,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=help_text,
        )

    def _add_engine_flags(self, parser: _ArgParser) -> tuple[list[argparse.Action], bool]:
        """Copy the engine's flags into `parser`, each of its groups under the engine's name."""
        if self.engine_args is None:
            return [], False
        name = self.engine_name
        engine = _ArgParser(prog=self.prog, add_help=False, allow_abbrev=False)
        try:
            self.engine_args(engine)
        except ImportError:
            parser.add_argument_group(
                f"{name} engine arguments",
                f"The {name} engine is not installed, so its flags are not listed here and are "
                f"passed through unchecked; install it with: pip install '{self.engine_extra}'",
            )
            return [], True
        mutex_of = {id(a): m for m in engine._mutually_exclusive_groups for a in m._group_actions}
        new_mutex: dict[int, argparse._MutuallyExclusiveGroup] = {}
        copied: list[argparse.Action] = []
        for source_group in engine._action_groups:
            actions = [a for a in source_group._group_actions if self._keep_engine_action(a)]
            if not actions:
                continue
            title = f"{name} engine arguments"
            if source_group.title and source_group.title not in _GENERIC_GROUP_TITLES:
                title = f"{name} engine: {source_group.title}"
            target = parser.add_argument_group(title, source_group.description)
            for action in actions:
                mutex = mutex_of.get(id(action))
                if mutex is None:
                    target._add_action(action)
                    continue
                if id(mutex) not in new_mutex:
                    new_mutex[id(mutex)] = target.add_mutually_exclusive_group(
                        required=mutex.required
                    )
                new_mutex[id(mutex)]._add_action(action)
            copied.extend(actions)
        parser._defaults.update(engine._defaults)
        return copied, False

    @staticmethod
    def _keep_engine_action(action: argparse.Action) -> bool:
        """Flags only (Dynamo components take no positionals); our own flags win a clash."""
        if not action.option_strings or action.dest == argparse.SUPPRESS:
            return False
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            return False
        action.option_strings = [o for o in action.option_strings if o not in _RESERVED_FLAGS]
        return bool(action.option_strings)

    # -- resolving ----------------------------------------------------------------------------

    def _resolve(
        self,
        argv: list[str],
        environ: Mapping[str, str] | None,
        module_env: Mapping[str, str] | None = None,
    ) -> _Outcome[C]:
        built = self._build()
        env = os.environ if environ is None else environ
        got = _Collected()

        tokens: list[str] = []
        for i, token in enumerate(argv):
            if token == "--":
                tokens += argv[i:]
                break
            tokens += built.normalized(built.canonical_flag(token))
        try:
            with _parsing_mode(built.parser, sparse=True):
                ns, extras = built.parser.parse_known_args(tokens)
        except _ParseFailure as exc:
            return _Outcome([f"{exc} on command line"])
        cli = vars(ns)
        config_path: str | None = cli.pop(_DEST_PREFIX + "config", None)
        component: str | None = cli.pop(_DEST_PREFIX + "component", None)
        print_config: str | None = cli.pop(_DEST_PREFIX + "print_config", None)
        cli.pop("help", None)

        graph_args: tuple[dict[str, Any], _Origin] | None = None
        overlay: dict[str, str] = {}
        if config_path is not None:
            data = _load_yaml(config_path, got.errors)
            if data is not None and "components" in data:
                found = self._read_graph(config_path, data, component, module_env, got)
                if found is not None:
                    graph_args, overlay = found
            elif data is not None:
                self._read_file(built, config_path, data, component, got)
        elif component is not None:
            got.errors.append("--component needs --config GRAPH_FILE on command line")
        # a graph file means what `dynamo serve` means: its env above the caller's, its args
        # above the environment (they are the flags serve would pass), the command line on top
        self._read_env(built, {**env, **overlay}, got, overlay, config_path)
        if graph_args is not None:
            entries, origin = graph_args
            for key, value in entries.items():
                self._file_entry(built, str(key), value, origin, got)
        self._read_cli(built, cli, extras, got)
        outcome = self._merge(built, got, component, print_config, overlay)
        if outcome.parsed is not None:
            outcome.parsed = dataclasses.replace(outcome.parsed, argv=list(argv))
        return outcome

    def _read_cli(
        self, built: _Built, cli: dict[str, Any], extras: list[str], got: _Collected
    ) -> None:
        for dest, value in cli.items():
            if dest.startswith(_DEST_PREFIX):
                got.set_dyn(built.fields[dest[len(_DEST_PREFIX) :]], value, _CLI, textual=True)
            elif dest in built.engine_dests:
                got.engine[dest] = (value, _CLI)
        if built.engine_missing:
            for token in extras:
                hint = built.misspelt_dynamo_flag(token.split("=", 1)[0])
                if hint is not None and token.startswith("--"):
                    flag = token.split("=", 1)[0]
                    got.errors.append(
                        f"unknown flag '{flag}' on command line (did you mean '{hint}'?)"
                    )
            got.passthrough.extend(extras)
            return
        flags = [o for o in built.parser._option_string_actions if o.startswith("--")]
        after_unknown_flag = False
        for token in extras:
            if token.startswith("-") and len(token) > 1 and not _is_number(token):
                flag = token.split("=", 1)[0]
                hint = _suggest(flag, flags, prefix="--")
                got.errors.append(
                    f"unknown flag '{flag}' on command line"
                    + (f" (did you mean '{hint}'?)" if hint else "")
                )
                after_unknown_flag = True
            elif not after_unknown_flag:
                got.errors.append(f"unexpected argument '{token}' on command line")

    def _read_env(
        self,
        built: _Built,
        env: Mapping[str, str],
        got: _Collected,
        overlay: Mapping[str, str] | None = None,
        graph_path: str | None = None,
    ) -> None:
        by_var = {f.env: f for f in built.fields.values()}
        for var, f in by_var.items():
            if var not in env:
                continue
            origin = _env_origin(var)
            if overlay and var in overlay:  # set by the graph file, as dynamo serve sets it
                origin = _Origin("env", f"env {var} (from {graph_path})", f"in {graph_path} (env)")
            if f.name in built.shared:
                self._engine_value(built, built.shared[f.name], env[var], origin, got, f.flag)
            else:
                got.set_dyn(f, env[var], origin, textual=True)
        ours = [v for v in by_var if v.startswith("DYN_")]
        for var in env:
            if not var.startswith("DYN_") or var in by_var or var in self.env_allowlist:
                continue
            hint = _suggest(var, ours, prefix="DYN_", cutoff=_ENV_TYPO_CUTOFF)
            if hint is not None:
                got.errors.append(
                    f"unknown environment variable '{var}' "
                    f"(did you mean '{hint}', i.e. '--{by_var[hint].flag}'?)"
                )

    def _read_file(
        self, built: _Built, path: str, data: dict[str, Any], component: str | None, got: _Collected
    ) -> None:
        """A flat config file: a map of flag names to values, below the environment."""
        if component is not None:
            got.errors.append(
                f"--component {component} given but {path} is not a graph file "
                "(it has no top-level 'components:')"
            )
            return
        origin = _Origin("file", f"file {path}", f"in {path}")
        for key, value in data.items():
            self._file_entry(built, str(key), value, origin, got)

    def _read_graph(
        self,
        path: str,
        data: dict[str, Any],
        component: str | None,
        module_env: Mapping[str, str] | None,
        got: _Collected,
    ) -> tuple[tuple[dict[str, Any], _Origin], dict[str, str]] | None:
        """A graph file (read as `dynamo serve` reads it, `dynamo_core.graph`): the component's
        args with their origin, and the environment its processes would get on top of ours."""
        try:
            graph = graph_from_data(data, path)
        except GraphError as exc:
            got.errors += exc.errors
            return None
        names = list(graph.components)
        if component is None:
            got.errors.append(
                f"{path} is a graph file: choose a component with --component "
                f"(one of: {', '.join(names)})"
            )
            return None
        if component not in graph.components:
            hint = _suggest(component, names)
            got.errors.append(
                f"no component '{component}' in {path}"
                + (f" (did you mean '{hint}'?)" if hint else "")
            )
            return None
        section = f"components.{component}.args"
        origin = _Origin("file", f"file {path} ({section})", f"in {path} ({section})")
        overlay = component_env(graph, component, module_env)
        return (dict(graph.components[component].args), origin), overlay

    def _file_entry(
        self, built: _Built, key: str, value: Any, origin: _Origin, got: _Collected
    ) -> None:
        target = built.lookup_key(key)
        bare = key.lstrip("-")
        if target is None:
            if bare.replace("_", "-") in {f.lstrip("-") for f in _RESERVED_FLAGS}:
                got.errors.append(f"key '{key}' {origin.where} is only valid on the command line")
            elif built.engine_missing and built.misspelt_dynamo_flag("--" + bare) is None:
                got.passthrough += render_arg(bare, value, {})
            elif built.engine_missing:
                hint = built.misspelt_dynamo_flag("--" + bare)
                got.errors.append(f"unknown key '{key}' {origin.where} (did you mean '{hint}'?)")
            else:
                hint = _suggest(bare, built.keys)
                got.errors.append(
                    f"unknown key '{key}' {origin.where}"
                    + (f" (did you mean '{hint}'?)" if hint else "")
                )
        elif target.field is not None:
            got.set_dyn(target.field, value, origin, textual=False)
        elif target.action is not None:
            self._engine_value(built, target.action, value, origin, got, bare)

    @staticmethod
    def _engine_value(
        built: _Built,
        action: argparse.Action,
        value: Any,
        origin: _Origin,
        got: _Collected,
        key: str,
    ) -> None:
        """Parse one engine value, given as YAML or env text, with the engine's own rules."""
        try:
            tokens = _engine_tokens(action, value)
            if not tokens:  # null, or an on/off flag turned off: the flag's default, from here
                got.engine[action.dest] = (action.default, origin)
                return
            with _parsing_mode(built.parser, sparse=True):
                ns, extras = built.parser.parse_known_args(tokens)
        except (_ParseFailure, _BadValue, ValueError) as exc:
            got.errors.append(f"invalid value {_show(value)!r} for '{key}' {origin.where}: {exc}")
            got.bad.add(action.dest)
            return
        if extras:
            got.errors.append(f"invalid value {_show(value)!r} for '{key}' {origin.where}")
            got.bad.add(action.dest)
            return
        for dest, parsed in vars(ns).items():
            got.engine[dest] = (parsed, origin)

    def _merge(
        self,
        built: _Built,
        got: _Collected,
        component: str | None,
        print_config: str | None,
        overlay: Mapping[str, str] | None = None,
    ) -> _Outcome[C]:
        # Errors already found (a misspelt key, a bad value) come first and alone for their
        # field: a "missing required flag" next to "unknown key 'modle-path'" would only confuse.
        errors = list(got.errors)
        quiet_missing = bool(got.errors)
        engine_ns: argparse.Namespace | None = None
        engine_origin: dict[str, _Origin] = {}
        if built.engine_actions:
            with _parsing_mode(built.parser, sparse=False):
                defaults, _ = built.parser.parse_known_args([])
            engine_ns = argparse.Namespace()
            for action in built.engine_actions:
                if hasattr(defaults, action.dest):
                    setattr(engine_ns, action.dest, getattr(defaults, action.dest))
                    engine_origin[action.dest] = _DEFAULT
            for dest, (value, origin) in got.engine.items():
                setattr(engine_ns, dest, value)
                engine_origin[dest] = origin
            for action in built.engine_actions:
                missing = engine_origin.get(action.dest, _DEFAULT) is _DEFAULT
                if action.required and missing and not quiet_missing:
                    flag = _long_flag(action)
                    errors.append(
                        f"missing required flag '{flag}' (on the command line or as key "
                        f"'{flag.lstrip('-')}' in --config)"
                    )

        values: dict[str, Any] = {}
        raws: dict[str, Any] = {}
        origins: dict[str, _Origin] = {}
        for f in built.fields.values():
            if f.name in built.shared and engine_ns is not None:
                dest = built.shared[f.name].dest
                origin = engine_origin.get(dest, _DEFAULT)
                value = getattr(engine_ns, dest, None)
                if origin is not _DEFAULT or value is not None:
                    values[f.name] = raws[f.name] = value
                    origins[f.name] = origin
            elif f.name in got.dyn:
                values[f.name], raws[f.name], origins[f.name] = got.dyn[f.name]
        config: C | None = None
        try:
            config = self.config_model.model_validate(values)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = err.get("loc", ())
                name = str(loc[0]) if loc else ""
                if name in got.bad or (quiet_missing and err.get("type") == "missing"):
                    continue
                errors.append(self._explain(err, raws, origins))
        if errors or config is None:
            return _Outcome(errors)
        parsed = ParsedArgs(
            config=config,
            engine_args=engine_ns,
            passthrough=got.passthrough,
            sources={n: origins.get(n, _DEFAULT).source for n in built.fields},
            origins={n: origins.get(n, _DEFAULT).label for n in built.fields},
            engine_sources={d: o.source for d, o in engine_origin.items()},
            component=component,
            env_overlay=dict(overlay or {}),
        )
        if self.preflight is not None:
            problems = self.preflight(parsed)
            if problems:
                return _Outcome(problems)
        return _Outcome([], parsed, print_config)

    def _explain(self, err: Any, raws: dict[str, Any], origins: dict[str, _Origin]) -> str:
        loc = tuple(err.get("loc", ()))
        f = self._fields.get(str(loc[0])) if loc else None
        if f is None:
            return f"invalid configuration: {err.get('msg')}"
        if err.get("type") == "missing":
            return (
                f"missing required flag '--{f.flag}' (on the command line, as key '{f.flag}' "
                f"in --config, or env {f.env})"
            )
        origin = origins.get(f.name, _DEFAULT)
        raw = raws.get(f.name, f.default)
        shown = "'***'" if f.secret else repr(_show(raw))
        where = f.flag + "".join(f"[{p}]" for p in loc[1:])
        return f"invalid value {shown} for '{where}' {origin.where}: {err.get('msg')}"


#: `--print-config` fits this many columns; sources line up at most this far in.
_PRINT_WIDTH = 100
_SOURCE_COLUMN = 48


def _plain(value: Any) -> Any:
    """An engine's config object (a dataclass or a pydantic model, as vLLM's `--*-config`
    defaults are) as the JSON map its flag would take, rather than its repr."""
    try:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return json.loads(json.dumps(dataclasses.asdict(value), default=str))
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
    except Exception:  # a config object that will not flatten: shown as its repr
        return value
    return value


def _format_rows(rows: list[tuple[str, Any, str]]) -> list[str]:
    """`key: value  # source` lines, sources aligned; a line that would pass `_PRINT_WIDTH`
    gets its source on the line above and, for a map or a list, its value as indented JSON
    (still YAML)."""
    rows = [(k, _plain(v), src) for k, v, src in rows]
    texts = [(k, json.dumps(v, default=str), src) for k, v, src in rows]
    fits = [len(k) + 2 + len(v) for k, v, _ in texts]
    column = min(max((n for n in fits if n <= _SOURCE_COLUMN), default=0), _SOURCE_COLUMN)
    out = []
    for (key, text, source), (_, value, _), n in zip(texts, rows, fits, strict=True):
        line = f"{key}: {text}"
        if max(n, column) + 4 + len(source) <= _PRINT_WIDTH:
            out.append(f"{line:<{column}}  # {source}")
            continue
        out.append(f"# {key}: {source}")
        if n > _PRINT_WIDTH and isinstance(value, dict | list) and value:
            body = json.dumps(value, default=str, indent=2).splitlines()
            out.append(f"{key}: {body[0]}")
            out += [f"  {ln}" for ln in body[1:]]
        else:
            out.append(line)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def load_yaml_file(path: Path, flag: str) -> Any:
    """The YAML (or JSON) document in the file a flag names; `ConfigError` as one line that
    names the flag and the file when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{flag} {path}: invalid YAML{at}") from None


def _load_yaml(path: str, errors: list[str]) -> dict[str, Any] | None:
    """The config file's top-level map, or None with the reason appended to `errors`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        errors.append(f"cannot read config file {path}: {exc.strerror or exc}")
        return None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        errors.append(f"invalid YAML in {path}{at}: {problem}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path} must hold a map of flag names to values")
        return None
    return data


def parse_component_args(
    config_model: type[C], argv: list[str] | None = None, **kwargs: Any
) -> ParsedArgs[C]:
    """Build the parser and parse for a `main()`: on error, one line per error and exit 2."""
    return DynFlexibleArgumentParser(config_model, **kwargs).parse_or_exit(argv)
