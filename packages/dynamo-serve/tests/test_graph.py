"""dynamo_serve.graph: graph files, overrides, flags, plans, GPUs, validation, dry-run text.

Pure functions: no process is started here. Components are the fakes in `serve_fakes` (a worker
and an HTTP front), built as real component modules are: `Deployment` + `build_parser()`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_serve.graph import (
    ComponentInfo,
    Graph,
    GraphError,
    apply_overrides,
    build_plan,
    format_dry_run,
    load_component,
    load_graph,
    parse_overrides,
    render_arg,
    validate_plan,
)
from serve_fakes import front, worker

GRAPH = """
namespace: demo
env: {SHARED: "1", NUM: 2}
components:
  frontend:
    module: serve_fakes.front
    args: {http-port: 8000}
  backend:
    module: serve_fakes.worker
    replicas: 2
    env: {ONLY_BACKEND: x}
    args: {model-path: examples/models/tiny, tags: [a, b], fail-at-start: false}
"""


def write(tmp_path: Path, text: str, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def graph(tmp_path: Path) -> Graph:
    return load_graph(write(tmp_path, GRAPH))


def infos(**gpus: int) -> dict[str, ComponentInfo]:
    """The fakes' real parsers; `gpus` overrides a component's Deployment.resources.gpu."""

    def make(module: Any, name: str) -> ComponentInfo:
        deployment = module.Deployment
        if name in gpus:
            deployment = type(
                "Deployment", (module.Deployment,), {"resources": Resources(gpu=gpus[name])}
            )
        return ComponentInfo(module.__name__, deployment, module.build_parser())

    return {"frontend": make(front, "frontend"), "backend": make(worker, "backend")}


# -- graph files ----------------------------------------------------------------------------


def test_load_graph(graph: Graph) -> None:
    assert graph.namespace == "demo"
    assert graph.env == {"SHARED": "1", "NUM": "2"}  # YAML scalars become text
    assert list(graph.components) == ["frontend", "backend"]
    assert graph.components["backend"].replicas == 2
    assert graph.components["frontend"].replicas is None  # the module's default


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("components: {b: {module: m, replicas: -1}}", "components.b.replicas"),
        ("components: {b: {module: m, replicas: two}}", "components.b.replicas"),
        ("components: {b: {module: m, arg: {}}}", "components.b.arg"),
        ("components: {b: {module: 'not a module'}}", "dotted module name"),
        ("components: {b.c: {module: m}}", "would clash"),
        ("components: {}", "components"),
        ("namespace: x", "components"),
        ("components: [a, b]", "components"),
        ("- just a list", "must hold a map"),
        ("components: {b: {module: m}\n", "invalid YAML"),
    ],
)
def test_bad_graph_is_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(GraphError) as info:
        load_graph(write(tmp_path, text))
    assert expected in str(info.value)
    assert "graph.yaml" in str(info.value)


def test_missing_graph_file(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match=r"graph file .*nope.yaml not found"):
        load_graph(tmp_path / "nope.yaml")


def test_example_graphs_are_valid() -> None:
    root = Path(__file__).resolve().parents[3] / "examples" / "graphs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"agg.yaml", "agg-replicas.yaml", "disagg.yaml", "sglang.yaml", "trtllm.yaml",
            "vllm-cpu.yaml"} <= set(names)  # fmt: skip
    for name in names:
        load_graph(root / name)
    agg = load_graph(root / "agg.yaml")
    assert agg.components["backend"].args["model-path"] == "examples/models/tiny"


# -- overrides ------------------------------------------------------------------------------


def test_parse_overrides() -> None:
    got = parse_overrides(
        ["--backend.replicas", "3", "--frontend.http-port=9000", "--backend.fail-at-start"],
        ["frontend", "backend"],
    )
    assert got == {
        "backend": {"replicas": "3", "fail-at-start": True},
        "frontend": {"http-port": "9000"},
    }


def test_override_of_unknown_component_suggests() -> None:
    with pytest.raises(GraphError, match=r"no component 'backnd' \(did you mean 'backend'\?\)"):
        parse_overrides(["--backnd.replicas", "3"], ["frontend", "backend"])


def test_apply_overrides_replaces_args_and_replicas(graph: Graph) -> None:
    new = apply_overrides(
        graph,
        {
            "backend": {"replicas": "3", "model_path": "/m", "seed": "4"},
            "frontend": {"http-port": "9"},
        },
    )
    backend = new.components["backend"]
    assert backend.replicas == 3
    assert backend.args["model-path"] == "/m"  # the graph's key kept, its value replaced
    assert "model_path" not in backend.args
    assert backend.args["seed"] == "4"
    assert new.components["frontend"].args == {"http-port": "9"}
    assert graph.components["backend"].replicas == 2  # the original is untouched


@pytest.mark.parametrize("value", ["-1", "x", True])
def test_bad_replica_override(graph: Graph, value: Any) -> None:
    with pytest.raises(GraphError, match=r"--backend.replicas: expected an integer >= 0"):
        apply_overrides(graph, {"backend": {"replicas": value}})


# -- args -> flags --------------------------------------------------------------------------


def test_the_renderer_is_cores() -> None:
    """The value -> argv table lives with the renderer (dynamo-core's test_graph_file.py);
    dynamo_serve.graph re-exports it, so serve, deploy and --config write the same flags."""
    import dynamo_core.graph

    assert render_arg is dynamo_core.graph.render_arg
    p = argparse.ArgumentParser()
    p.add_argument("--no-cache", dest="cache", action="store_false")
    assert render_arg("no-cache", True, dict(p._option_string_actions)) == ["--no-cache"]


# -- plans ----------------------------------------------------------------------------------


def test_plan_processes_argv_and_env(graph: Graph) -> None:
    plan = build_plan(graph, infos(), runtime_env={"DYN_REQUEST_PLANE": "tcp"}, cwd="/here")
    assert [p.label for p in plan.processes] == ["frontend", "backend.1", "backend.2"]
    fe, b1, b2 = plan.processes
    assert fe.argv == (sys.executable, "-m", "serve_fakes.front", "--http-port", "8000")
    assert b1.argv == (
        sys.executable,
        "-m",
        "serve_fakes.worker",
        "--model-path",
        "examples/models/tiny",
        "--tags",
        "a",
        "b",
        "--no-fail-at-start",
    )
    assert b1.argv == b2.argv
    assert fe.env == {
        "SHARED": "1",
        "NUM": "2",
        "DYN_NAMESPACE": "demo",
        "DYN_REQUEST_PLANE": "tcp",
    }
    assert b1.env["ONLY_BACKEND"] == "x"
    assert "ONLY_BACKEND" not in fe.env
    assert "CUDA_VISIBLE_DEVICES" not in b1.env
    assert plan.cwd == "/here"


def test_env_precedence(graph: Graph) -> None:
    class Dep(BaseDeployment):
        env = {"SHARED": "module", "MOD": "m"}

    info = infos()
    info["backend"] = ComponentInfo("serve_fakes.worker", Dep, worker.build_parser())
    graph.components["backend"].env["SHARED"] = "component"
    graph.components["backend"].env["DYN_NAMESPACE"] = "ignored"
    plan = build_plan(graph, info, namespace="cli-ns")
    env = plan.component("backend").env
    assert env["MOD"] == "m"  # module default
    assert env["SHARED"] == "component"  # component > graph > module
    assert env["DYN_NAMESPACE"] == "cli-ns"  # the launcher's own settings win


def test_only_runs_a_subset(graph: Graph) -> None:
    plan = build_plan(graph, {"backend": infos()["backend"]}, only=["backend"])
    assert [c.name for c in plan.components] == ["backend"]
    assert plan.skipped == ("frontend",)
    with pytest.raises(GraphError, match=r"no component 'bakend' \(did you mean 'backend'\?\)"):
        build_plan(graph, {}, only=["bakend"])


def test_zero_replicas(graph: Graph) -> None:
    graph = apply_overrides(graph, {"backend": {"replicas": "0"}})
    plan = build_plan(graph, infos())
    assert plan.component("backend").processes == ()
    assert "# backend: 0 replicas" in format_dry_run(plan)


def test_gpus_are_assigned_per_replica(graph: Graph) -> None:
    plan = build_plan(graph, infos(backend=2), gpus=["0", "1", "2", "3", "4"])
    b1, b2 = plan.component("backend").processes
    assert b1.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert b2.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "CUDA_VISIBLE_DEVICES" not in plan.component("frontend").processes[0].env


def test_graph_resources_override_the_module(graph: Graph, tmp_path: Path) -> None:
    text = GRAPH.replace("replicas: 2", "replicas: 2\n    resources: {gpu: 1}")
    graph = load_graph(write(tmp_path, text, "g2.yaml"))
    plan = build_plan(graph, infos(backend=4), gpus=["5", "7"])
    assert [p.gpus for p in plan.component("backend").processes] == [("5",), ("7",)]
    assert plan.component("backend").resources.gpu == 1


@pytest.mark.parametrize("gpus", [None, ["0", "1", "2"]])
def test_not_enough_gpus_is_a_clear_error(graph: Graph, gpus: list[str] | None) -> None:
    with pytest.raises(GraphError) as info:
        build_plan(graph, infos(backend=2), gpus=gpus)
    message = str(info.value)
    assert "not enough GPUs" in message
    assert "component 'backend' replica 2 needs 2 GPU(s)" in message
    assert "backend: 2 x 2" in message
    assert "--gpus" in message


# -- validation by the component's own parser ------------------------------------------------


def test_misspelt_arg_names_component_and_arg(graph: Graph) -> None:
    graph = apply_overrides(graph, {"backend": {"modle-path": "x"}})
    plan = build_plan(graph, infos())
    with pytest.raises(GraphError) as info:
        validate_plan(plan, infos(), base_env={}, where="g.yaml")
    assert info.value.errors == [
        "g.yaml, component 'backend' (serve_fakes.worker): unknown flag '--modle-path' "
        "(did you mean '--model-path'?)"
    ]


def test_bad_value_is_reported_by_the_component(graph: Graph) -> None:
    graph = apply_overrides(graph, {"frontend": {"http-port": "eighty"}})
    plan = build_plan(graph, infos())
    with pytest.raises(GraphError, match=r"component 'frontend' .*'http-port'"):
        validate_plan(plan, infos(), base_env={})


def test_misspelt_environment_variable_is_reported(graph: Graph) -> None:
    graph.components["backend"].env["DYN_MODEL_PATHH"] = "x"
    plan = build_plan(graph, infos())
    with pytest.raises(GraphError, match=r"component 'backend'.*DYN_MODEL_PATHH"):
        validate_plan(plan, infos(), base_env={})


def test_valid_plan_passes(graph: Graph) -> None:
    validate_plan(build_plan(graph, infos()), infos(), base_env={})


def test_missing_path_input_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    text = """
components:
  backend:
    module: serve_fakes.worker
    args: {model-path: model}
"""
    graph = load_graph(write(tmp_path, text))
    import serve_fakes.worker as w

    class PathConfig(w.WorkerConfig):
        model_path: Path  # type: ignore[assignment]

    from dynamo_core.args import DynFlexibleArgumentParser

    info = {"backend": ComponentInfo("m", w.Deployment, DynFlexibleArgumentParser(PathConfig))}
    validate_plan(build_plan(graph, info, cwd=str(tmp_path)), info, base_env={})
    bad = apply_overrides(graph, {"backend": {"model-path": "modle"}})
    with pytest.raises(GraphError, match=r"model-path: modle does not exist \(relative paths"):
        validate_plan(build_plan(bad, info, cwd=str(tmp_path)), info, base_env={})


def test_load_component() -> None:
    info = load_component("serve_fakes.worker")
    assert info.deployment is worker.Deployment
    assert "--model-path" in info.actions()
    with pytest.raises(GraphError, match=r"module 'dynamo_nothing.worker' is not installed"):
        load_component("dynamo_nothing.worker")
    with pytest.raises(GraphError, match=r"serve_fakes is installed, but has no such module"):
        load_component("serve_fakes.nothing")


# -- dry run ----------------------------------------------------------------------------------


def test_dry_run_text_is_runnable_shell(graph: Graph) -> None:
    plan = build_plan(graph, infos(backend=1), gpus=["3", "4"], cwd="/some dir")
    text = format_dry_run(plan)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines[0] == "cd '/some dir'"
    commands = [shlex.split(ln) for ln in lines[1:]]
    assert len(commands) == 3
    for tokens, process in zip(commands, plan.processes, strict=True):
        n = len(process.env)
        assert dict(t.split("=", 1) for t in tokens[:n]) == process.env
        assert tuple(tokens[n:]) == process.argv
    assert "CUDA_VISIBLE_DEVICES=4" in text
