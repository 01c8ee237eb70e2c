"""Liveness figures: how fast a hung worker is noticed, and what heartbeats cost when idle.

    python bench/liveness.py                         # detection x10 at the default bound, idle cost
    python bench/liveness.py --timeout 2 --runs 20
    python bench/liveness.py --plane nats            # needs nats-server on this machine

Detection: a mocker worker (a process) streams to a client runtime in this process over the
request plane; the worker is stopped (SIGSTOP: its sockets stay open, nothing comes back); the
figure is the time from the stop until the stream fails with `ConnectionLostError` (the moment
the frontend would migrate it). The worker is then resumed and the next run waits until it is
back in service. Prints the median and the maximum against the bound (`--timeout`).

Idle cost: a frontend and two mockers, one request to open the links, then `--idle` seconds of
nothing; CPU seconds per process per minute, with heartbeats at the given bound and with
heartbeats made rare (a bound of 600 s: one ping per two minutes), and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import psutil

from dynamo_core import errors
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, run_uvloop
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "models" / "tiny"


def _env(plane: str, timeout: float, nats: str | None) -> dict[str, str]:
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"live{os.getpid()}",
        "DYN_HEARTBEAT_TIMEOUT": str(timeout),
        "DYN_REQUEST_PLANE": plane,
    }
    if nats:
        env["NATS_SERVER"] = nats
    return env


async def _detect(env: dict[str, str], pid: int, runs: int) -> list[float]:
    cfg = RuntimeConfig.from_env(env)
    async with DistributedRuntime(cfg) as rt:
        client = await rt.namespace().component("backend").endpoint("generate").client()
        await client.wait_for_instances(timeout=30)
        (iid,) = client.instance_ids()
        request = {
            "token_ids": list(range(10, 30)),
            "stop_conditions": {"max_tokens": 1_000_000, "ignore_eos": True},
        }
        times = []
        for _ in range(runs):
            while iid not in client.instance_ids():  # back in service after the last run
                await client.wait_for_change()
            stream = await client.direct(request, iid)
            await stream.__anext__()
            # mid-stream, at a random phase of the heartbeat
            await asyncio.sleep(0.2 + random.uniform(0, cfg.heartbeat_timeout / 5))
            os.kill(pid, 19)  # SIGSTOP
            t0 = time.monotonic()
            try:
                async for _ in stream:
                    pass
            except errors.ConnectionLostError:
                times.append(time.monotonic() - t0)
            finally:
                os.kill(pid, 18)  # SIGCONT
        return times


def detection(args: argparse.Namespace, nats: str | None) -> None:
    env = _env(args.plane, args.timeout, nats)
    with run_python(
        ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "0.2"],
        env=env,
    ) as worker:
        worker.wait_for_line("/generate as instance")
        times = run_uvloop(_detect(env, worker.pid, args.runs))
    print(
        f"hung-worker detection ({args.plane}, bound {args.timeout:g}s, {len(times)} runs): "
        f"median {statistics.median(times):.2f}s  max {max(times):.2f}s  "
        f"min {min(times):.2f}s  all within the bound: {max(times) <= args.timeout}"
    )


def _cpu(procs: list[psutil.Process]) -> list[float]:
    return [p.cpu_times().user + p.cpu_times().system for p in procs]


def idle_cost(args: argparse.Namespace, timeout: float, nats: str | None) -> list[float]:
    env = _env(args.plane, timeout, nats)
    port = free_port()
    with ExitStack() as stack:
        mockers = [
            stack.enter_context(
                run_python(["-m", "dynamo_core.mocker", "--model-path", str(TINY)], env=env)
            )
            for _ in range(2)
        ]
        front = stack.enter_context(
            run_python(
                ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port",
                 str(port)],
                env=env,
            )
        )  # fmt: skip
        front.wait_for_line("OpenAI API on")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                if json.load(r)["instances"].get("tiny") == 2:
                    break
            time.sleep(0.05)
        body = json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).encode()
        for _ in range(4):  # open the links to both workers
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=body,
                    headers={"content-type": "application/json"},
                )
            ).read()
        procs = [psutil.Process(p.pid) for p in (front, *mockers)]
        time.sleep(2)
        c0 = _cpu(procs)
        time.sleep(args.idle)
        c1 = _cpu(procs)
    return [(b - a) / args.idle * 60 for a, b in zip(c0, c1, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plane", choices=["tcp", "nats"], default="tcp")
    parser.add_argument("--timeout", type=float, default=5.0, help="heartbeat timeout (s)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle cost")
    args = parser.parse_args()
    with ExitStack() as stack:
        nats = stack.enter_context(NatsServer()).url if args.plane == "nats" else None
        detection(args, nats)
        if args.no_idle:
            return
        on = idle_cost(args, args.timeout, nats)
        off = idle_cost(args, 600.0, nats)
    names = ["frontend", "worker 1", "worker 2"]
    print(f"idle CPU, ms per minute ({args.idle:g}s measured; heartbeats every "
          f"{args.timeout / 5:g}s vs every 120s):")  # fmt: skip
    for name, a, b in zip(names, on, off, strict=True):
        print(f"  {name:<9} {a * 1e3:8.1f} vs {b * 1e3:8.1f}   difference {(a - b) * 1e3:+8.1f}")


if __name__ == "__main__":
    main()
