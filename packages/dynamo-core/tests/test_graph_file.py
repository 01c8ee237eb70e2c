"""Graph files (`dynamo_core.graph`): the one value -> argv renderer, and `--config GRAPH
--component X` meaning what `dynamo serve` means, engine flags included."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.graph import Graph, component_env, load_graph, render_arg, render_args
from dynamo_core.runtime import RuntimeConfig


def actions() -> dict[str, argparse.Action]:
    p = argparse.ArgumentParser()
    p.add_argument("--flag", action=argparse.BooleanOptionalAction)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-cache", dest="cache", action="store_false")
    p.add_argument("--lora", action="append")
    p.add_argument("--tags", nargs="+")
    p.add_argument("--port", type=int)
    p.add_argument("--extra_json")
    p.add_argument("-v", "--verbose", action="count")
    return dict(p._option_string_actions)


@pytest.mark.parametrize(
    ("key", "value", "tokens"),
    [
        ("flag", True, ["--flag"]),
        ("flag", False, ["--no-flag"]),
        ("flag", "false", ["--no-flag"]),
        ("enforce-eager", True, ["--enforce-eager"]),
        ("enforce_eager", False, []),
        ("no-cache", True, ["--no-cache"]),  # the key names the flag, whatever its dest
        ("lora", ["a", "b"], ["--lora=a", "--lora=b"]),
        ("tags", ["a", "b"], ["--tags", "a", "b"]),
        ("tags", "a", ["--tags", "a"]),
        ("port", 8000, ["--port", "8000"]),
        ("port", -1, ["--port=-1"]),
        ("--port", "9", ["--port", "9"]),
        ("extra-json", {"a": 1}, ["--extra_json", '{"a": 1}']),
        ("verbose", 2, ["--verbose", "--verbose"]),
        ("port", None, []),
        # flags not known here (an engine's, its parser not loaded): one token each, which the
        # component's own parser reads back with the engine's action
        ("unknown", True, ["--unknown"]),
        ("unknown", False, ["--unknown=false"]),
        ("unknown", 3, ["--unknown=3"]),
        ("unknown", [1, 2], ["--unknown=[1, 2]"]),
        ("unknown", {"a": 1}, ['--unknown={"a": 1}']),
        ("unknown", "x y", ["--unknown=x y"]),
    ],
)
def test_render_arg(key: str, value: Any, tokens: list[str]) -> None:
    assert render_arg(key, value, actions()) == tokens


# -- what a component reads: --config GRAPH --component X == the flags serve renders ----------


class Config(RuntimeConfig):
    model_path: str | None = Field(None, description="Model.")


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """An engine's parser with every kind of argparse action."""
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-cache", dest="cache", action="store_false")
    parser.add_argument("--trust", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--lora", action="append")
    parser.add_argument("--extend", action="extend", nargs="+")
    parser.add_argument("--tags", nargs="+")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--extra-json", type=str)


def component() -> DynFlexibleArgumentParser[Config]:
    return DynFlexibleArgumentParser(Config, prog="c", engine_args=engine_flags, engine_name="e")


ARGS: dict[str, Any] = {
    "enforce-eager": True,
    "no-cache": True,
    "trust": False,
    "verbose": 2,
    "lora": ["a", "b"],
    "extend": ["x", "y"],
    "tags": ["t1", "t2"],
    "tp-size": 4,
    "extra-json": {"k": [1, 2]},
}


@pytest.mark.parametrize("key", list(ARGS))
@pytest.mark.parametrize("off", [False, True])
def test_the_launchers_tokens_read_back_as_the_graph_file_reads(
    tmp_path: Path, key: str, off: bool
) -> None:
    """A launcher that does not load the engine writes each engine flag as one token; the
    component's full parser reads those tokens back to what `--config graph --component c`
    gives, for every kind of action (and for an on/off flag turned off)."""
    value = False if off and isinstance(ARGS[key], bool) else ARGS[key]
    graph = tmp_path / "g.yaml"
    graph.write_text(yaml.safe_dump({"components": {"c": {"module": "m", "args": {key: value}}}}))
    launched = component().parse(render_args({key: value}, {}), environ={})
    from_file = component().parse(["--config", str(graph), "--component", "c"], environ={})
    assert vars(launched.engine_args) == vars(from_file.engine_args)
    # and what the launcher renders with the engine's own actions reads the same
    actions = component().option_actions()
    rendered = component().parse(render_args({key: value}, actions), environ={})
    assert vars(rendered.engine_args) == vars(from_file.engine_args)


def test_store_false_keys_name_the_flag_in_a_config_file(tmp_path: Path) -> None:
    """`no-cache: true` turns the cache off, in a file as in a graph (it used to set cache=True)."""
    flat = tmp_path / "c.yaml"
    flat.write_text("no-cache: true\n")
    parsed = component().parse(["--config", str(flat)], environ={})
    assert parsed.engine_args is not None and parsed.engine_args.cache is False


def test_component_env_precedence() -> None:
    graph = Graph.model_validate(
        {
            "namespace": "demo",
            "env": {"A": "graph", "B": "graph"},
            "components": {"c": {"module": "m", "env": {"B": "component", "C": 1}}},
        }
    )
    module_env = {"A": "module", "D": "module", "DYN_NAMESPACE": "module"}
    assert component_env(graph, "c", module_env) == {
        "A": "graph",
        "B": "component",
        "C": "1",
        "D": "module",
        "DYN_NAMESPACE": "demo",
    }


def test_graph_args_beat_the_environment_and_the_graph_env_beats_the_callers(
    tmp_path: Path,
) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text(
        "namespace: demo\nenv: {DYN_MODEL_PATH: /from-graph-env}\n"
        "components:\n  c: {module: m, args: {tp-size: 2}}\n  d: {module: m}\n"
    )
    environ = {"DYN_NAMESPACE": "callers", "DYN_MODEL_PATH": "/callers"}
    c = component().parse(["--config", str(graph), "--component", "c"], environ=environ)
    assert c.config.namespace == "demo" and c.config.model_path == "/from-graph-env"
    assert c.engine_args is not None and c.engine_args.tp_size == 2
    assert c.env_overlay == {"DYN_MODEL_PATH": "/from-graph-env", "DYN_NAMESPACE": "demo"}
    cli = component().parse(
        ["--config", str(graph), "--component", "c", "--namespace", "mine", "--tp-size", "8"],
        environ=environ,
    )
    assert cli.config.namespace == "mine" and cli.engine_args.tp_size == 8  # type: ignore[union-attr]


def test_every_example_graph_reads(tmp_path: Path) -> None:
    for path in sorted((Path(__file__).parents[3] / "examples" / "graphs").glob("*.yaml")):
        graph = load_graph(path)
        assert graph.components, path
