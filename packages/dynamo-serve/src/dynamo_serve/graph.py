"""Graph files and the plan they become: pure functions, no process started.

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

The file itself (its model, `load_graph`, the value -> argv renderer `render_arg(s)` and the
environment `component_env`) is core's, `dynamo_core.graph`, which a component started with
`--config graph.yaml --component X` reads too: both mean the same thing. The names are re-exported
here. This module is the launcher's half: `build_plan` turns a graph (plus command-line
overrides) into one `ProcessPlan` per process: the exact argv `[sys.executable, "-m", module,
*flags]` and the environment variables set on top of the caller's. Nothing here imports a
component module or starts a process; what the plan needs from a module (its `Deployment` and its
parser's flags) arrives as a `ComponentInfo`, which `load_component` builds (in `dynamo serve`)
and tests build by hand.

Choices worth knowing in review:

- **Args become flags by asking the component's parser** (`dynamo_core.graph.render_arg`):
  `args` keys are flag names (`model-path`, `--model-path` and `model_path` all work), written
  as the flag's argparse action reads them. A flag the parser does not know (an engine's: the
  launcher parses without the engine) is written as one token, `--x` or `--x=VALUE`, which the
  component's own parser reads back with the engine's action when the process starts.
- **Relative paths stay relative**: processes run in the current directory of `dynamo serve`, so
  `model-path: examples/models/tiny` resolves against it (as it would when you type the command),
  not against the graph file's folder. `--dry-run` prints that directory.
- **Environment, lowest to highest**: the module's `Deployment.env`, the graph's `env`, the
  component's `env`, then what the launcher itself sets (`DYN_NAMESPACE`, the backend settings given
  as flags, `CUDA_VISIBLE_DEVICES`): the launcher must know the namespace it watches for readiness.
- **GPUs**: each replica takes the next `resources.gpu` devices, in graph order, from `--gpus` or
  else the caller's `CUDA_VISIBLE_DEVICES`; a component with `gpu: 0` gets no `CUDA_VISIBLE_DEVICES`
  (it inherits the caller's), as Dynamo's former allocator did.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.graph import (
    ComponentSpec,
    Graph,
    GraphError,
    ResourcesOverride,
    component_env,
    load_graph,
    render_arg,
    render_args,
)

if TYPE_CHECKING:
    from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs

__all__ = [
    "RUNTIME_FLAGS",
    "ComponentInfo",
    "ComponentPlan",
    "ComponentSpec",
    "Graph",
    "GraphError",
    "Overrides",
    "Plan",
    "ProcessPlan",
    "Resolved",
    "ResourcesOverride",
    "apply_overrides",
    "build_plan",
    "flag_value",
    "format_dry_run",
    "load_component",
    "load_graph",
    "parse_gpus",
    "parse_overrides",
    "read_graph",
    "render_arg",
    "render_args",
    "validate_plan",
]

#: Backend flags of `dynamo serve` passed to every component as environment variables, so that
#: every component's own parser sees them (flag -> variable).
RUNTIME_FLAGS: dict[str, str] = {
    "discovery-backend": "DYN_DISCOVERY_BACKEND",
    "request-plane": "DYN_REQUEST_PLANE",
    "event-plane": "DYN_EVENT_PLANE",
    "file-kv": "DYN_FILE_KV",
    "etcd-endpoints": "ETCD_ENDPOINTS",
    "nats-server": "NATS_SERVER",
}

# --------------------------------------------------------------------------------------------
# Command-line overrides: --<component>.<arg> VALUE, --<component>.replicas N.

#: component -> {arg or "replicas" -> value (text from the command line, or True)}
Overrides = dict[str, dict[str, Any]]


def _suggest(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_overrides(tokens: Sequence[str], components: Iterable[str]) -> Overrides:
    """`["--backend.replicas", "3", "--frontend.http-port=9000"]` -> overrides per component.

    A `--<component>.<flag>` followed by another `--...` token (or nothing) means `true`.
    """
    names = list(components)
    out: Overrides = {}
    errors: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            errors.append(
                f"unexpected argument '{token}' (overrides are --<component>.<arg> VALUE, "
                f"components: {', '.join(names)})"
            )
            continue
        key, eq, value_text = token[2:].partition("=")
        component, _, arg = key.partition(".")
        value: Any
        if eq:
            value = value_text
        elif i < len(tokens) and not (tokens[i].startswith("--") and len(tokens[i]) > 2):
            value = tokens[i]
            i += 1
        else:
            value = True
        if component not in names:
            errors.append(
                f"override '--{key}': no component '{component}'{_suggest(component, names)}"
            )
            continue
        if not arg:
            errors.append(f"override '--{key}': name an arg after the '.'")
            continue
        out.setdefault(component, {})[arg.removeprefix("--")] = value
    if errors:
        raise GraphError(errors)
    return out


def _same_flag(a: str, b: str) -> bool:
    return a.lstrip("-").replace("_", "-") == b.lstrip("-").replace("_", "-")


def apply_overrides(graph: Graph, overrides: Overrides) -> Graph:
    """A new graph with the overrides in place (an override of a graph arg replaces it)."""
    components = dict(graph.components)
    errors: list[str] = []
    for name, items in overrides.items():
        spec = components[name]
        args = dict(spec.args)
        replicas = spec.replicas
        for arg, value in items.items():
            if arg == "replicas":
                try:
                    replicas = int(value)
                    if replicas < 0 or isinstance(value, bool):
                        raise ValueError
                except (TypeError, ValueError):
                    errors.append(f"--{name}.replicas: expected an integer >= 0, got {value!r}")
                continue
            existing = next((k for k in args if _same_flag(k, arg)), None)
            if existing is not None:
                args[existing] = value
            else:
                args[arg] = value
        components[name] = spec.model_copy(update={"args": args, "replicas": replicas})
    if errors:
        raise GraphError(errors)
    return graph.model_copy(update={"components": components})


# --------------------------------------------------------------------------------------------
# What the plan needs to know of a component module.


@dataclass(frozen=True)
class ComponentInfo:
    """A component module as the launcher sees it: its `Deployment` and its parser (in
    Dynamo-only mode when `load_component` made it: the engine's parser is never built)."""

    module: str
    deployment: type[BaseDeployment]
    parser: DynFlexibleArgumentParser[Any] | None = None

    def actions(self) -> Mapping[str, argparse.Action]:
        """The parser's flags (`--x` -> argparse action); empty without a parser.

        They come from the very parser `validate_plan` parses with, which is what makes the
        flags we write exactly the ones it accepts (an engine flag it does not know is written as
        one token the child's full parser reads: `dynamo_core.graph.render_arg`).
        """
        if self.parser is None:
            return {}
        return self.parser.option_actions()


def load_component(module: str) -> ComponentInfo:
    """Import a component module (never its engine) and read its `Deployment` and its parser,
    in Dynamo-only mode: planning, rendering and validating import no engine library.

    A component that is a package (run through its `__main__`) normally re-exports both; if it
    does not, they are taken from its `main` submodule, the conventional home of `main()`.
    """
    import importlib
    import importlib.util

    from dynamo_core.deploy import load_deployment, load_parser

    top = module.split(".")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        if top != module and importlib.util.find_spec(top) is not None:
            raise GraphError(
                f"module '{module}' not found ({top} is installed, but has no such module)"
            )
        hint = f" (pip install {top.replace('_', '-')})" if top.startswith("dynamo_") else ""
        raise GraphError(f"module '{module}' is not installed{hint}")
    source = module
    if found.submodule_search_locations is not None:
        package = importlib.import_module(module)
        if not hasattr(package, "Deployment") and importlib.util.find_spec(f"{module}.main"):
            source = f"{module}.main"
    return ComponentInfo(module, load_deployment(source), load_parser(source, engine=False))


def read_graph(
    path: str | Path, override_tokens: Sequence[str], only: Sequence[str] | None
) -> tuple[Graph, dict[str, ComponentInfo]]:
    """The step `dynamo serve` and `dynamo deploy` share before they plan: the graph file, the
    command-line overrides, `--only`, and each selected component's module (`load_component`).
    Raises `GraphError`, each problem naming its component."""
    graph = load_graph(path)
    graph = apply_overrides(graph, parse_overrides(override_tokens, graph.components))
    selected = _select(graph, only)  # raises the error naming unknown --only names
    infos: dict[str, ComponentInfo] = {}
    errors: list[str] = []
    for name in selected:
        try:
            infos[name] = load_component(graph.components[name].module)
        except GraphError as exc:
            errors += [f"{path}, component '{name}': {e}" for e in exc.errors]
        except Exception as exc:  # a broken component module: say which
            errors.append(f"{path}, component '{name}': {exc}")
    if errors:
        raise GraphError(errors)
    return graph, infos


# --------------------------------------------------------------------------------------------
# The plan.


@dataclass(frozen=True)
class ProcessPlan:
    """One process: exactly what runs, and the variables set on top of the caller's env."""

    component: str
    replica: int  # 1-based
    label: str  # "frontend", or "backend.2" when the component has replicas
    argv: tuple[str, ...]
    env: dict[str, str]
    gpus: tuple[str, ...] = ()

    def shell_command(self) -> str:
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*assignments, *(shlex.quote(a) for a in self.argv)])


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    module: str
    replicas: int
    args: dict[str, Any]  # as in the graph, overrides applied
    flags: tuple[str, ...]
    env: dict[str, str]  # without CUDA_VISIBLE_DEVICES (per process)
    resources: Resources
    health_http_port_arg: str | None
    processes: tuple[ProcessPlan, ...]


