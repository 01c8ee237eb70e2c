"""`dynamo deploy GRAPH --image IMAGE`: Kubernetes manifests from the graph file `dynamo serve` runs.

    dynamo deploy examples/graphs/agg.yaml --image registry.example.com/dynamo:0.1 > manifests.yaml
    kubectl apply -f manifests.yaml
    dynamo deploy graph.yaml --image IMG --output manifests/ --k8s-namespace llm
    dynamo deploy graph.yaml --image IMG --etcd-endpoints http://etcd.infra:2379 \\
        --nats-server nats://nats.infra:4222 --backend.replicas 4

What is rendered (`manifests`, a pure function of the graph and the component modules' `Deployment`
classes and parsers, tested without a cluster):

- a `ConfigMap` holding the graph file (for reference: mounted nowhere);
- unless `--etcd-endpoints` is given, a one-member etcd (`StatefulSet` + `Service`); unless
  `--nats-server` is given or no plane uses NATS, one NATS server (`Deployment` + `Service`);
- per component, a `Deployment` whose container runs exactly
  `[*Deployment.launch_prefix(args), "python", "-m", module, *flags]`, the flags being the very ones
  `dynamo serve` would pass (`graph.build_plan` writes both, through the component's own parser);
  and, for a component with an HTTP port (`Deployment.health_http_port_arg`: the frontend), a
  `Service` on it (`--service-type`) and readiness/liveness probes (`GET /health`, `GET /live`).

Choices worth knowing in review:

- **The same validation as `dynamo serve`, minus the machine**: graph file, overrides, `--only`,
  component modules (`read_graph`, shared with serve), replica counts, and every component's
  flags handed to its own parser once (`validate_plan`, Dynamo-only: no engine is imported), with
  the environment its pods will have. Not checked: GPUs (the cluster schedules
  them: `nvidia.com/gpu` limits, and the device plugin sets the visible devices, so no
  `CUDA_VISIBLE_DEVICES` is written), and input paths (`model-path: examples/models/tiny`):
  they live in the image, not on the machine that renders, and resolve against the image's
  working directory.
- **Backends on Kubernetes**: discovery is `etcd` (pods come and go on many nodes); the request and
  event planes default to `nats` (`--request-plane tcp` / `--event-plane tcp` for direct
  connections, then each pod advertises its own IP as `DYN_TCP_HOST`, from the downward API).
  These variables, `DYN_NAMESPACE`, `ETCD_ENDPOINTS` and `NATS_SERVER` are set the way
  `dynamo serve` sets them: above the module's, the graph's and the component's `env`.
- **Probes**: a component with an HTTP API (the frontend) is probed on that port; every other
  component gets the runtime's status port (`DYN_SYSTEM_PORT`, 9090 unless its env sets it):
  `/health` is ready once the process serves its endpoints (a worker still loading its model, or
  draining after SIGTERM, is not), `/live` answers while the process does.
- **Names**: `<dynamo namespace>-<component>` (DNS labels), so two graphs can share a Kubernetes
  namespace; `--k8s-namespace` sets `metadata.namespace` on every object (default: none, the
  current context's). Images: `--image`, else the component's `Deployment.image`.
- **GPU pods get a memory-backed `/dev/shm`**: a container's default 64 MiB is too small for
  NCCL and the engines' multi-process tensor parallelism (`docker run --shm-size` elsewhere).
- **`terminationGracePeriodSeconds`** is the components' drain (`graceful_shutdown_timeout`, 30 s)
  plus ten, as `dynamo serve --grace-period` is by default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dynamo_serve import _k8s
from dynamo_serve._k8s import Manifest
from dynamo_serve.graph import (
    ComponentInfo,
    ComponentPlan,
    Graph,
    GraphError,
    Plan,
    Resolved,
    build_plan,
    flag_value,
    read_graph,
    validate_plan,
)

__all__ = [
    "ETCD_IMAGE",
    "NATS_IMAGE",
    "DeployOptions",
    "build_parser",
    "cluster_plan",
    "main",
    "manifests",
    "prepare",
    "render",
    "runtime_env",
    "write_manifests",
]

PROG = "dynamo deploy"

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
NATS_IMAGE = "nats:2.10"

Plane = Literal["nats", "tcp"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]

_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")

#: The components' own drain on SIGTERM (RuntimeConfig.graceful_shutdown_timeout) plus margin.
#: The status port of components without an HTTP API (`DYN_SYSTEM_PORT`).
SYSTEM_PORT = 9090
GRACE_PERIOD_S = 40


@dataclass(frozen=True)
class DeployOptions:
    """What `dynamo deploy` adds to a graph: where it runs and how its backends are reached."""

    image: str | None = None
    k8s_namespace: str | None = None
    namespace: str | None = None  # Dynamo namespace (DYN_NAMESPACE); default: the graph's
    only: tuple[str, ...] | None = None
    service_type: ServiceType = "ClusterIP"
    etcd_endpoints: str | None = None  # given: no etcd rendered
    nats_server: str | None = None  # given: no NATS rendered
    etcd_image: str = ETCD_IMAGE
    nats_image: str = NATS_IMAGE
    request_plane: Plane = "nats"
    event_plane: Plane = "nats"
    graph_file: str = "graph.yaml"  # the graph file's name (the ConfigMap's key)
    graph_text: str | None = None  # the graph file itself, for the ConfigMap
    overrides: tuple[str, ...] = field(default=())  # as typed, noted on the ConfigMap

    @property
    def uses_nats(self) -> bool:
        return "nats" in (self.request_plane, self.event_plane)

    @property
    def uses_tcp(self) -> bool:
        return "tcp" in (self.request_plane, self.event_plane)


def _object_name(namespace: str, part: str) -> str:
    return _k8s.dns_label(namespace, part, what=f"name of '{part}' in namespace '{namespace}'")


def runtime_env(options: DeployOptions, namespace: str) -> dict[str, str]:
    """The backend settings every pod gets (`dynamo serve` would take them as flags)."""
    env = {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "DYN_REQUEST_PLANE": options.request_plane,
        "DYN_EVENT_PLANE": options.event_plane,
        "ETCD_ENDPOINTS": options.etcd_endpoints
        or f"http://{_object_name(namespace, 'etcd')}:{_k8s.ETCD_CLIENT_PORT}",
    }
    if options.uses_nats or options.nats_server:
        env["NATS_SERVER"] = (
            options.nats_server
            or f"nats://{_object_name(namespace, 'nats')}:{_k8s.NATS_CLIENT_PORT}"
        )
    return env


def _gpu_demand(graph: Graph, infos: Mapping[str, ComponentInfo]) -> int:
    total = 0
    for name, info in infos.items():
        spec = graph.components[name]
        base = info.deployment.resources_for(spec.args)
        gpu = (spec.resources.over(base) if spec.resources else base).gpu
        replicas = spec.replicas if spec.replicas is not None else info.deployment.replicas
        total += gpu * replicas
    return total


def cluster_plan(graph: Graph, infos: Mapping[str, ComponentInfo], options: DeployOptions) -> Plan:
    """`graph.build_plan` for the cluster: `python` from the image's PATH, the backend settings
    above, and as many placeholder GPUs as asked for (the scheduler finds the real ones)."""
    ns = options.namespace or graph.namespace or "dynamo"
    selected = {n: i for n, i in infos.items() if not options.only or n in options.only}
    return build_plan(
        graph,
        infos,
        only=options.only,
        namespace=ns,
        runtime_env=runtime_env(options, ns),
        gpus=[str(i) for i in range(_gpu_demand(graph, selected))],
        python="python",
        cwd="",
    )


def _http_port(comp: ComponentPlan, resolved: Resolved) -> int | None:
    """The value of the component's `health_http_port_arg`, as its parser resolved it (so a
    default port counts too)."""
    arg = comp.health_http_port_arg
    parsed = resolved.get(comp.name)
    if arg is None or parsed is None:
        return None
    value = flag_value(parsed, arg)
    if not value:
        raise GraphError(
            f"component '{comp.name}': its health port ({arg}) must be a fixed port on Kubernetes, "
            f"not {value!r}"
        )
    return int(value)


def _labels(plan: Plan, component: str, app: str) -> dict[str, str]:
    return {
        _k8s.NAME: _k8s.label_value(app, what=f"name of component '{component}'"),
        _k8s.PART_OF: _k8s.label_value(plan.namespace, what="namespace"),
        _k8s.COMPONENT: _k8s.label_value(component, what="component name"),
        _k8s.MANAGED_BY: "dynamo-deploy",
    }


def _component(
    plan: Plan,
    comp: ComponentPlan,
    info: ComponentInfo,
    options: DeployOptions,
    resolved: Resolved,
) -> list[Manifest]:
    name = _object_name(plan.namespace, comp.name)
    labels = _labels(plan, comp.name, info.deployment.name)
    image = options.image or info.deployment.image
    if not image:
        raise GraphError(
            f"component '{comp.name}' ({comp.module}): no image (give --image, or set "
            "Deployment.image in the module)"
        )
    command = [*info.deployment.launch_prefix(comp.args), "python", "-m", comp.module, *comp.flags]
    port = _http_port(comp, resolved)
    annotations = {f"{_k8s.PREFIX}/module": comp.module}
    env = dict(comp.env)
    if port:
        ports = [("http", port)]
        probe_port = "http"
    else:
        # a worker: the runtime's status port answers /health once it serves its endpoints
        env.setdefault("DYN_SYSTEM_PORT", str(SYSTEM_PORT))
        ports = [("status", int(env["DYN_SYSTEM_PORT"]))]
        probe_port = "status"
    readiness = _k8s.http_probe("/health", probe_port, period=5, failures=3)
    liveness = _k8s.http_probe("/live", probe_port, period=10, failures=6)
    res = comp.resources
    box = _k8s.container(
        comp.name.lower().replace("_", "-"),
        image,
        command=command,
        env=_k8s.env_list(env, pod_ip_as=["DYN_TCP_HOST"] if options.uses_tcp else []),
        ports=ports,
        resources=_k8s.resources(res.cpu, res.memory, res.gpu),
        readiness=readiness,
        liveness=liveness,
        mounts=[("dshm", "/dev/shm")] if res.gpu else (),
    )
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}] if res.gpu else None
    template = _k8s.pod_template(labels, [box], grace_period=GRACE_PERIOD_S, volumes=volumes)
    meta = _k8s.metadata(name, labels, options.k8s_namespace, annotations)
    objs = [_k8s.deployment(meta, comp.replicas, template, labels)]
    if port:  # only HTTP APIs get a Service; workers are found through etcd
        svc_meta = _k8s.metadata(name, labels, options.k8s_namespace)
        objs.append(_k8s.service(svc_meta, labels, ports, service_type=options.service_type))
    return objs


def _infrastructure(plan: Plan, options: DeployOptions) -> list[Manifest]:
    ns = plan.namespace
    objs: list[Manifest] = []
    if not options.etcd_endpoints:
        labels = _labels(plan, "etcd", "etcd")
        objs += _k8s.etcd(
            _object_name(ns, "etcd"), labels, options.k8s_namespace, options.etcd_image
        )
    if options.uses_nats and not options.nats_server:
        labels = _labels(plan, "nats", "nats")
        objs += _k8s.nats(
            _object_name(ns, "nats"), labels, options.k8s_namespace, options.nats_image
        )
    return objs


def _graph_config_map(plan: Plan, options: DeployOptions) -> list[Manifest]:
    if options.graph_text is None:
        return []
    labels = _labels(plan, "graph", "dynamo-graph")
    annotations = {f"{_k8s.PREFIX}/graph-file": options.graph_file}
    if options.overrides:
        annotations[f"{_k8s.PREFIX}/overrides"] = " ".join(options.overrides)
    if options.only:
        annotations[f"{_k8s.PREFIX}/only"] = ",".join(options.only)
    meta = _k8s.metadata(
        _object_name(plan.namespace, "graph"), labels, options.k8s_namespace, annotations
    )
    key = Path(options.graph_file).name
    if not _CONFIG_KEY.match(key):
        key = "graph.yaml"  # a file name Kubernetes would not take as a key
    return [_k8s.config_map(meta, {key: options.graph_text})]


def _check_names(plan: Plan, options: DeployOptions) -> None:
    """Components whose Kubernetes names collide with each other or with what we add."""
    taken: dict[str, str] = {}
    reserved = ["graph"]
    if not options.etcd_endpoints:
        reserved.append("etcd")
    if options.uses_nats and not options.nats_server:
        reserved.append("nats")
    for part in reserved:
        taken[_object_name(plan.namespace, part)] = f"the {part} objects dynamo deploy adds"
    errors = []
    for comp in plan.components:
        name = _object_name(plan.namespace, comp.name)
        if name in taken:
            errors.append(
                f"component '{comp.name}': Kubernetes name '{name}' clashes with {taken[name]}"
            )
        taken[name] = f"component '{comp.name}'"
    if errors:
        raise GraphError(errors)


def render(
    plan: Plan,
    infos: Mapping[str, ComponentInfo],
    options: DeployOptions,
    resolved: Resolved,
) -> list[Manifest]:
    """The objects of a validated plan (`resolved`: each component's parse, from
    `validate_plan`), in the order `kubectl apply` should create them."""
    _check_names(plan, options)
    objs = _graph_config_map(plan, options) + _infrastructure(plan, options)
    errors: list[str] = []
    for comp in plan.components:
        try:
            objs += _component(plan, comp, infos[comp.name], options, resolved)
        except GraphError as exc:
            errors += exc.errors
    if errors:
        raise GraphError(errors)
    return objs


def manifests(
    graph: Graph,
    infos: Mapping[str, ComponentInfo],
    options: DeployOptions,
    *,
    where: str = "graph",
) -> list[Manifest]:
    """Graph (overrides applied) -> Kubernetes objects; `GraphError` lists every problem."""
    plan = cluster_plan(graph, infos, options)
    # serve's validation minus the machine: no caller environment, no input paths (in the image)
    resolved = validate_plan(plan, infos, base_env={}, where=where, check_paths=False)
    return render(plan, infos, options, resolved)


# --------------------------------------------------------------------------------------------
# The command.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Render Kubernetes manifests for an inference graph: a Deployment per "
        "component (the same `python -m <module> <flags>` as dynamo serve), Services, etcd "
        "and NATS. Writes YAML to stdout (or --output DIR); applies nothing.",
        epilog="Overrides: --<component>.<arg> VALUE sets a component's arg; --<component>.replicas "
        "N its replica count.",
        allow_abbrev=False,
    )
    parser.add_argument("graph", metavar="GRAPH", help="Graph file (YAML).")
    parser.add_argument(
        "--image",
        help="Container image of every component (default: each module's Deployment.image). It "
        "must hold the component packages and any relative path the graph names.",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="Write one file per object into DIR (created if needed) instead of stdout.",
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", action="append", help="Render only these components."
    )
    parser.add_argument("--namespace", help="Dynamo namespace (default: the graph's).")
    parser.add_argument(
        "--k8s-namespace",
        metavar="NAME",
        help="metadata.namespace of every object (default: none, the current context's).",
    )
    parser.add_argument(
        "--service-type",
        choices=["ClusterIP", "NodePort", "LoadBalancer"],
        default="ClusterIP",
        help="Type of the frontend's Service (default ClusterIP).",
    )
    backends = parser.add_argument_group("backends")
    backends.add_argument(
        "--etcd-endpoints", metavar="URL", help="Use this etcd (no etcd is rendered)."
    )
    backends.add_argument(
        "--nats-server", metavar="URL", help="Use this NATS server (no NATS is rendered)."
    )
    backends.add_argument("--etcd-image", default=ETCD_IMAGE, help=f"Default {ETCD_IMAGE}.")
    backends.add_argument("--nats-image", default=NATS_IMAGE, help=f"Default {NATS_IMAGE}.")
    backends.add_argument(
        "--request-plane",
        choices=["nats", "tcp"],
        default="nats",
        help="How requests reach workers (default nats; tcp: direct, to each pod's IP).",
    )
    backends.add_argument(
        "--event-plane",
        choices=["nats", "tcp"],
        default="nats",
        help="How KV events and load metrics travel (default nats).",
    )
    return parser


def _only(values: Sequence[str] | None) -> tuple[str, ...] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return tuple(names) or None


def prepare(
    args: argparse.Namespace, override_tokens: Sequence[str]
) -> tuple[Graph, dict[str, ComponentInfo], DeployOptions]:
    """Read the graph and its component modules; everything `manifests` needs. Raises
    `GraphError`, each problem naming its component, as `dynamo serve` does."""
    only = _only(args.only)
    graph, infos = read_graph(args.graph, override_tokens, only)
    options = DeployOptions(
        image=args.image,
        k8s_namespace=args.k8s_namespace,
        namespace=args.namespace,
        only=only,
        service_type=args.service_type,
        etcd_endpoints=args.etcd_endpoints,
        nats_server=args.nats_server,
        etcd_image=args.etcd_image,
        nats_image=args.nats_image,
        request_plane=args.request_plane,
        event_plane=args.event_plane,
        graph_file=os.path.basename(args.graph),
        graph_text=Path(args.graph).read_text(encoding="utf-8"),
        overrides=tuple(override_tokens),
    )
    return graph, infos, options


def write_manifests(objs: Sequence[Manifest], directory: Path) -> list[Path]:
    """One file per object, numbered in creation order (`kubectl apply -f DIR` reads files in
    name order): `00-demo-graph-configmap.yaml`, ..."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, obj in enumerate(objs):
        path = directory / f"{i:02d}-{obj['metadata']['name']}-{obj['kind'].lower()}.yaml"
        path.write_text(_k8s.to_yaml(obj), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    from dynamo_serve.serve import split_overrides

    tokens = list(sys.argv[1:] if argv is None else argv)
    rest, override_tokens = split_overrides(tokens)
    args = build_parser().parse_args(rest)
    try:
        graph, infos, options = prepare(args, override_tokens)
        objs = manifests(graph, infos, options, where=str(args.graph))
    except GraphError as exc:
        sys.stderr.write("".join(f"{PROG}: error: {e}\n" for e in exc.errors))
        return 2
    if args.output:
        paths = write_manifests(objs, Path(args.output))
        sys.stderr.write(f"{PROG}: wrote {len(paths)} object(s) to {args.output}\n")
    else:
        sys.stdout.write(_k8s.to_yaml_stream(objs))
    return 0
