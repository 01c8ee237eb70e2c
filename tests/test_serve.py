"""`dynamo serve` end to end: real processes, the real frontend and mocker, the OpenAI client.

Each test has its own file-discovery folder (`DYN_FILE_KV`), namespace and HTTP port, and stops
every process it started (the `serve` fixture stops `dynamo serve`, then SIGKILLs any process of
the graph still alive, so a failing test leaks nothing and says so). Waits are on events: a line
of `dynamo serve`'s output, a discovery watch; HTTP readiness is polled with a deadline, as nothing
announces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from dynamo_core.runtime import RuntimeConfig
from dynamo_core.runtime.discovery import keys, open_discovery
from dynamo_core.testing.procs import Proc, run_python

ROOT = Path(__file__).resolve().parents[1]
AGG = "examples/graphs/agg.yaml"
AGG_REPLICAS = "examples/graphs/agg-replicas.yaml"
ROUTER = "examples/graphs/router.yaml"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Graph:
    """One `dynamo serve` run and what a test needs to look at it."""

    def __init__(self, proc: Proc, namespace: str, port: int, kv: Path) -> None:
        self.proc = proc
        self.namespace = namespace
        self.port = port
        self.kv = kv

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=30)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.proc.wait_for_line("stop: Ctrl-C", timeout)  # the summary's last line

    def pids(self) -> set[int]:
        """Every process below `dynamo serve` (its components and anything they started)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        return set()

    def pid_of(self, label: str) -> int:
        line = self.proc.wait_for_line(f"{label} ready")
        match = re.search(r"pid (\d+)", line)
        assert match, line
        return int(match.group(1))

    def instances(self, component: str = "backend") -> dict[str, int]:
        """Instance key -> pid, as discovery holds them now."""
        return asyncio.run(instances(self.kv, self.namespace, component))


async def instances(kv: Path, namespace: str, component: str) -> dict[str, int]:
    import json

    discovery = open_discovery(RuntimeConfig.model_validate({"file_kv": kv}))
    await discovery.start()
    try:
        found = await discovery.get_prefix(keys.instances_prefix(namespace, component, "generate"))
        return {k: int(json.loads(v)["pid"]) for k, v in found.items()}
    finally:
        await discovery.close()


def chat(graph: Graph | str, text: str = "hello") -> str:
    url = graph if isinstance(graph, str) else graph.url
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply.choices[0].message.content or ""


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
    return out


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    kv = tmp_path / "kv"
    kv.mkdir()
    return {"DYN_FILE_KV": str(kv), "NO_COLOR": "1"}


@pytest.fixture
def serve(tmp_path: Path, env: dict[str, str]) -> Iterator[Any]:
    started: list[tuple[Proc, set[int]]] = []

    @contextlib.contextmanager
    def start(graph: str, *extra: str) -> Iterator[Graph]:
        namespace = "t" + uuid.uuid4().hex[:10]
        port = free_port()
        argv = ["-m", "dynamo_serve", "serve", graph, "--namespace", namespace]
        argv += ["--frontend.http-port", str(port), "--log-dir", str(tmp_path / "logs"), *extra]
        with run_python(argv, env=env, cwd=ROOT) as proc:
            g = Graph(proc, namespace, port, Path(env["DYN_FILE_KV"]))
            record: set[int] = set()
            started.append((proc, record))
            try:
                yield g
            finally:
                record |= g.pids()
                proc.stop(signal.SIGTERM, timeout=30)

    yield start
    leaked = set()
    for _, pids in started:
        leaked |= alive(pids)
    for pid in leaked:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert not leaked, f"processes left behind: {leaked}"


# -- tests -------------------------------------------------------------------------------------


def test_agg_serves_the_openai_api(serve: Any) -> None:
    with serve(AGG) as graph:
        graph.wait_ready()
        assert chat(graph)
        models = [m.id for m in graph.client().models.list()]
        assert models == ["tiny"]
        out = graph.proc.output()
        assert f"API (frontend): http://127.0.0.1:{graph.port}/v1 (models: tiny)" in out
        assert re.search(r"^dynamo +\| logs: ", out, re.M)
        assert re.search(r"^frontend +\| ", out, re.M)  # component output, prefixed
        assert (Path(re.search(r"logs: (\S+)", out).group(1)) / "backend.log").is_file()  # type: ignore[union-attr]


def test_a_chat_and_an_embedding_model_behind_one_frontend(serve: Any) -> None:
    with serve("examples/graphs/embedding.yaml") as graph:
        graph.wait_ready()
        client = graph.client()
        # the graph is ready once the frontend serves a model; the other may come a moment later
        deadline = time.monotonic() + 30
        while (models := sorted(m.id for m in client.models.list())) != ["tiny", "tiny-embed"]:
            assert time.monotonic() < deadline, models
            time.sleep(0.05)
        vectors = client.embeddings.create(model="tiny-embed", input=["hello", "world"])
        assert [d.index for d in vectors.data] == [0, 1] and vectors.usage.prompt_tokens > 0
        assert len(vectors.data[0].embedding) > 0
        assert vectors.data[0].embedding != vectors.data[1].embedding
        assert chat(graph)
        with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
            client.chat.completions.create(
                model="tiny-embed", messages=[{"role": "user", "content": "hi"}]
            )


