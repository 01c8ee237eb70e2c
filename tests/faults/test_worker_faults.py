"""Worker and frontend faults under load, with counts: nothing lost, nothing stalled.

Every case runs a real frontend and real mocker workers as processes and drives them with
concurrent streaming chats (`_load.py`). The counts asserted are the user's view: streams that
failed (an error event, a cut body, a missing `[DONE]`, a wrong status), streams whose text is
not exactly what an undisturbed worker produces, and streams that went silent for longer than
the detection bound. ARCHITECTURE.md, "Off the happy path", is what they check.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from _load import Load, instances, summary, wait_until

from conftest import BOUND, SPEEDUP, TINY, Graph, report
from dynamo_core.testing.netns import network_hosts
from dynamo_core.testing.procs import run_python

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
#: a stream may pause this long beyond the detection bound: the move to another worker (its
#: prefill of prompt + tokens so far) on a loaded 2-core machine
SLACK = 2.0


async def two_workers(graph: Graph, **worker_env: str) -> None:
    graph.add_worker(**worker_env)
    graph.add_worker(**worker_env)
    graph.start_frontend()
    await wait_until(lambda: _has(graph.url, 2), 30, "two live instances")


async def _has(url: str, n: int) -> bool:
    return await instances(url) == n


async def streams_with_fault(load: Load, fault: Callable[[], Awaitable[None]]) -> None:
    """Run the load; inject `fault()` once every stream has its first token."""
    task = asyncio.create_task(load.run())
    await asyncio.wait_for(load.started.wait(), 60)
    await fault()
    await asyncio.wait_for(task, 120)


async def test_kill_9_worker_under_64_streams(graph: Graph) -> None:
    await two_workers(graph)
    victim = graph.workers[0]
    load = Load(graph.url, streams=64, max_tokens=100)

    async def kill() -> None:
        os.kill(victim.pid, signal.SIGKILL)

    await streams_with_fault(load, kill)
    counts = summary(load.results) | {"exact": await load.exact_against_reference()}
    counts["migrated"] = graph.frontend_log(r"migrating with \d+ tokens")
    report("kill -9 worker, 64 streams", counts)
    assert counts["failed"] == 0, [r for r in load.results if not r.ok][:3]
    assert counts["exact"] == 64
    assert counts["migrated"] >= 1, graph.frontend.output()[-3000:]  # the victim served some
    assert all(r.completion_tokens == 100 for r in load.results)


async def test_sigterm_worker_past_its_grace_under_64_streams(graph: Graph) -> None:
    """The victim drains for 1 s, then cancels what is left: those streams move, exactly."""
    await two_workers(graph, DYN_GRACEFUL_SHUTDOWN_TIMEOUT="1")
    victim = graph.workers[0]
    load = Load(graph.url, streams=64, max_tokens=150)

    async def term() -> None:
        os.kill(victim.pid, signal.SIGTERM)

    await streams_with_fault(load, term)
    code = await asyncio.to_thread(victim.popen.wait, 30)
    counts = summary(load.results) | {"exact": await load.exact_against_reference()}
    counts["migrated"] = graph.frontend_log(r"migrating with \d+ tokens")
    report("SIGTERM worker (grace 1 s), 64 streams", counts | {"exit": code})
    assert code == 0
    assert counts["failed"] == 0, [r for r in load.results if not r.ok][:3]
    assert counts["exact"] == 64
    assert counts["migrated"] >= 1
    assert "still running after 1s: cancelled" in victim.output()


async def test_requests_during_drain_all_succeed(graph: Graph) -> None:
    """SIGTERM with the default grace: the worker leaves discovery, refuses what still reaches
    it (the frontend sends that elsewhere at once), finishes its streams, then exits."""
    await two_workers(graph)
    victim = graph.workers[0]
    inflight = Load(graph.url, streams=16, max_tokens=150)
    running = asyncio.create_task(inflight.run())
    await asyncio.wait_for(inflight.started.wait(), 60)
    os.kill(victim.pid, signal.SIGTERM)
    t0 = time.monotonic()
    # 40 new requests as long as those in flight, the first ones before the frontend can have
    # seen the worker leave discovery: the old drain took some of them and cut them at its exit
    arriving = Load(graph.url, streams=40, max_tokens=150)
    during = asyncio.create_task(arriving.run(start_gap=0.01))
    await asyncio.wait_for(asyncio.gather(running, during), 120)
    code = await asyncio.to_thread(victim.popen.wait, 60)
    exited_after = time.monotonic() - t0
    exact = await inflight.exact_against_reference() + await arriving.exact_against_reference()
    counts = summary(inflight.results + arriving.results) | {"exact": exact}
    counts["retried_elsewhere"] = graph.frontend_log(r"did not take it \(.*shutting down")
    counts["migrated"] = graph.frontend_log(r"migrating with \d+ tokens")
    report(
        "requests during a worker's drain",
        counts | {"exit": code, "exited_after_s": round(exited_after, 1)},
    )
    assert code == 0
    assert counts["failed"] == 0, [r for r in arriving.results + inflight.results if not r.ok][:3]
    assert counts["exact"] == 56
    assert counts["migrated"] == 0  # the victim finished its own streams within its grace
    out = victim.output()
    assert "drained (" in out and "cancelled" not in out


async def test_sigstop_longer_than_the_detection_bound(graph: Graph) -> None:
    """A hung worker: its streams move within the bound, nobody routes to it while it is
    stopped, and it is taken back once it answers."""
    await two_workers(graph)
    victim = graph.workers[0]
    load = Load(graph.url, streams=32, max_tokens=200)
    detected = -1.0

    async def hang() -> None:
        nonlocal detected
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            detected = await wait_until(lambda: _has(graph.url, 1), BOUND + 2, "quarantine")
            await asyncio.sleep(2 * BOUND - detected)  # stopped for twice the bound
        finally:
            os.kill(victim.pid, signal.SIGCONT)

    await streams_with_fault(load, hang)
    back = await wait_until(lambda: _has(graph.url, 2), 2 * BOUND, "taken back")
    counts = summary(load.results, bound=BOUND + SLACK)
    counts["exact"] = await load.exact_against_reference()
    counts["migrated"] = graph.frontend_log(r"migrating with \d+ tokens")
    report(
        f"SIGSTOP worker {2 * BOUND:g}s (bound {BOUND:g}s), 32 streams",
        counts | {"detected_s": round(detected, 2), "back_s": round(back, 2)},
    )
    # within the bound of its last answer; seen here through /health polls (every 50 ms)
    assert detected <= BOUND + 0.5
    assert counts["failed"] == 0, [r for r in load.results if not r.ok][:3]
    assert counts["stalled"] == 0, sorted(r.max_gap for r in load.results)[-3:]
    assert counts["exact"] == 32
    assert counts["migrated"] >= 1


async def test_slow_worker_is_never_cut(graph: Graph) -> None:
    """A stream whose first token takes three times the bound (a long prefill) is alive: the
    worker's transport answers heartbeats while its engine is busy."""
    graph.add_worker("--speedup-ratio", "0.0005")  # the prompt's prefill step: about 11 s
    graph.start_frontend()
    await wait_until(lambda: _has(graph.url, 1), 30, "one live instance")
    load = Load(graph.url, streams=2, max_tokens=1)
    await asyncio.wait_for(load.run(), 120)
    counts = summary(load.results)
    del counts["exact"]  # not asked: no reference pass here
    report("slow worker (first token after 3x the bound)", counts)
    assert counts["failed"] == 0
    assert min(r.max_gap for r in load.results) > 3 * BOUND
    assert graph.frontend_log("quarantined") == 0


