"""The frontend as users run it: `python -m dynamo_core.frontend` next to mocker processes,
driven by the real `openai` client; several frontends on one `python -m dynamo_core.router`
(killed under load, restarted); and `dynamo-run` from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from dynamo_core.runtime import Client, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.procs import Proc, run_python

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start_mocker(stack: ExitStack, env: dict[str, str], *extra: str) -> Proc:
    proc = stack.enter_context(
        run_python(
            [
                "-m",
                "dynamo_core.mocker",
                "--model-path",
                str(TINY),
                "--speedup-ratio",
                "100",
                *extra,
            ],
            env=env,
        )
    )
    proc.wait_for_line("/generate as instance")
    return proc


def start_frontend(stack: ExitStack, env: dict[str, str]) -> str:
    return start_frontend_proc(stack, env)[1]


def start_frontend_proc(stack: ExitStack, env: dict[str, str], *extra: str) -> tuple[Proc, str]:
    port = free_port()
    args = ["--http-host", "127.0.0.1", "--http-port", str(port), *extra]
    proc = stack.enter_context(run_python(["-m", "dynamo_core.frontend", *args], env=env))
    proc.wait_for_line("OpenAI API on")
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def env(proc_env: dict[str, str], namespace: str) -> dict[str, str]:
    return {**proc_env, "DYN_NAMESPACE": namespace}


async def wait_models(http: httpx.AsyncClient, count: int, timeout: float = 10) -> list[str]:
    async with asyncio.timeout(timeout):
        while True:
            data = (await http.get("/v1/models")).json()["data"]
            if len(data) == count:
                return [m["id"] for m in data]
            await asyncio.sleep(0.02)  # polling HTTP: nothing to await on from outside


async def wait_instances(http: httpx.AsyncClient, count: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (await http.get("/health")).json()["instances"].get("tiny", 0) != count:
            await asyncio.sleep(0.02)


@pytest.fixture
async def stats_client(kv_dir: Path, namespace: str) -> AsyncIterator[Client]:
    async with DistributedRuntime(RuntimeConfig(file_kv=kv_dir, namespace=namespace)) as rt:
        client = await rt.namespace().component("backend").endpoint("stats").client()
        yield client


async def stats_of(client: Client) -> dict[int, dict[str, Any]]:
    out = {}
    for iid in client.instance_ids():
        async for s in await client.direct(None, iid):
            out[iid] = s
    return out


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


async def test_openai_client_against_frontend_and_mocker(
    procs: ExitStack, env: dict[str, str]
) -> None:
    start_mocker(procs, env)
    url = start_frontend(procs, env)
    async with httpx.AsyncClient(base_url=url) as http:
        assert await wait_models(http, 1) == ["tiny"]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        stream = await client.chat.completions.create(
            model="tiny",
            messages=chat("Tell me a story"),
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        whole = await client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=7, extra_body={"ignore_eos": True}
        )
        assert whole.choices[0].text and whole.usage is not None
        assert whole.usage.completion_tokens == 7

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=chat("x"))
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=chat("x"), temperature=-1)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=chat("x"), n=129)
    finally:
        await client.close()


async def test_two_mockers_spread_survive_one_kill_then_503(
    procs: ExitStack, env: dict[str, str], stats_client: Client
) -> None:
    m1 = start_mocker(procs, env)
    m2 = start_mocker(procs, env)
    url = start_frontend(procs, env)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    async with httpx.AsyncClient(base_url=url) as http:
        await wait_instances(http, 2)
        await asyncio.gather(
            *(
                client.chat.completions.create(model="tiny", messages=chat(f"q{i}"), max_tokens=4)
                for i in range(10)
            )
        )
        await stats_client.wait_for_instances(timeout=5)
        while len(stats_client.instance_ids()) < 2:
            await stats_client.wait_for_change()
        totals = [s["requests_total"] for s in (await stats_of(stats_client)).values()]
        assert sorted(totals) == [5, 5]

        os.kill(m1.pid, signal.SIGKILL)
        for i in range(6):  # before and after discovery notices: requests keep succeeding
            r = await client.chat.completions.create(
                model="tiny", messages=chat(f"a{i}"), max_tokens=3
            )
            assert r.choices[0].finish_reason in ("length", "stop")
        await wait_instances(http, 1)
        assert await wait_models(http, 1) == ["tiny"]

        os.kill(m2.pid, signal.SIGKILL)
        assert await wait_models(http, 0) == []
        r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": chat("x")})
        assert r.status_code == 503
        assert "tiny" in r.json()["error"]["message"]
    await client.close()


async def test_client_disconnect_cancels_worker_request(
    procs: ExitStack, env: dict[str, str], stats_client: Client
) -> None:
    proc = start_mocker(procs, env, "--speedup-ratio", "1")
    url = start_frontend(procs, env)
    async with httpx.AsyncClient(base_url=url) as http:
        await wait_models(http, 1)
        await stats_client.wait_for_instances(timeout=5)
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": chat("x"),
                "max_tokens": 1000,
                "ignore_eos": True,
                "stream": True,
            },
        ) as r:
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith('data: {"id"'):
                pass
            stats = next(iter((await stats_of(stats_client)).values()))
            assert stats["requests_running"] == 1
        t0 = time.monotonic()
        while True:
            stats = next(iter((await stats_of(stats_client)).values()))
            if stats["requests_cancelled"] == 1:
                break
            assert time.monotonic() - t0 < 1.0, stats
        assert stats["requests_running"] == 0
        assert stats["active_blocks"] == 0
    assert proc.popen.poll() is None


def dynamo_run(
    args: list[str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dynamo_run_batch(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {"text": "Hello"},
                {"text": "What is the capital of France?", "max_tokens": 5},
                {"messages": [{"role": "user", "content": "Hi"}]},
                {"prompt": "Once upon", "max_tokens": 4},
            )
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    result = dynamo_run(
        [f"in=batch:{prompts}", "out=mocker", "--model-path", str(TINY), "--speedup-ratio", "1000",
         "--output", str(out), "--max-tokens", "8"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4
    for line, limit in zip(lines, [8, 5, 8, 4], strict=True):  # at most max_tokens, or eos
        reason = "length" if line["tokens_out"] == limit else "stop"
        assert line["tokens_out"] <= limit and line["finish_reason"] == reason
    assert lines[0]["text"] == "Hello" and lines[0]["response"]


def test_dynamo_run_text_answers_stdin() -> None:
    result = dynamo_run(["in=text", "out=echo", "--model-path", str(TINY)], stdin="What a day\n")
    assert result.returncode == 0, result.stderr
    assert "What a day" in result.stdout


def test_dynamo_run_unknown_engine_is_one_line() -> None:
    result = dynamo_run(["in=text", "out=nonesuch"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("dynamo-run: error: unknown engine 'nonesuch'")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "port_env", "flag"),
    [
        (["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", "{port}"],
         {}, "--http-port"),
        (["-m", "dynamo_core.mocker", "--model-path", str(TINY)],
         {"DYN_SYSTEM_HOST": "127.0.0.1", "DYN_SYSTEM_PORT": "{port}"},
         "--system-port (DYN_SYSTEM_PORT)"),
        (["-m", "dynamo_core.mocker", "--model-path", str(TINY)],
         {"DYN_TCP_HOST": "127.0.0.1", "DYN_TCP_PORT": "{port}"}, "--tcp-port (DYN_TCP_PORT)"),
    ],
    ids=["frontend-http", "status-port", "request-plane"],
)  # fmt: skip
def test_a_busy_port_is_one_line_naming_it_and_its_flag(
    env: dict[str, str], argv: list[str], port_env: dict[str, str], flag: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, *(a.replace("{port}", port) for a in argv)],
            env={
                **os.environ,
                **env,
                **{k: v.replace("{port}", port) for k, v in port_env.items()},
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 78, result.stderr  # EX_CONFIG: dynamo serve will not restart it
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use; "
        f"choose another with {flag}"
    )


# -- several frontends, one router service (python -m dynamo_core.router) -----------------


def start_router(stack: ExitStack, env: dict[str, str]) -> Proc:
    proc = stack.enter_context(
        run_python(["-m", "dynamo_core.router", "--router-mode", "least-loaded"], env=env)
    )
    proc.wait_for_line("/route as instance")
    return proc


def start_routed_frontend(
    stack: ExitStack, env: dict[str, str], namespace: str, router_timeout: float = 30
) -> tuple[Proc, str]:
    port = free_port()
    args = ["--http-host", "127.0.0.1", "--http-port", str(port)]
    # a slow answer on a loaded machine is not an outage here: a dead service is (at once)
    args += ["--router-endpoint", f"{namespace}.router.route"]
    args += ["--router-timeout", str(router_timeout)]
    proc = stack.enter_context(run_python(["-m", "dynamo_core.frontend", *args], env=env))
    proc.wait_for_line("OpenAI API on")
    return proc, f"http://127.0.0.1:{port}"


async def router_decisions(kv_dir: Path, namespace: str) -> int:
    """The router service's decision count (its `stats` endpoint)."""
    async with DistributedRuntime(RuntimeConfig(file_kv=kv_dir, namespace=namespace)) as rt:
        client = await rt.namespace().component("router").endpoint("stats").client()
        (iid,) = await client.wait_for_instances(10)
        async for stats in await client.direct(None, iid):
            return int(stats["decisions"])
        raise AssertionError("no stats")