def test_dry_run_commands_run_by_hand_give_the_same_graph(env: dict[str, str]) -> None:
    namespace = "t" + uuid.uuid4().hex[:10]
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_serve",
            "serve",
            AGG,
            "--dry-run",
            "--namespace",
            namespace,
            "--frontend.http-port",
            str(port),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    commands = [ln for ln in out.splitlines() if ln and not ln.startswith(("#", "cd "))]
    assert len(commands) == 2
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:  # exactly as a person would paste them
            procs.append(
                subprocess.Popen(
                    command,
                    shell=True,
                    cwd=ROOT,
                    env={**os.environ, **env},
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 30
        while True:  # nothing announces HTTP readiness: poll with a deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json().get("models"):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the hand-run graph never became ready"
            time.sleep(0.05)
        assert chat(f"http://127.0.0.1:{port}/v1")
        assert len(asyncio.run(instances(Path(env["DYN_FILE_KV"]), namespace, "backend"))) == 1
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything(serve: Any, sig: signal.Signals) -> None:
    with serve(AGG_REPLICAS) as graph:
        graph.wait_ready()
        pids = graph.pids()
        assert len(pids) == 3
        os.kill(graph.proc.pid, sig)
        assert graph.proc.popen.wait(30) == 0
        assert not alive(pids)
        out = graph.proc.output()
        assert f"{sig.name}: stopping the graph" in out
        assert "stopped 3 process(es)" in out
        assert "leftover" not in out
    assert not graph.instances()  # every registration went with its process


def test_in_flight_request_finishes_on_sigterm(serve: Any) -> None:
    with serve(AGG, "--backend.speedup-ratio", "0.5") as graph:
        graph.wait_ready()
        stream = graph.client().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "a long answer"}],
            max_tokens=60,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices
        stopper = threading.Timer(0.05, os.kill, (graph.proc.pid, signal.SIGTERM))
        stopper.start()
        finish = None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        stopper.join()
        assert finish == "length"  # the whole answer, not a cut stream
        assert graph.proc.popen.wait(60) == 0


def test_killed_worker_is_restarted_and_registers_again(serve: Any) -> None:
    with serve(AGG) as graph:
        graph.wait_ready()
        old = graph.pid_of("backend")
        assert set(graph.instances().values()) == {old}
        os.kill(old, signal.SIGKILL)
        line = graph.proc.wait_for_line("backend ready again", timeout=30)
        new = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
        assert new != old
        out = graph.proc.output()
        assert f"backend (pid {old}) exited with signal SIGKILL; restarting in" in out
        assert f"backend restarted: pid {new}" in out
        deadline = time.monotonic() + 10
        while set(graph.instances().values()) != {new}:  # the dead lease is dropped on a scan
            assert time.monotonic() < deadline, graph.instances()
            time.sleep(0.05)
        # the frontend follows discovery too: wait until it lists the model again
        client = graph.client()
        while [m.id for m in client.models.list().data] != ["tiny"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert chat(graph)


def test_two_replicas_register_as_two_instances(serve: Any) -> None:
    with serve(AGG_REPLICAS) as graph:
        graph.wait_ready()
        found = graph.instances()
        assert len(found) == 2
        workers = {
            p.pid
            for p in psutil.Process(graph.proc.pid).children()
            if "mocker" in " ".join(p.cmdline())
        }
        assert set(found.values()) == workers
        out = graph.proc.output()
        assert "backend.1 ready" in out and "backend.2 ready" in out
        for _ in range(4):
            assert chat(graph)


def test_misspelt_component_arg_fails_before_starting_anything(
    tmp_path: Path, env: dict[str, str]
) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_serve",
            "serve",
            AGG,
            "--backend.modle-path",
            "x",
            "--log-dir",
            str(logs),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"dynamo serve: error: {AGG}, component 'backend' (dynamo_core.mocker): "
        "unknown flag '--modle-path' (did you mean '--model-path'?)"
    )
    assert not logs.exists()
    assert not list(Path(env["DYN_FILE_KV"]).iterdir())  # nobody registered anything


def test_two_frontends_on_one_router_service(serve: Any) -> None:
    """examples/graphs/router.yaml: both frontends serve, and their decisions come from the
    router component (which logs the pool it routes for) once they see it in discovery."""
    other = free_port()
    with serve(ROUTER, "--frontend-b.http-port", str(other)) as graph:
        graph.wait_ready()
        routing = re.compile(r"^router +\| .*routing for \S+\.backend\.generate \(kv\)", re.M)
        deadline = time.monotonic() + 30
        while not routing.search(graph.proc.output()):  # a discovery scan after it registered
            assert time.monotonic() < deadline, graph.proc.output()
            for url in (graph.url, f"http://127.0.0.1:{other}/v1"):
                assert chat(url)
        for url in (graph.url, f"http://127.0.0.1:{other}/v1"):
            assert chat(url)


