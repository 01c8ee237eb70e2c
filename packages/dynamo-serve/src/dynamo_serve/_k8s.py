"""Kubernetes object builders for `dynamo deploy`: plain dicts, no client library.

Each function returns one object exactly as `kubectl apply` reads it, built only from the fields
it uses (so the tests can validate every object against the Kubernetes JSON schemas, strictly:
an unknown field is an error there). Nothing here knows about graphs or components; `deploy`
decides what to build and calls these.

Choices worth knowing in review:

- **Names**: object names must be DNS-1035 labels (a Service's name is one, and we name each
  component's Deployment and Service alike): lower-case letters, digits and '-', starting with a
  letter, at most 63 characters. `dns_label` derives one from a Dynamo name (`_` and `.` become
  `-`) and says so clearly when that is impossible, rather than letting `kubectl` refuse later.
- **Selectors are two labels** (`app.kubernetes.io/part-of` and `app.kubernetes.io/component`):
  enough to tell components and graphs apart, and nothing that would change when an image or a
  flag changes (a Deployment's selector is immutable once created).
- **etcd and NATS are the smallest thing that works**: one etcd member in a StatefulSet whose data
  lives in an `emptyDir` (discovery holds leases that the components renew, not data to keep), and
  one NATS server without JetStream (the runtime uses core NATS only). For production, point the
  graph at your own clusters with `--etcd-endpoints` / `--nats-server`.
- **YAML**: block style, keys in the order they were built (kind and metadata first, as people
  write them), multi-line strings (the graph file in its ConfigMap) as `|` literals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from dynamo_serve.graph import GraphError

Manifest = dict[str, Any]

#: Annotation and label keys of our own (a DNS-subdomain prefix, as Kubernetes wants).
PREFIX = "dynamo"

NAME = "app.kubernetes.io/name"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
NATS_CLIENT_PORT = 4222
NATS_MONITOR_PORT = 8222

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def dns_label(*parts: str, what: str) -> str:
    """`("demo", "back_end")` -> `"demo-back-end"`; `GraphError` naming `what` if impossible."""
    name = "-".join(p.lower().replace("_", "-").replace(".", "-") for p in parts if p)
    if len(name) > 63 or not _DNS_1035.match(name):
        raise GraphError(
            f"{what}: '{name}' is not a valid Kubernetes name (lower-case letters, digits and '-', "
            "starting with a letter, at most 63 characters); choose another name or --namespace"
        )
    return name


def label_value(value: str, *, what: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise GraphError(
            f"{what}: '{value}' is not a valid Kubernetes label value (letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit, at most 63 characters)"
        )
    return value


def metadata(
    name: str,
    labels: Mapping[str, str],
    k8s_namespace: str | None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if k8s_namespace:
        meta["namespace"] = k8s_namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def selector_of(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in (PART_OF, COMPONENT)}


def env_list(env: Mapping[str, str], *, pod_ip_as: Iterable[str] = ()) -> list[dict[str, Any]]:
    """`{"A": "1"}` -> `[{"name": "A", "value": "1"}]`, plus variables set to the pod's IP."""
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    out += [
        {"name": var, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} for var in pod_ip_as
    ]
    return out