async def chats(
    urls: list[str],
    requests: int,
    concurrency: int,
    out: list[Any],
    seconds: list[float] | None = None,
) -> list[Any]:
    """`requests` chats over the frontends in turn, `concurrency` at a time; each status (an
    exception where the request failed) is appended to `out` as it comes, and its duration to
    `seconds` (if given)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "count to ten"}],
        "max_tokens": 20,
        "ignore_eos": True,
    }
    todo = iter(range(requests))
    async with httpx.AsyncClient(timeout=60) as http:

        async def worker() -> None:
            for i in todo:
                t0 = time.monotonic()
                try:
                    r = await http.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)
                    out.append(r.status_code)
                except httpx.HTTPError as exc:
                    out.append(exc)
                if seconds is not None:
                    seconds.append(time.monotonic() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def test_frontends_survive_the_router_service_and_come_back_to_it(
    procs: ExitStack, env: dict[str, str], kv_dir: Path, namespace: str
) -> None:
    router = start_router(procs, env)
    start_mocker(procs, env)
    start_mocker(procs, env)
    fronts = [start_routed_frontend(procs, env, namespace) for _ in range(2)]
    urls = [url for _, url in fronts]
    for url in urls:
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_instances(http, 2)
    assert await chats(urls, 20, 4, []) == [200] * 20
    assert await router_decisions(kv_dir, namespace) == 20

    # killed under load: no request fails, each frontend says once that it routes locally
    done: list[Any] = []
    running = asyncio.create_task(chats(urls, 300, 8, done))
    async with asyncio.timeout(30):
        while len(done) < 40:
            await asyncio.sleep(0.01)
    router.stop(signal.SIGKILL)
    assert await running == [200] * 300
    for proc, _ in fronts:
        assert proc.output().count("routing locally") == 1, proc.output()

    # restarted: each frontend sees it in discovery (a scan interval) and asks it again
    start_router(procs, env)
    await asked_again(fronts, kv_dir, namespace)


async def asked_again(fronts: list[tuple[Proc, str]], kv_dir: Path, namespace: str) -> None:
    """Every frontend says the service answers again, and the next requests are its decisions."""
    urls = [url for _, url in fronts]
    async with asyncio.timeout(30):
        while not all("answers again" in proc.output() for proc, _ in fronts):
            assert await chats(urls, 2, 2, []) == [200, 200]
    before = await router_decisions(kv_dir, namespace)
    assert await chats(urls, 20, 4, []) == [200] * 20
    assert await router_decisions(kv_dir, namespace) == before + 20


async def test_frontends_ride_out_a_hung_router_service(
    procs: ExitStack, env: dict[str, str], kv_dir: Path, namespace: str
) -> None:
    """SIGSTOP: the service keeps its connections and answers nothing. A request waits at most
    --router-timeout for it, then is routed locally; for a while after, requests do not ask it
    at all. None fails. After SIGCONT the frontends ask it again."""
    router = start_router(procs, env)
    start_mocker(procs, env)
    start_mocker(procs, env)
    fronts = [start_routed_frontend(procs, env, namespace, router_timeout=1) for _ in range(2)]
    urls = [url for _, url in fronts]
    for url in urls:
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_instances(http, 2)
    assert await chats(urls, 10, 2, []) == [200] * 10

    done: list[Any] = []
    seconds: list[float] = []
    running = asyncio.create_task(chats(urls, 200, 8, done, seconds))
    async with asyncio.timeout(30):
        while len(done) < 20:
            await asyncio.sleep(0.01)
    os.kill(router.popen.pid, signal.SIGSTOP)
    try:
        statuses = await running
        assert statuses == [200] * 200
        # the requests caught by the hang waited one --router-timeout, not more (the slack:
        # the rest of a request on a loaded machine)
        assert max(seconds) < 1 + 10
        for proc, _ in fronts:
            assert proc.output().count("routing locally") >= 1, proc.output()
    finally:
        os.kill(router.popen.pid, signal.SIGCONT)
    await asked_again(fronts, kv_dir, namespace)


# -- --http-workers: several frontend processes on one port ----------------------------------


def start_http_workers(
    stack: ExitStack, env: dict[str, str], workers: int, *extra: str
) -> tuple[Proc, str]:
    port = free_port()
    args = ["--http-host", "127.0.0.1", "--http-port", str(port), "--http-workers", str(workers)]
    proc = stack.enter_context(run_python(["-m", "dynamo_core.frontend", *args, *extra], env=env))
    for i in range(workers):
        proc.wait_for_line(f"HTTP worker {i})", timeout=60)
    return proc, f"http://127.0.0.1:{port}"


def family(proc: Proc) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


async def test_http_workers_share_the_port(procs: ExitStack, env: dict[str, str]) -> None:
    """Three processes listen on the port; connections land on more than one of them, and every
    request is served."""
    start_mocker(procs, env)
    proc, url = start_http_workers(procs, env, 3)
    port = int(url.rsplit(":", 1)[1])
    pids = [p.pid for p in family(proc)]
    assert len(pids) == 3
    listening = {
        p.pid for p in family(proc) for c in p.net_connections("tcp") if c.status == "LISTEN"
    }
    assert listening == set(pids)
    body = {"model": "tiny", "messages": chat("hello"), "max_tokens": 20, "ignore_eos": True}
    limits = httpx.Limits(max_connections=24, max_keepalive_connections=24)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await wait_instances(http, 1)
        for _ in range(3):  # 24 kept-alive connections, several requests each
            replies = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(24))
            )
            assert [r.status_code for r in replies] == [200] * 24
        serving = {
            p.pid
            for p in family(proc)
            for c in p.net_connections("tcp")
            if c.status == "ESTABLISHED" and c.laddr and c.laddr.port == port
        }
    assert len(serving) >= 2, serving  # (all 24 on one of 3: 1 chance in 3**23)


async def test_a_killed_http_worker_is_replaced(procs: ExitStack, env: dict[str, str]) -> None:
    start_mocker(procs, env)
    proc, url = start_http_workers(procs, env, 2)
    (copy,) = psutil.Process(proc.pid).children()
    copy.kill()
    proc.wait_for_line("HTTP worker 1 (pid")  # "... exited with status -9: starting it again"
    assert "exited with status -9" in proc.output()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"model": "tiny", "messages": chat("hello"), "max_tokens": 4}
        for _ in range(10):  # a new connection each: the port serves meanwhile
            r = await http.post("/v1/chat/completions", json=body, headers={"connection": "close"})
            assert r.status_code == 200
    async with asyncio.timeout(60):  # the replacement comes up: two "HTTP worker 1)" lines
        while proc.output().count("HTTP worker 1)") < 2:
            await asyncio.sleep(0.05)
    (again,) = psutil.Process(proc.pid).children()
    assert again.pid != copy.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_http_workers_end_with_the_first(
    procs: ExitStack, env: dict[str, str], sig: signal.Signals
) -> None:
    """SIGTERM: worker 0 passes it on and waits for its copies; SIGKILL: the kernel tells the
    copies (PR_SET_PDEATHSIG). Either way none is left behind."""
    proc, _ = start_http_workers(procs, env, 3, "--graceful-shutdown-timeout", "1")
    everyone = family(proc)
    assert len(everyone) == 3
    code = proc.stop(sig, timeout=30)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    _, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive


def test_a_port_someone_shares_is_refused(procs: ExitStack, env: dict[str, str]) -> None:
    """A program listening with SO_REUSEPORT would quietly get a share of our connections: it
    is refused like any busy port (one line, exit 78)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "dynamo_core.frontend", "--http-host", "127.0.0.1",
             "--http-port", str(port), "--http-workers", "2"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 78
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use; "
        "choose another with --http-port"
    )


