"""Beyond one machine: real etcd and NATS servers, real processes, hosts in network namespaces."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.runtime.discovery import keys
from dynamo_core.testing.netns import network_hosts
from dynamo_core.testing.procs import Proc, run_python
from dynamo_core.testing.servers import EtcdServer, NatsServer, free_port, require_binary

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
SERVER = str(Path(__file__).with_name("_echo_server.py"))


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    require_binary("etcd")
    with EtcdServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    require_binary("nats-server")
    with NatsServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def dist_env(namespace: str, etcd: EtcdServer, nats: NatsServer | None = None) -> dict[str, str]:
    env = {
        "DYN_NAMESPACE": namespace,
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": etcd.url,
        "DYN_LEASE_TTL": "2",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_EVENT_PLANE": "tcp",
    }
    if nats is not None:
        env.update(DYN_REQUEST_PLANE="nats", DYN_EVENT_PLANE="nats", NATS_SERVER=nats.url)
    return env


def start_graph(stack: ExitStack, env: dict[str, str], mockers: int = 1) -> tuple[str, list[Proc]]:
    workers = []
    for _ in range(mockers):
        proc = stack.enter_context(
            run_python(
                ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "100"],
                env=env,
            )
        )
        workers.append(proc)
    port = free_port()
    front = stack.enter_context(
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        )
    )
    for proc in workers:
        proc.wait_for_line("/generate as instance")
    front.wait_for_line("OpenAI API on")
    return f"http://127.0.0.1:{port}", workers


async def chat_ok(url: str, within: float) -> None:
    """A chat completion succeeds within `within` seconds (retrying while the graph recovers)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=5)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Exception | None = None
    try:
        while loop.time() < deadline:
            try:
                r = await client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    extra_body={"ignore_eos": True},
                )
                assert r.usage is not None and r.usage.completion_tokens == 4
                return
            except (openai.APIError, httpx.HTTPError) as exc:
                last = exc
                await asyncio.sleep(0.1)
        raise AssertionError(f"no successful chat within {within}s: {last}")
    finally:
        await client.close()


@pytest.mark.parametrize("plane", ["tcp", "nats"])
async def test_kill_9_leaves_discovery_within_ttl_and_routing_stops(
    plane: str, etcd: EtcdServer, nats: NatsServer, procs: ExitStack, namespace: str
) -> None:
    env = dist_env(namespace, etcd, nats if plane == "nats" else None)
    url, workers = start_graph(procs, env, mockers=2)
    cfg = RuntimeConfig.model_validate(
        {
            "discovery_backend": "etcd",
            "etcd_endpoints": etcd.url,
            "namespace": namespace,
            "request_plane": plane,
            "nats_server": nats.url,
        }
    )
    async with DistributedRuntime(cfg) as rt:
        client = await rt.namespace().component("backend").endpoint("generate").client()
        async with asyncio.timeout(10):
            while len(client.instance_ids()) < 2:
                await client.wait_for_change()
        await chat_ok(url, 10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        os.kill(workers[0].pid, signal.SIGKILL)
        async with asyncio.timeout(2 + 2):  # the lease TTL, plus a margin for the keep-alive
            while len(client.instance_ids()) > 1:
                await client.wait_for_change()
        assert loop.time() - t0 <= 4
    for _ in range(6):  # the frontend no longer routes to it: every request succeeds
        await chat_ok(url, 5)


async def test_hung_process_leaves_etcd_within_the_lease_ttl(
    etcd: EtcdServer, procs: ExitStack, namespace: str
) -> None:
    """A process that stops renewing (SIGSTOP: no connection closes, nothing says goodbye)
    is gone from every watcher within `lease_ttl` of the stop."""
    ttl = 3.0
    env = {**dist_env(namespace, etcd), "DYN_LEASE_TTL": str(ttl)}
    worker = procs.enter_context(run_python(["-m", "dynamo_core.mocker", "--model-path",
                                             str(TINY)], env=env))  # fmt: skip
    worker.wait_for_line("/generate as instance")
    cfg = RuntimeConfig(discovery_backend="etcd", etcd_endpoints=etcd.url, namespace=namespace)
    async with DistributedRuntime(cfg) as rt:
        watch = await rt.discovery.watch_prefix(
            keys.instances_prefix(namespace, "backend", "generate")
        )
        assert [e.kind for e in watch.pending()] == ["put"]
        loop = asyncio.get_running_loop()
        os.kill(worker.pid, signal.SIGSTOP)
        t0 = loop.time()
        try:
            async with asyncio.timeout(ttl + 5):
                event = await anext(aiter(watch))
            gone_after = loop.time() - t0
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        watch.close()
    assert event.kind == "delete"
    assert gone_after <= ttl + 0.25, gone_after


async def test_etcd_restart_workers_reregister_frontend_recovers(
    etcd: EtcdServer, procs: ExitStack, namespace: str
) -> None:
    url, _ = start_graph(procs, dist_env(namespace, etcd))
    await chat_ok(url, 10)
    # etcd comes back empty (its data lost): every registration must be made again
    etcd.stop(signal.SIGKILL)
    shutil.rmtree(etcd.data_dir / "data", ignore_errors=True)
    etcd.start()
    async with DistributedRuntime(
        RuntimeConfig(discovery_backend="etcd", etcd_endpoints=etcd.url, namespace=namespace)
    ) as rt:
        watch = await rt.discovery.watch_prefix(keys.models_prefix(namespace))
        async with asyncio.timeout(10):  # the worker's keep-alive finds its lease gone
            event = await anext(aiter(watch))
        assert event.kind == "put"
        watch.close()
    await chat_ok(url, 10)


async def test_nats_restart_requests_succeed_again(
    etcd: EtcdServer, nats: NatsServer, procs: ExitStack, namespace: str
) -> None:
    url, _ = start_graph(procs, dist_env(namespace, etcd, nats))
    await chat_ok(url, 10)
    nats.restart()
    await chat_ok(url, 10)


@pytest.mark.parametrize("what", ["etcd", "nats"])
def test_unreachable_backend_at_start_is_one_line(what: str, namespace: str) -> None:
    port = free_port()
    env = dict(os.environ, DYN_NAMESPACE=namespace)
    if what == "etcd":
        env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=f"http://127.0.0.1:{port}")
    else:
        env.update(DYN_REQUEST_PLANE="nats", NATS_SERVER=f"nats://127.0.0.1:{port}")
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_core.mocker", "--model-path", str(TINY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in done.stderr