async def test_frontend_sigterm_ends_open_streams_cleanly(graph: Graph) -> None:
    graph.add_worker()
    graph.start_frontend(DYN_GRACEFUL_SHUTDOWN_TIMEOUT="1")
    await wait_until(lambda: _has(graph.url, 1), 30, "one live instance")
    load = Load(graph.url, streams=8, max_tokens=1500)
    task = asyncio.create_task(load.run())
    await asyncio.wait_for(load.started.wait(), 60)
    assert graph.frontend is not None
    os.kill(graph.frontend.pid, signal.SIGTERM)
    await asyncio.wait_for(task, 60)
    code = await asyncio.to_thread(graph.frontend.popen.wait, 30)
    counts = summary(load.results)
    del counts["exact"], counts["ok"], counts["failed"]  # every stream is cut here, by design
    counts["last_is_error_then_done"] = sum(
        r.error is not None and r.error.get("type") == "service_unavailable" and r.done
        for r in load.results
    )
    report("frontend SIGTERM, grace 1 s, 8 streams", counts | {"exit": code})
    assert code == 0
    assert counts["last_is_error_then_done"] == 8
    assert counts["complete"] == 8  # the terminating chunk came: no cut body
    assert all(r.transport_error is None for r in load.results)


def test_partition_in_network_namespaces(tmp_path: Path) -> None:
    """A worker cut off the network (its link down for twice the bound) while it keeps running."""
    with network_hosts(["front", "w1", "w2"]) as hosts, ExitStack() as stack:
        env = {
            "DYN_FILE_KV": str(tmp_path / "kv"),  # the file system is shared across namespaces
            "DYN_NAMESPACE": "part" + hosts.tag,
            "DYN_HEARTBEAT_TIMEOUT": str(BOUND),
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        worker_args = ["-m", "dynamo_core.mocker", "--model-path", str(TINY)]
        worker_args += ["--speedup-ratio", SPEEDUP]
        for role in ("w1", "w2"):
            proc = stack.enter_context(
                run_python(
                    hosts.python(role, worker_args),
                    env={**env, "DYN_TCP_HOST": hosts.address(role)},
                )
            )
            proc.wait_for_line("/generate as instance", timeout=60)
        front = hosts.address("front")
        frontend = stack.enter_context(
            run_python(
                hosts.python("front", ["-m", "dynamo_core.frontend", "--http-host", front,
                                       "--http-port", "8000"]),
                env=env,
            )
        )  # fmt: skip
        frontend.wait_for_line("OpenAI API on", timeout=60)
        driver = stack.enter_context(
            run_python(
                hosts.python("front", [str(HERE / "_load.py"), f"http://{front}:8000",
                                       "--streams", "32", "--max-tokens", "200"]),
                env=env,
            )
        )  # fmt: skip
        driver.wait_for_line("STARTED", timeout=90)
        hosts.cut("w1")
        try:
            frontend.wait_for_line("quarantined", timeout=BOUND + 2)
            asyncio.run(asyncio.sleep(BOUND))
        finally:
            hosts.heal("w1")
        frontend.wait_for_line("answers again", timeout=4 * BOUND)
        line = driver.wait_for_line('{"results"', timeout=120)
        from _load import StreamResult

        results = [StreamResult(**r) for r in json.loads(line)["results"]]
        counts = summary(results, bound=BOUND + SLACK)
        counts["migrated"] = len([ln for ln in frontend.lines if "migrating with" in ln])
        report(f"partition of a worker for ~{2 * BOUND:g}s, 32 streams", counts)
        assert counts["failed"] == 0, [r for r in results if not r.ok][:3]
        assert counts["stalled"] == 0, sorted(r.max_gap for r in results)[-3:]
        assert counts["exact"] == 32
        assert counts["migrated"] >= 1