async def test_http_workers_share_their_routing_load(procs: ExitStack, env: dict[str, str]) -> None:
    """One request at a time per worker, no queue, one worker: with a long stream running on
    one process, every new request is refused, whichever process its connection lands on (the
    processes' routers share their counts: `--router-replica-sync`, on with --http-workers)."""
    start_mocker(procs, env, "--speedup-ratio", "1")
    _, url = start_http_workers(
        procs, env, 2, "--active-requests-threshold", "1", "--max-queued-requests", "0"
    )
    long = {"model": "tiny", "messages": chat("hi"), "max_tokens": 2000, "ignore_eos": True}
    short = {"model": "tiny", "messages": chat("hi"), "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await wait_instances(http, 1)
        started = asyncio.Event()

        async def read_the_stream() -> None:
            body = {**long, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    started.set()

        reader = asyncio.create_task(read_the_stream())
        try:
            await asyncio.wait_for(started.wait(), 30)
            async with asyncio.timeout(30):
                while True:  # until the other process's view has it too (a sync interval)
                    replies = [
                        await http.post(
                            "/v1/chat/completions", json=short, headers={"connection": "close"}
                        )
                        for _ in range(8)  # new connections: both processes, all but surely
                    ]
                    if all(r.status_code == 503 for r in replies):
                        break
            assert {r.json()["error"]["code"] for r in replies} == {"overloaded"}
            assert not reader.done()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


# -- stored responses (/v1/responses) across processes and restarts ----------------------------


def fresh_connections(url: str) -> openai.AsyncOpenAI:
    """An `openai` client whose every request goes on a new connection (so, with
    --http-workers, to any of the processes: the kernel spreads connections, not requests)."""
    return openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"connection": "close"},
    )