@dataclass(frozen=True)
class Plan:
    namespace: str
    components: tuple[ComponentPlan, ...]
    #: What every process gets from the launcher (DYN_NAMESPACE, backend settings).
    launcher_env: dict[str, str]
    cwd: str
    skipped: tuple[str, ...] = field(default=())  # components left out by --only

    @property
    def processes(self) -> list[ProcessPlan]:
        return [p for c in self.components for p in c.processes]

    def component(self, name: str) -> ComponentPlan:
        return next(c for c in self.components if c.name == name)


def parse_gpus(text: str | None) -> list[str] | None:
    """`"0,1,3"` -> `["0", "1", "3"]`; None or "" when nothing is known."""
    if text is None:
        return None
    return [g.strip() for g in text.split(",") if g.strip()]


def _select(graph: Graph, only: Sequence[str] | None) -> list[str]:
    names = list(graph.components)
    if not only:
        return names
    unknown = [n for n in only if n not in graph.components]
    if unknown:
        raise GraphError(
            [
                f"--only {n}: no component '{n}'{_suggest(n, names)} (components: {', '.join(names)})"
                for n in unknown
            ]
        )
    return [n for n in names if n in only]


def build_plan(
    graph: Graph,
    components: Mapping[str, ComponentInfo],
    *,
    only: Sequence[str] | None = None,
    namespace: str | None = None,
    runtime_env: Mapping[str, str] | None = None,
    gpus: Sequence[str] | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
) -> Plan:
    """One `ProcessPlan` per process of the selected components.

    `components` maps each selected component name to its module's `ComponentInfo`; `gpus` are
    the devices to hand out (from `--gpus` or the caller's `CUDA_VISIBLE_DEVICES`; None: none
    known); `runtime_env` holds the backend settings given as flags (`DYN_REQUEST_PLANE`, ...).
    """
    selected = _select(graph, only)
    ns = namespace or graph.namespace or "dynamo"
    launcher_env = {"DYN_NAMESPACE": ns, **(runtime_env or {})}
    pool = list(gpus or [])
    errors: list[str] = []
    demands: list[str] = []
    planned: list[ComponentPlan] = []
    for name in selected:
        spec = graph.components[name]
        info = components[name]
        deployment = info.deployment
        replicas = spec.replicas if spec.replicas is not None else deployment.replicas
        base = deployment.resources_for(spec.args)
        resources = spec.resources.over(base) if spec.resources else base
        flags = tuple(render_args(spec.args, info.actions()))
        argv = (*deployment.launch_prefix(spec.args), python, "-m", spec.module, *flags)
        env = {**component_env(graph, name, deployment.env), **launcher_env}
        if resources.gpu:
            demands.append(f"{name}: {replicas} x {resources.gpu}")
        processes: list[ProcessPlan] = []
        for replica in range(1, replicas + 1):
            assigned: tuple[str, ...] = ()
            if resources.gpu:
                if len(pool) < resources.gpu:
                    errors.append(
                        f"component '{name}' replica {replica} needs {resources.gpu} GPU(s)"
                    )
                    pool = []
                else:
                    assigned, pool = tuple(pool[: resources.gpu]), pool[resources.gpu :]
            proc_env = dict(env)
            if assigned:
                proc_env["CUDA_VISIBLE_DEVICES"] = ",".join(assigned)
            label = name if replicas == 1 else f"{name}.{replica}"
            processes.append(ProcessPlan(name, replica, label, argv, proc_env, assigned))
        planned.append(
            ComponentPlan(
                name=name,
                module=spec.module,
                replicas=replicas,
                args=dict(spec.args),
                flags=flags,
                env=env,
                resources=resources,
                health_http_port_arg=deployment.health_http_port_arg,
                processes=tuple(processes),
            )
        )
    if errors:
        have = ",".join(gpus) if gpus else "none"
        raise GraphError(
            f"not enough GPUs: {'; '.join(errors)} (wanted per component: {', '.join(demands)}; "
            f"available: {have}; give them with --gpus 0,1,... or CUDA_VISIBLE_DEVICES)"
        )
    return Plan(
        namespace=ns,
        components=tuple(planned),
        launcher_env=launcher_env,
        cwd=cwd if cwd is not None else os.getcwd(),
        skipped=tuple(n for n in graph.components if n not in selected),
    )