# -- hosts that are really apart: network namespaces joined by veth pairs ---------------------

ROLES = ["infra", "front", "worker"]


CHAT_SCRIPT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=10)
print("MODELS", [m.id for m in client.models.list().data])
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=6, stream=True, stream_options={"include_usage": True},
                                   extra_body={"ignore_eos": True})
chunks = list(r)
print("USAGE", chunks[-1].usage.completion_tokens)
"""


@pytest.mark.parametrize("plane", ["tcp", "nats"])
def test_graph_across_network_hosts(plane: str, namespace: str, tmp_path: Path) -> None:
    etcd_bin, nats_bin = require_binary("etcd"), require_binary("nats-server")
    with network_hosts(ROLES) as hosts, ExitStack() as stack:
        infra = hosts.address("infra")
        front = hosts.address("front")
        base = [sys.executable]
        etcd_dir = tmp_path / "etcd"
        servers = [
            [etcd_bin, "--data-dir", str(etcd_dir), "--listen-client-urls", f"http://{infra}:2379",
             "--advertise-client-urls", f"http://{infra}:2379", "--listen-peer-urls", f"http://{infra}:2380",
             "--initial-advertise-peer-urls", f"http://{infra}:2380",
             "--initial-cluster", f"default=http://{infra}:2380"],
            [nats_bin, "-a", infra, "-p", "4222"],
        ]  # fmt: skip
        for argv in servers:
            popen = subprocess.Popen(
                hosts.argv("infra", argv),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            stack.callback(_kill, popen)
        env = {
            "DYN_NAMESPACE": namespace,
            "DYN_DISCOVERY_BACKEND": "etcd",
            "ETCD_ENDPOINTS": f"http://{infra}:2379",
            "NATS_SERVER": f"nats://{infra}:4222",
            "DYN_REQUEST_PLANE": plane,
            "DYN_EVENT_PLANE": plane,
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        worker = stack.enter_context(
            run_python(
                hosts.python("worker", ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "100"]),
                env=env,
            )
        )  # fmt: skip
        frontend = stack.enter_context(
            run_python(
                hosts.python("front", ["-m", "dynamo_core.frontend", "--http-host", front, "--http-port", "8000"]),
                env=env,
            )
        )  # fmt: skip
        worker.wait_for_line("/generate as instance", timeout=30)
        frontend.wait_for_line("OpenAI API on", timeout=30)
        script = tmp_path / "chat.py"
        script.write_text(CHAT_SCRIPT)
        deadline_tries = 50
        for _ in range(deadline_tries):
            done = subprocess.run(
                hosts.argv("infra", [*base, str(script), f"http://{front}:8000/v1"]),
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            if done.returncode == 0 and "MODELS ['tiny']" in done.stdout:
                break
        assert done.returncode == 0, done.stderr + frontend.output() + worker.output()
        assert "MODELS ['tiny']" in done.stdout and "USAGE 6" in done.stdout
        # the worker advertised its own host's address, not loopback
        if plane == "tcp":
            assert f"advertised as {hosts.address('worker')}:" in worker.output()


def _kill(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