async def test_http_workers_share_stored_responses(
    procs: ExitStack, env: dict[str, str], tmp_path: Path
) -> None:
    """`--http-workers 2`, no --responses-store-dir: a follow-up, GET or DELETE reaches the
    response whichever process its connection lands on (worker 0 hands its copies a private
    folder, and removes it when it stops); one deleted on either is gone on both."""
    env = {**env, "TMPDIR": str(tmp_path)}  # where the private folder goes
    start_mocker(procs, env)
    proc, url = start_http_workers(procs, env, 2)
    (copy,) = psutil.Process(proc.pid).children()
    argv = copy.cmdline()
    folder = Path(argv[argv.index("--responses-store-dir") + 1])
    assert folder.parent == tmp_path and folder.is_dir()
    async with httpx.AsyncClient(base_url=url) as http:
        await wait_instances(http, 1)
    client = fresh_connections(url)
    asked = 0
    try:
        for i in range(10):
            first = await client.responses.create(
                model="tiny", input=f"hi {i}", max_output_tokens=4
            )
            follow = await client.responses.create(
                model="tiny", input="and?", previous_response_id=first.id, max_output_tokens=4
            )
            async with client.responses.stream(
                model="tiny", input="more", previous_response_id=follow.id, max_output_tokens=4
            ) as stream:
                events = [e async for e in stream]
            assert events[-1].type == "response.incomplete"  # its 4 tokens: stored all the same
            last = events[-1].response
            assert last.previous_response_id == follow.id
            for r in (first, follow, last):
                again = await client.responses.retrieve(r.id)
                assert (again.id, again.output_text) == (r.id, r.output_text)
            await client.responses.delete(first.id)
            for _ in range(3):
                with pytest.raises(openai.NotFoundError):
                    await client.responses.retrieve(first.id)
            with pytest.raises(openai.NotFoundError) as info:
                await client.responses.create(
                    model="tiny", input="x", previous_response_id=first.id, max_output_tokens=4
                )
            assert info.value.code == "previous_response_not_found"
            assert (await client.responses.retrieve(follow.id)).id == follow.id
            asked += 11
    finally:
        await client.close()
    assert asked == 110
    assert len(list(folder.glob("resp_*.json"))) == 20  # two kept of each three
    assert proc.stop(signal.SIGTERM, timeout=30) == 0
    assert not folder.exists()