#: Each component's one parse in the launcher (its first process's flags and environment).
Resolved = dict[str, "ParsedArgs[Any]"]


def validate_plan(
    plan: Plan,
    components: Mapping[str, ComponentInfo],
    *,
    base_env: Mapping[str, str] | None = None,
    where: str = "graph",
    check_paths: bool = True,
) -> Resolved:
    """Ask each component's own parser whether it accepts its flags and environment: one parse
    per component (`resolve`), whose results the launcher keeps (the health port, ...).

    `base_env` is the environment the processes inherit (`dynamo deploy`: none, a pod's own);
    `check_paths`: input paths must exist here (`dynamo serve`; in an image they need not).
    Raises `GraphError` with one message per problem, each naming the component and the arg.
    """
    environ = os.environ if base_env is None else base_env
    errors: list[str] = []
    resolved: Resolved = {}
    for comp in plan.components:
        info = components[comp.name]
        if info.parser is None:
            continue
        process = comp.processes[0] if comp.processes else None
        env = {**environ, **(process.env if process else comp.env)}
        outcome = info.parser.resolve(list(comp.flags), environ=env)
        for message in outcome.errors:
            message = message.replace(" on command line", "")
            errors.append(f"{where}, component '{comp.name}' ({comp.module}): {message}")
        if outcome.parsed is not None:
            resolved[comp.name] = outcome.parsed
        if check_paths:
            errors += [
                f"{where}, component '{comp.name}' ({comp.module}): {message}"
                for message in _missing_paths(comp, info, plan.cwd)
            ]
    if errors:
        raise GraphError(errors)
    return resolved