def resources(cpu: str, memory: str, gpu: int = 0) -> dict[str, Any]:
    """Requests = limits for CPU and memory (the Guaranteed QoS class: an inference process is
    not evicted first, nor throttled below what it asked for); GPUs, an extended resource, are
    given as limits only (Kubernetes sets the request equal)."""
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpu:
        limits["nvidia.com/gpu"] = gpu
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def http_probe(path: str, port: str | int, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def container(
    name: str,
    image: str,
    *,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    env: list[dict[str, Any]] | None = None,
    ports: Sequence[tuple[str, int]] = (),
    resources: dict[str, Any] | None = None,
    readiness: dict[str, Any] | None = None,
    liveness: dict[str, Any] | None = None,
    mounts: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": image}
    if command is not None:
        c["command"] = list(command)
    if args is not None:
        c["args"] = list(args)
    if env:
        c["env"] = env
    if ports:
        c["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    if resources is not None:
        c["resources"] = resources
    if readiness is not None:
        c["readinessProbe"] = readiness
    if liveness is not None:
        c["livenessProbe"] = liveness
    if mounts:
        c["volumeMounts"] = [{"name": n, "mountPath": p} for n, p in mounts]
    return c


def pod_template(
    labels: Mapping[str, str],
    containers: list[dict[str, Any]],
    *,
    annotations: Mapping[str, str] | None = None,
    grace_period: int | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {"containers": containers}
    if grace_period is not None:
        spec["terminationGracePeriodSeconds"] = grace_period
    if volumes:
        spec["volumes"] = volumes
    return {"metadata": meta, "spec": spec}


def deployment(
    meta: dict[str, Any], replicas: int, template: dict[str, Any], labels: Mapping[str, str]
) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_of(labels)},
            "template": template,
        },
    }


def service(
    meta: dict[str, Any],
    labels: Mapping[str, str],
    ports: Sequence[tuple[str, int]],
    *,
    service_type: str = "ClusterIP",
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": service_type,
            "selector": selector_of(labels),
            "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports],
        },
    }


def config_map(meta: dict[str, Any], data: Mapping[str, str]) -> Manifest:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(data)}


def etcd(
    name: str, labels: Mapping[str, str], k8s_namespace: str | None, image: str
) -> list[Manifest]:
    """A one-member etcd: its Service (clients: `http://<name>:2379`) and its StatefulSet."""
    ports = [("client", ETCD_CLIENT_PORT), ("peer", ETCD_PEER_PORT)]
    command = [
        "/usr/local/bin/etcd",
        f"--name={name}",
        "--data-dir=/var/run/etcd/data",
        f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
        f"--advertise-client-urls=http://{name}:{ETCD_CLIENT_PORT}",
        f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
    ]
    box = container(
        "etcd",
        image,
        command=command,
        ports=ports,
        resources=resources("250m", "512Mi"),
        readiness=http_probe("/health", "client", period=5, failures=3),
        liveness={"tcpSocket": {"port": "client"}, "periodSeconds": 10, "failureThreshold": 6},
        mounts=[("data", "/var/run/etcd")],
    )
    template = pod_template(labels, [box], volumes=[{"name": "data", "emptyDir": {}}])
    stateful_set: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(name, labels, k8s_namespace),
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": selector_of(labels)},
            "template": template,
        },
    }
    svc = service(metadata(name, labels, k8s_namespace), labels, ports[:1])
    return [svc, stateful_set]


def nats(
    name: str, labels: Mapping[str, str], k8s_namespace: str | None, image: str
) -> list[Manifest]:
    """One NATS server: its Service (clients: `nats://<name>:4222`) and its Deployment."""
    ports = [("client", NATS_CLIENT_PORT), ("monitor", NATS_MONITOR_PORT)]
    box = container(
        "nats",
        image,
        args=["--port", str(NATS_CLIENT_PORT), "--http_port", str(NATS_MONITOR_PORT)],
        ports=ports,
        resources=resources("250m", "256Mi"),
        readiness=http_probe("/healthz", "monitor", period=5, failures=3),
        liveness=http_probe("/healthz", "monitor", period=10, failures=6),
    )
    template = pod_template(labels, [box])
    return [
        service(metadata(name, labels, k8s_namespace), labels, ports[:1]),
        deployment(metadata(name, labels, k8s_namespace), 1, template, labels),
    ]


# --------------------------------------------------------------------------------------------
# YAML.


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: Manifest) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def to_yaml_stream(objs: Sequence[Manifest]) -> str:
    """Several objects as one YAML stream (`---` between them), as `kubectl apply -f -` reads."""
    return "---\n".join(to_yaml(o) for o in objs)