async def test_stored_responses_survive_a_frontend_restart(
    procs: ExitStack, env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "responses"
    start_mocker(procs, env)
    flags = ("--responses-store-dir", str(folder))
    before, url = start_frontend_proc(procs, env, *flags)
    client = fresh_connections(url)
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_models(http, 1)
        kept = await client.responses.create(model="tiny", input="hello", max_output_tokens=4)
        gone = await client.responses.create(model="tiny", input="bye", max_output_tokens=4)
        await client.responses.delete(gone.id)
    finally:
        await client.close()
    assert before.stop(signal.SIGTERM, timeout=30) == 0

    after, url = start_frontend_proc(procs, env, *flags)
    assert "1 from earlier runs kept" in after.output()
    client = fresh_connections(url)
    try:
        again = await client.responses.retrieve(kept.id)
        assert again.model_dump() == kept.model_dump()
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(gone.id)
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_models(http, 1)
        follow = await client.responses.create(
            model="tiny", input="again", previous_response_id=kept.id, max_output_tokens=4
        )
        assert follow.previous_response_id == kept.id
        await client.responses.delete(kept.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(kept.id)
    finally:
        await client.close()
    assert sorted(p.name for p in folder.iterdir()) == [f"{follow.id}.json"]


def test_a_store_dir_that_cannot_be_used_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_core.frontend", "--http-host", "127.0.0.1",
         "--http-port", "0", "--responses-store-dir", str(taken)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot keep responses in --responses-store-dir {taken}: "), last
