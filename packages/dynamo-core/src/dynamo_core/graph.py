"""Graph files: one model, one reader, one value -> argv renderer, for every launcher.

A graph file names the components of an inference graph and the flags each one runs with::

    namespace: demo
    env: {DYN_LOG: info}                  # every process
    components:
      frontend:
        module: dynamo_core.frontend
        args: {http-port: 8000}
      backend:
        module: dynamo_core.mocker
        replicas: 2                       # default: the module's Deployment.replicas
        env: {FOO: bar}                   # this component's processes only
        resources: {gpu: 1}               # overrides the module's Deployment.resources
        args: {model-path: examples/models/tiny}

Three readers mean the same thing by it, because they share this module: `dynamo serve` and
`dynamo deploy` (which plan one process per replica, `dynamo_serve.graph`), and a component
started with `--config graph.yaml --component backend` (`dynamo_core.args`).

- **`load_graph`** validates the whole file (pydantic, unknown keys refused) and lists every
  problem with its place, as `GraphError`.
- **`render_arg`** writes one arg as the flags its component's parser reads. The key names a
  flag (`model-path`, `--model-path` and `model_path` all work); how the value is written depends
  on the flag's argparse action: a `BooleanOptionalAction` gets `--x`/`--no-x`; a
  `store_true`/`store_false` flag is given (`true`) or left out (`false`), so `no-cache: true`
  gives `--no-cache` whatever its dest; a `count` flag is repeated N times; an `append` flag once
  per item (`--x=a --x=b`); an `nargs="+"` flag takes the list (`--x a b`); a map is JSON; `null`
  leaves the flag at its default. A flag whose action is not known here (an engine's, when the
  launcher does not load the engine: `dynamo_core.args`, Dynamo-only parsing) is written as one
  token the component's own parser reads back exactly: `true` as `--x`, anything else as
  `--x=VALUE` (the YAML scalar's text, JSON for lists and maps).
- **`component_env`** is the environment a component's processes get on top of the caller's,
  lowest first: the module's `Deployment.env`, the graph's `env`, the component's `env`, and
  `DYN_NAMESPACE` from the graph's `namespace`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dynamo_core.deploy import Resources
from dynamo_core.errors import ConfigError

__all__ = [
    "ComponentSpec",
    "Graph",
    "GraphError",
    "ResourcesOverride",
    "component_env",
    "graph_from_data",
    "load_graph",
    "render_arg",
    "render_args",
]


class GraphError(ConfigError):
    """A graph that cannot run; `errors` holds one message per problem."""

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# --------------------------------------------------------------------------------------------
# The file.


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class ResourcesOverride(BaseModel):
    """Part of `Resources`: what the graph sets wins over the module's `Deployment.resources`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: int | None = Field(None, ge=0)
    cpu: str | None = None
    memory: str | None = None

    def over(self, base: Resources) -> Resources:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class ComponentSpec(BaseModel):
    """One component of a graph: which module runs, with which flags, how many times."""

    model_config = ConfigDict(extra="forbid")

    module: str = Field(description="The component's module, run as `python -m <module>`.")
    args: dict[str, Any] = Field(default_factory=dict, description="Flag name -> value.")
    replicas: int | None = Field(
        None, ge=0, description="Processes to run (default: the module's Deployment.replicas)."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Variables for its processes.")
    resources: ResourcesOverride | None = Field(
        None, description="Overrides the module's Deployment.resources (gpu, cpu, memory)."
    )

    @field_validator("module")
    @classmethod
    def _module_name(cls, value: str) -> str:
        if not _MODULE.match(value):
            raise ValueError(f"{value!r} is not a dotted module name")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_values(cls, value: Any) -> Any:
        return _stringify_env(value)

    @field_validator("args", mode="before")
    @classmethod
    def _args_none(cls, value: Any) -> Any:
        return {} if value is None else value


def _stringify_env(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): _env_text(v) for k, v in value.items()}
    return value


