"""dynamo_serve.deploy: graph -> Kubernetes manifests, without a cluster.

The example graphs are rendered with the real component modules (frontend, mocker); the GPU
component is a small fake module written for the test (`Resources(gpu=2)`, an image and a launch
prefix of its own) on top of `serve_fakes.worker`'s parser. Every object rendered is validated
against the Kubernetes JSON schemas (strict: an unknown field is an error) by `kubernetes-validate`,
which ships them offline.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynamo_serve import cli, deploy, serve

HERE = Path(__file__).parent
REPO = HERE.parents[2]
GRAPHS = REPO / "examples" / "graphs"
IMAGE = "registry.example.com/dynamo:0.1"
K8S_VERSION = "1.30"

Manifest = dict[str, Any]


def render(
    capsys: pytest.CaptureFixture[str], *argv: str, image: str | None = IMAGE
) -> list[Manifest]:
    args = [*argv, *(["--image", image] if image else [])]
    rc = deploy.main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [d for d in yaml.safe_load_all(out) if d is not None]


def find(objs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, (
        f"{kind}/{name} in {[(o['kind'], o['metadata']['name']) for o in objs]}"
    )
    return matches[0]


def kinds(objs: list[Manifest]) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in objs]


def container(obj: Manifest) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    box: dict[str, Any] = containers[0]
    return box


def env_of(obj: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj).get("env", [])}


def serve_argvs(graph: Path, *extra: str) -> dict[str, list[str]]:
    """What `dynamo serve GRAPH --dry-run` would run, per component (python as `python`)."""
    rest, overrides = serve.split_overrides([str(graph), "--dry-run", *extra])
    plan, _ = serve.prepare(serve.build_parser().parse_args(rest), overrides, {})
    out = {}
    for comp in plan.components:
        argv = list(comp.processes[0].argv)
        i = argv.index("-m")
        argv[i - 1] = "python"
        out[comp.name] = argv
    return out


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # serve's plan (compared against below) checks input paths relative to the repository root
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


GPU_MODULE = """
from dynamo_core.deploy import BaseDeployment, Resources
from serve_fakes.worker import build_parser

__all__ = ["Deployment", "build_parser"]


class Deployment(BaseDeployment):
    name = "gpu-worker"
    resources = Resources(gpu=2, cpu="8", memory="32Gi")
    image = "registry.example.com/gpu-engine:1"

    @classmethod
    def launch_prefix(cls, args):
        return ["mpirun", "-n", "2"]