def test_disagg_graph_is_valid() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_serve", "serve", "examples/graphs/disagg.yaml", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(c) for c in done.stdout.splitlines() if "-m dynamo_core" in c]
    assert [c[c.index("-m") + 1] for c in commands] == [
        "dynamo_core.frontend",
        "dynamo_core.mocker",
        "dynamo_core.mocker",
    ]


@pytest.mark.parametrize(
    "graph",
    ["vllm-cpu", "vllm-disagg", "sglang", "sglang-disagg", "trtllm", "trtllm-disagg"],
)
def test_engine_graphs_dry_run_prints_each_nodes_commands(graph: str) -> None:
    """Every engine graph validates against its components' own parsers (engine flags are
    checked by the engine's parser where the engine is installed) and prints the commands."""
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_serve", "serve", f"examples/graphs/{graph}.yaml",
         "--dry-run", "--gpus", ",".join(str(i) for i in range(16))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    engine = graph.split("-")[0]
    modules = {c.split(" -m ", 1)[1].split()[0] for c in done.stdout.splitlines() if " -m " in c}
    assert "dynamo_core.frontend" in modules
    assert any(m.startswith(f"dynamo_{engine}.") for m in modules), done.stdout


#: The engine fakes of the engine packages' tests: importable, so an import would succeed (and
#: show) rather than fail quietly.
FAKES = [
    ROOT / "packages/dynamo-vllm/tests/fake_vllm",
    ROOT / "packages/dynamo-sglang/tests/fakes",
    ROOT / "packages/dynamo-trtllm/tests/fake_trtllm",
]
ENGINES = ("vllm", "sglang", "tensorrt_llm", "torch")


@pytest.mark.parametrize("graph", ["vllm-disagg", "sglang-disagg", "trtllm-disagg"])
def test_dry_run_of_an_engine_graph_imports_no_engine_library(graph: str) -> None:
    """Planning a graph imports its components' modules (their Deployment, their parsers in
    Dynamo-only mode), never an engine: the engines' flags are checked by each child at start."""
    code = (
        "import sys\n"
        "from dynamo_serve import serve\n"
        f"code = serve.main(['examples/graphs/{graph}.yaml', '--dry-run', '--gpus', '0,1,2,3'])\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {ENGINES!r}]\n"
        "print('LOADED', loaded, 'STATUS', code)\n"
    )
    path = os.pathsep.join([*map(str, FAKES), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "LOADED [] STATUS 0", done.stdout[-2000:]


def _example_graphs() -> list[str]:
    return sorted(p.name for p in (ROOT / "examples" / "graphs").glob("*.yaml"))


@pytest.mark.parametrize("name", _example_graphs())
def test_config_graph_component_means_what_dynamo_serve_runs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For every example graph and component: the process `dynamo serve` would start (its argv
    and environment, from the plan) and `python -m MODULE --config GRAPH --component X` parse
    to the same config and the same engine arguments, with each engine's own parser (the fakes)."""
    from dynamo_core.deploy import load_deployment, load_parser
    from dynamo_core.errors import ConfigError
    from dynamo_serve import serve

    monkeypatch.chdir(ROOT)
    for fake in FAKES:
        monkeypatch.syspath_prepend(str(fake))
    graph = f"examples/graphs/{name}"
    args = serve.build_parser().parse_args([graph, "--gpus", ",".join(map(str, range(16)))])
    plan, _ = serve.prepare(args, [], {})
    for comp in plan.components:
        process = comp.processes[0]
        flags = list(process.argv[process.argv.index("-m") + 2 :])
        module = comp.module
        try:
            parser = load_parser(module)  # with its engine
        except ConfigError:  # a package component (frontend, mocker): its main.py has them
            module = f"{comp.module}.main"
            parser = load_parser(module)
        env = {k: v for k, v in process.env.items() if k != "CUDA_VISIBLE_DEVICES"}
        served = parser.parse(flags, environ=env)
        standalone = load_parser(module).parse(
            ["--config", graph, "--component", comp.name],
            environ={},
            module_env=load_deployment(module).env,
        )
        assert served.config.model_dump() == standalone.config.model_dump(), comp.name
        engine = vars(served.engine_args) if served.engine_args is not None else None
        alone = vars(standalone.engine_args) if standalone.engine_args is not None else None
        assert engine == alone, comp.name


def test_a_busy_frontend_port_refuses_the_graph_with_one_line(serve: Any) -> None:
    """Checked before anything starts (a frontend that found it taken later would exit with
    status 78, which stops the graph: test_serve_run covers that rule)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with serve(AGG, "--frontend.http-port", str(port)) as graph:
            assert graph.proc.popen.wait(60) == 2
            out = graph.proc.output()
    assert len(out.splitlines()) == 1, out
    assert out.startswith(
        f"dynamo serve: error: port {port} (frontend's --http-port) is already in use by pid "
        f"{os.getpid()} "
    )
    assert out.endswith("stop it, or pass --frontend.http-port PORT")