def flag_value(parsed: ParsedArgs[Any], flag: str) -> Any:
    """A parsed flag's value, Dynamo's or (passed through, in Dynamo-only mode) the engine's."""
    attr = flag.lstrip("-").replace("-", "_")
    value = getattr(parsed.config, attr, None)
    if value is None and parsed.engine_args is not None:
        value = getattr(parsed.engine_args, attr, None)
    return value


def _is_path_type(annotation: Any) -> bool:
    import types
    import typing

    if annotation is Path:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest == [Path]
    return False


def _missing_paths(comp: ComponentPlan, info: ComponentInfo, cwd: str) -> list[str]:
    """Args typed `Path` by the component's config (inputs such as `--model-path`) that name
    nothing: caught here, rather than by a process that would exit at start, again and again.
    Runtime settings (`file-kv`, a folder created on demand) are not inputs and are skipped."""
    from dynamo_core.runtime import RuntimeConfig

    if info.parser is None:
        return []
    fields = info.parser.config_model.model_fields
    problems = []
    for key, value in comp.args.items():
        name = str(key).lstrip("-").replace("-", "_")
        f = fields.get(name)
        if f is None or name in RuntimeConfig.model_fields or not _is_path_type(f.annotation):
            continue
        if isinstance(value, str | Path) and not (Path(cwd) / value).exists():
            problems.append(
                f"{key}: {value} does not exist (relative paths resolve against {cwd}, "
                "where dynamo serve runs)"
            )
    return problems


def format_dry_run(plan: Plan) -> str:
    """The commands of the plan, one per process, ready to paste into a shell."""
    lines = [
        f"# namespace {plan.namespace}: {len(plan.processes)} process(es); "
        "relative paths resolve against the directory below",
        f"cd {shlex.quote(plan.cwd)}",
    ]
    if plan.skipped:
        lines.append(f"# not run here (--only): {', '.join(plan.skipped)}")
    for comp in plan.components:
        if not comp.processes:
            lines.append(f"# {comp.name}: 0 replicas")
        for process in comp.processes:
            lines.append(f"# {process.label}")
            lines.append(process.shell_command())
    return "\n".join(lines) + "\n"