class Graph(BaseModel):
    """A graph file, validated."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = Field(None, description="DYN_NAMESPACE of every component.")
    env: dict[str, str] = Field(default_factory=dict, description="Variables for every process.")
    components: dict[str, ComponentSpec] = Field(min_length=1)

    @field_validator("env", mode="before")
    @classmethod
    def _env_values(cls, value: Any) -> Any:
        return _stringify_env(value)

    @field_validator("components")
    @classmethod
    def _names(cls, value: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"component name {name!r}: use letters, digits, '-' and '_' "
                    "(a '.' would clash with --<component>.<arg> overrides)"
                )
        return value


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_graph(path: str | Path) -> Graph:
    """Read and validate a graph file; `GraphError` lists every problem, each with its place."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphError(f"graph file {path} not found") from None
    except OSError as exc:
        raise GraphError(f"cannot read graph file {path}: {exc.strerror or exc}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GraphError(f"invalid YAML in {path}{at}: {problem}") from None
    return graph_from_data(data, path)


def graph_from_data(data: Any, path: str | Path) -> Graph:
    """A graph file's parsed YAML, validated (`path` names it in the messages)."""
    if not isinstance(data, dict):
        raise GraphError(f"{path} must hold a map with 'components:'")
    try:
        return Graph.model_validate(data)
    except ValidationError as exc:
        raise GraphError(
            [
                f"{path}: {_location(e['loc'])}: {e['msg']}"
                + (f" (got {e['input']!r})" if e["type"] == "extra_forbidden" else "")
                for e in exc.errors(include_url=False)
            ]
        ) from None


def component_env(
    graph: Graph, name: str, module_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What a component's processes get on top of the caller's environment (see above)."""
    env = {**(module_env or {}), **graph.env, **graph.components[name].env}
    if graph.namespace:
        env["DYN_NAMESPACE"] = graph.namespace
    return env


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return str(value)


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _with_value(flag: str, value: Any) -> list[str]:
    text = _text(value)
    # `--x -1` reads as two flags to argparse; `--x=-1` cannot be misread.
    return [f"{flag}={text}"] if text.startswith("-") or text == "" else [flag, text]


def _long_flag(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _find_action(key: str, actions: Mapping[str, argparse.Action]) -> argparse.Action | None:
    bare = key.lstrip("-")
    for candidate in (bare, bare.replace("_", "-"), bare.replace("-", "_")):
        action = actions.get("--" + candidate)
        if action is not None:
            return action
    return None


def render_arg(key: str, value: Any, actions: Mapping[str, argparse.Action]) -> list[str]:
    """The command-line tokens that give flag `key` the (YAML) `value`, as its parser expects
    (`actions`: the parser's option strings; a key not among them is written as one token)."""
    if value is None:
        return []  # `key: null` in YAML: leave the flag at its default
    action = _find_action(key, actions)
    flag = _long_flag(action) if action is not None else "--" + key.lstrip("-")
    items = list(value) if isinstance(value, list | tuple) else None
    if action is None:  # not known here: one token the component's own parser reads back
        return [flag] if value is True else [f"{flag}={_text(value)}"]
    if isinstance(action, argparse.BooleanOptionalAction):
        wanted = _as_bool(value)
        if wanted is None:
            return _with_value(flag, value)  # let the parser say what is wrong
        return [flag] if wanted else ["--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false / store_const / count
        if isinstance(action, argparse._CountAction) and not isinstance(value, bool):
            return [flag] * int(value)
        wanted = _as_bool(value)
        if wanted is None:
            return _with_value(flag, value)
        return [flag] if wanted else []  # `no-cache: true` gives `--no-cache`, whatever its dest
    if isinstance(action, argparse._AppendAction | argparse._ExtendAction):
        return [f"{flag}={_text(v)}" for v in (items if items is not None else [value])]
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs >= 1):
        if items is None:
            return _with_value(flag, value)
        return [flag, *(_text(v) for v in items)]
    return _with_value(flag, value)


def render_args(args: Mapping[str, Any], actions: Mapping[str, argparse.Action]) -> list[str]:
    """All of a component's args as flags, in the graph's order."""
    flags: list[str] = []
    for key, value in args.items():
        flags.extend(render_arg(str(key), value, actions))
    return flags