"""


@pytest.fixture
def gpu_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "deploy_gpu_fake.py").write_text(GPU_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = tmp_path / "gpu.yaml"
    graph.write_text(
        textwrap.dedent(
            """
            namespace: gpus
            env: {SHARED: "1"}
            components:
              frontend:
                module: dynamo_core.frontend
                args: {http-port: 9000}
              engine:
                module: deploy_gpu_fake
                replicas: 3
                env: {ONLY_ENGINE: "x"}
                args: {model-path: /models/big}
            """
        )
    )
    yield graph
    sys.modules.pop("deploy_gpu_fake", None)


# --------------------------------------------------------------------------------------------
# The example graphs.


def test_agg_objects_commands_env_resources_probes(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(capsys, str(GRAPHS / "agg.yaml"))
    assert kinds(objs) == [
        ("ConfigMap", "demo-graph"),
        ("Service", "demo-etcd"),
        ("StatefulSet", "demo-etcd"),
        ("Service", "demo-nats"),
        ("Deployment", "demo-nats"),
        ("Deployment", "demo-frontend"),
        ("Service", "demo-frontend"),
        ("Deployment", "demo-backend"),
    ]
    expected = serve_argvs(GRAPHS / "agg.yaml")
    front = find(objs, "Deployment", "demo-frontend")
    back = find(objs, "Deployment", "demo-backend")
    assert container(front)["command"] == expected["frontend"]
    assert container(back)["command"] == expected["backend"]
    assert container(back)["command"] == [
        "python", "-m", "dynamo_core.mocker", "--model-path", "examples/models/tiny",
    ]  # fmt: skip
    for obj in (front, back):
        status = {"DYN_SYSTEM_PORT": "9090"} if obj is back else {}
        assert env_of(obj) == {
            "DYN_NAMESPACE": "demo",
            "DYN_DISCOVERY_BACKEND": "etcd",
            "DYN_REQUEST_PLANE": "nats",
            "DYN_EVENT_PLANE": "nats",
            "ETCD_ENDPOINTS": "http://demo-etcd:2379",
            "NATS_SERVER": "nats://demo-nats:4222",
            **status,
        }
        assert container(obj)["image"] == IMAGE
        assert obj["spec"]["replicas"] == 1
        assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
        assert "namespace" not in obj["metadata"]
    # resources: the modules' Deployment.resources, requests = limits, no GPU
    assert container(front)["resources"] == {
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert container(back)["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    # labels and selectors
    assert front["metadata"]["labels"] == {
        "app.kubernetes.io/name": "frontend",
        "app.kubernetes.io/part-of": "demo",
        "app.kubernetes.io/component": "frontend",
        "app.kubernetes.io/managed-by": "dynamo-deploy",
    }
    assert back["metadata"]["labels"]["app.kubernetes.io/name"] == "mocker"
    assert back["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "demo",
        "app.kubernetes.io/component": "backend",
    }
    for obj in (front, back):
        template_labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    # probes on the frontend's HTTP port, and on the worker's status port (DYN_SYSTEM_PORT)
    box = container(front)
    assert box["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert box["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    worker = container(back)
    assert worker["ports"] == [{"name": "status", "containerPort": 9090, "protocol": "TCP"}]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/health", "port": "status"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/live", "port": "status"}
    # the frontend's Service
    svc = find(objs, "Service", "demo-frontend")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == front["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    # the graph file, as it is, in its ConfigMap
    cm = find(objs, "ConfigMap", "demo-graph")
    assert cm["data"] == {"agg.yaml": (GRAPHS / "agg.yaml").read_text()}
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "demo"


def test_agg_infrastructure(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(capsys, str(GRAPHS / "agg.yaml"), "--etcd-image", "etcd:x", "--nats-image", "n:y")
    etcd = find(objs, "StatefulSet", "demo-etcd")
    assert etcd["spec"]["replicas"] == 1
    assert etcd["spec"]["serviceName"] == "demo-etcd"
    assert container(etcd)["image"] == "etcd:x"
    assert "--advertise-client-urls=http://demo-etcd:2379" in container(etcd)["command"]
    assert find(objs, "Service", "demo-etcd")["spec"]["ports"][0]["port"] == 2379
    nats = find(objs, "Deployment", "demo-nats")
    assert container(nats)["image"] == "n:y"
    assert find(objs, "Service", "demo-nats")["spec"]["ports"][0]["port"] == 4222
    defaults = render(capsys, str(GRAPHS / "agg.yaml"))
    assert container(find(defaults, "StatefulSet", "demo-etcd"))["image"].startswith(
        "quay.io/coreos/etcd:v3.5."
    )
    assert container(find(defaults, "Deployment", "demo-nats"))["image"] == "nats:2.10"


def test_disagg_commands_match_serve(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(capsys, str(GRAPHS / "disagg.yaml"))
    expected = serve_argvs(GRAPHS / "disagg.yaml")
    assert set(expected) == {"frontend", "prefill", "decode"}
    for name, argv in expected.items():
        obj = find(objs, "Deployment", f"demo-disagg-{name}")
        assert container(obj)["command"] == argv
        assert env_of(obj)["DYN_NAMESPACE"] == "demo-disagg"
    prefill = container(find(objs, "Deployment", "demo-disagg-prefill"))["command"]
    assert prefill[-2:] == ["--disaggregation-mode", "prefill"]
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Service"] == [
        "demo-disagg-etcd",
        "demo-disagg-nats",
        "demo-disagg-frontend",
    ]


def test_agg_replicas_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    graph = GRAPHS / "agg-replicas.yaml"
    objs = render(capsys, str(graph))
    assert find(objs, "Deployment", "demo-backend")["spec"]["replicas"] == 2
    assert (
        container(find(objs, "Deployment", "demo-frontend"))["command"]
        == serve_argvs(graph)["frontend"]
    )
    extra = ["--backend.replicas", "3", "--frontend.http-port=9000"]
    objs = render(capsys, str(graph), *extra)
    assert find(objs, "Deployment", "demo-backend")["spec"]["replicas"] == 3
    front = find(objs, "Deployment", "demo-frontend")
    assert container(front)["command"] == serve_argvs(graph, *extra)["frontend"]
    assert container(front)["ports"][0]["containerPort"] == 9000
    assert find(objs, "Service", "demo-frontend")["spec"]["ports"][0]["port"] == 9000
    annotations = find(objs, "ConfigMap", "demo-graph")["metadata"]["annotations"]
    assert annotations["dynamo/overrides"] == "--backend.replicas 3 --frontend.http-port=9000"


def test_only_renders_the_chosen_components(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(capsys, str(GRAPHS / "disagg.yaml"), "--only", "prefill,decode")
    names = [n for k, n in kinds(objs) if k == "Deployment"]
    assert names == ["demo-disagg-nats", "demo-disagg-prefill", "demo-disagg-decode"]
    assert ("Service", "demo-disagg-frontend") not in kinds(objs)


# --------------------------------------------------------------------------------------------
# GPUs, images, launch prefixes.


def test_gpu_component(capsys: pytest.CaptureFixture[str], gpu_graph: Path) -> None:
    # no GPU here, none asked for: the cluster schedules them
    objs = render(capsys, str(gpu_graph))
    engine = find(objs, "Deployment", "gpus-engine")
    box = container(engine)
    assert box["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2},
    }
    assert engine["spec"]["replicas"] == 3
    assert box["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert engine["spec"]["template"]["spec"]["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    ]
    assert "volumes" not in find(objs, "Deployment", "gpus-frontend")["spec"]["template"]["spec"]
    assert box["command"] == [
        "mpirun", "-n", "2", "python", "-m", "deploy_gpu_fake", "--model-path", "/models/big",
    ]  # fmt: skip
    env = env_of(engine)
    assert env["SHARED"] == "1" and env["ONLY_ENGINE"] == "x"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert "ONLY_ENGINE" not in env_of(find(objs, "Deployment", "gpus-frontend"))
    assert engine["metadata"]["labels"]["app.kubernetes.io/name"] == "gpu-worker"
    assert (
        "nvidia.com/gpu"
        not in container(find(objs, "Deployment", "gpus-frontend"))["resources"]["limits"]
    )


def test_image_from_the_modules_deployment(
    capsys: pytest.CaptureFixture[str], gpu_graph: Path
) -> None:
    objs = render(capsys, str(gpu_graph), "--only", "engine", image=None)
    image = container(find(objs, "Deployment", "gpus-engine"))["image"]
    assert image == "registry.example.com/gpu-engine:1"


def test_frontend_without_image_is_an_error(
    capsys: pytest.CaptureFixture[str], gpu_graph: Path
) -> None:
    assert deploy.main([str(gpu_graph)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "dynamo deploy: error: component 'frontend' (dynamo_core.frontend): no image "
        "(give --image, or set Deployment.image in the module)\n"
    )


def test_image_flag_wins(capsys: pytest.CaptureFixture[str], gpu_graph: Path) -> None:
    objs = render(capsys, str(gpu_graph))
    assert {container(o)["image"] for o in objs if o["kind"] == "Deployment"} - {"nats:2.10"} == {
        IMAGE
    }


# --------------------------------------------------------------------------------------------
# Backends, namespaces, service type.


def test_existing_etcd_and_nats(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(
        capsys,
        str(GRAPHS / "agg.yaml"),
        "--etcd-endpoints",
        "http://etcd.infra:2379",
        "--nats-server",
        "nats://nats.infra:4222",
    )
    assert kinds(objs) == [
        ("ConfigMap", "demo-graph"),
        ("Deployment", "demo-frontend"),
        ("Service", "demo-frontend"),
        ("Deployment", "demo-backend"),
    ]
    env = env_of(find(objs, "Deployment", "demo-backend"))
    assert env["ETCD_ENDPOINTS"] == "http://etcd.infra:2379"
    assert env["NATS_SERVER"] == "nats://nats.infra:4222"


def test_tcp_planes(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(
        capsys, str(GRAPHS / "agg.yaml"), "--request-plane", "tcp", "--event-plane", "tcp"
    )
    assert not [n for _, n in kinds(objs) if "nats" in n]
    env = env_of(find(objs, "Deployment", "demo-backend"))
    assert env["DYN_REQUEST_PLANE"] == env["DYN_EVENT_PLANE"] == "tcp"
    assert env["DYN_TCP_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "NATS_SERVER" not in env
    # one plane on NATS: NATS is rendered
    objs = render(capsys, str(GRAPHS / "agg.yaml"), "--request-plane", "tcp")
    assert ("Deployment", "demo-nats") in kinds(objs)
    assert "DYN_TCP_HOST" in env_of(find(objs, "Deployment", "demo-backend"))


def test_namespaces(capsys: pytest.CaptureFixture[str]) -> None:
    objs = render(
        capsys, str(GRAPHS / "agg.yaml"), "--k8s-namespace", "llm", "--namespace", "prod_a"
    )
    assert {o["metadata"]["namespace"] for o in objs} == {"llm"}
    assert "prod-a-frontend" in [o["metadata"]["name"] for o in objs]
    assert env_of(find(objs, "Deployment", "prod-a-backend"))["DYN_NAMESPACE"] == "prod_a"


@pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
def test_service_type(capsys: pytest.CaptureFixture[str], kind: str) -> None:
    objs = render(capsys, str(GRAPHS / "agg.yaml"), "--service-type", kind)
    assert find(objs, "Service", "demo-frontend")["spec"]["type"] == kind
    assert find(objs, "Service", "demo-etcd")["spec"]["type"] == "ClusterIP"


def test_input_paths_are_not_checked_here(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # examples/models/tiny is in the image, not necessarily where dynamo deploy runs
    monkeypatch.chdir(tmp_path)
    objs = render(capsys, str(GRAPHS / "agg.yaml"))
    assert "examples/models/tiny" in container(find(objs, "Deployment", "demo-backend"))["command"]


# --------------------------------------------------------------------------------------------
# Output files.


def test_output_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    rc = deploy.main([str(GRAPHS / "agg.yaml"), "--image", IMAGE, "--output", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0 and stdout == ""
    assert "wrote 8 object(s)" in err
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "00-demo-graph-configmap.yaml",
        "01-demo-etcd-service.yaml",
        "02-demo-etcd-statefulset.yaml",
        "03-demo-nats-service.yaml",
        "04-demo-nats-deployment.yaml",
        "05-demo-frontend-deployment.yaml",
        "06-demo-frontend-service.yaml",
        "07-demo-backend-deployment.yaml",
    ]
    from_files = [yaml.safe_load((out / f).read_text()) for f in files]
    assert from_files == render(capsys, str(GRAPHS / "agg.yaml"))


# --------------------------------------------------------------------------------------------
# Validation: the same as dynamo serve's, one line per problem, exit 2, nothing on stdout.


def fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert deploy.main([*argv, "--image", IMAGE]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


def write_graph(tmp_path: Path, components: str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text("namespace: t\ncomponents:\n" + textwrap.indent(components, "  "))
    return path


def test_unknown_module(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    graph = write_graph(tmp_path, "backend: {module: dynamo_core.mockr}\n")
    err = fail(capsys, str(graph))
    assert err == (
        f"dynamo deploy: error: {graph}, component 'backend': module 'dynamo_core.mockr' not "
        "found (dynamo_core is installed, but has no such module)\n"
    )


def test_arg_rejected_by_the_components_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = fail(capsys, str(GRAPHS / "agg.yaml"), "--backend.modle-path", "x")
    assert err.count("\n") == 1
    assert err.startswith(
        f"dynamo deploy: error: {GRAPHS / 'agg.yaml'}, component 'backend' (dynamo_core.mocker): "
    )
    assert "--modle-path" in err and "--model-path" in err


def test_bad_replicas(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = fail(capsys, str(GRAPHS / "agg.yaml"), "--backend.replicas", "-1")
    assert err == ("dynamo deploy: error: --backend.replicas: expected an integer >= 0, got '-1'\n")
    graph = write_graph(tmp_path, "backend: {module: dynamo_core.mocker, replicas: two}\n")
    assert "components.backend.replicas" in fail(capsys, str(graph))


def test_unknown_only(capsys: pytest.CaptureFixture[str]) -> None:
    err = fail(capsys, str(GRAPHS / "agg.yaml"), "--only", "backnd")
    assert "--only backnd: no component 'backnd' (did you mean 'backend'?)" in err


def test_name_clash_with_etcd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    graph = write_graph(
        tmp_path, "etcd: {module: dynamo_core.mocker, args: {model-path: examples/models/tiny}}\n"
    )
    err = fail(capsys, str(graph))
    assert "component 'etcd': Kubernetes name 't-etcd' clashes with the etcd objects" in err
    objs = render(capsys, str(graph), "--etcd-endpoints", "http://e:2379")
    assert ("Deployment", "t-etcd") in kinds(objs)


def test_invalid_kubernetes_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text("namespace: 9lives\ncomponents: {backend: {module: dynamo_core.mocker}}\n")
    assert "is not a valid Kubernetes name" in fail(capsys, str(graph))


# --------------------------------------------------------------------------------------------
# The command.


def test_dynamo_deploy_via_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "deploy" in capsys.readouterr().out
    assert cli.main(["deploy", str(GRAPHS / "agg.yaml"), "--image", IMAGE]) == 0
    assert "kind: Deployment" in capsys.readouterr().out


def test_deploy_does_not_import_circus() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from dynamo_serve import cli\n"
        "buf = io.StringIO()\n"
        f"with contextlib.redirect_stdout(buf): rc = cli.main(['deploy', {str(GRAPHS / 'agg.yaml')!r}, '--image', 'i'])\n"
        "print(rc, 'circus' in sys.modules, 'zmq' in sys.modules, 'kind: Service' in buf.getvalue())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "0 False False True"


# --------------------------------------------------------------------------------------------
# Every object against the Kubernetes schemas.


VARIANTS = [
    ("agg.yaml",),
    ("agg.yaml", "--k8s-namespace", "llm", "--service-type", "LoadBalancer"),
    ("agg.yaml", "--request-plane", "tcp", "--event-plane", "tcp"),
    ("agg-replicas.yaml", "--backend.replicas", "0", "--service-type", "NodePort"),
    ("disagg.yaml", "--etcd-endpoints", "http://e:2379", "--nats-server", "nats://n:4222"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: " ".join(v))
def test_manifests_validate_against_kubernetes_schemas(
    capsys: pytest.CaptureFixture[str], variant: tuple[str, ...]
) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objs = render(capsys, str(GRAPHS / variant[0]), *variant[1:])
    for obj in objs:
        kv.validate(obj, K8S_VERSION, strict=True)


def test_gpu_manifests_validate(capsys: pytest.CaptureFixture[str], gpu_graph: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for obj in render(capsys, str(gpu_graph)):
        kv.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    # the check above is not vacuous: a misplaced field and a wrong type are rejected
    kv = pytest.importorskip("kubernetes_validate")
    good: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}]},
    }
    kv.validate(good, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**good, "spec": {"ports": [{"port": "80"}]}}, K8S_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**good, "spec": {"portz": []}}, K8S_VERSION, strict=True)
