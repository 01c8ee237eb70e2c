"""Edge figures: a small request's latency while large prompts are processed, and memory after.

    python bench/edge.py                          # prompts of 1, 4 and 16 MB, default context
    python bench/edge.py --sizes 1 4 --context-length 4000000 --burst 4

Starts `python -m dynamo_core.mocker` (the tiny model) and `python -m dynamo_core.frontend` with a
body limit large enough for the biggest prompt, then, for each size, sends one chat request whose
prompt is that many MB while a probe sends small requests back to back (`GET /v1/models` and a
1-token chat, alternately). Prints, per size: the large request's status and time, the probe's
latency (p50, max) while it ran, and the frontend's RSS before and after. Then a burst of
`--burst` large requests at once, and the RSS once they are answered (memory must come back).

With the model's own context (2,048 tokens), a large prompt is refused (400) after tokenizing a
prefix; `--context-length` larger than the prompt makes the frontend tokenize all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from dynamo_core.runtime import run_uvloop
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "models" / "tiny"
MB = 1024 * 1024
_WORDS = "The quick brown fox jumps over the lazy dog. Lorem ipsum dolor sit amet 12345. "


def chat_request(content: str, max_tokens: int = 1) -> bytes:
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    return head + body


async def exchange(port: int, request: bytes) -> int:
    """Send one request on a new connection; the status once the whole response is read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status
    finally:
        writer.close()


async def probe(port: int, stop: asyncio.Event, latencies: list[float]) -> int:
    """Small requests back to back until `stop`; returns how many failed."""
    small = [b"GET /v1/models HTTP/1.1\r\nhost: bench\r\n\r\n", chat_request("hi")]
    failed = 0
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        if await exchange(port, small[i % 2]) != 200:
            failed += 1
        latencies.append(time.perf_counter() - t0)
        i += 1
    return failed


async def large_while_probing(port: int, payload: bytes) -> tuple[int, float, list[float], int]:
    stop = asyncio.Event()
    latencies: list[float] = []
    prober = asyncio.create_task(probe(port, stop, latencies))
    await asyncio.sleep(0.05)  # the probe is running before the large request arrives
    t0 = time.perf_counter()
    status = await exchange(port, payload)
    elapsed = time.perf_counter() - t0
    stop.set()
    failed = await prober
    return status, elapsed, latencies, failed


async def burst(port: int, payload: bytes, count: int) -> list[int]:
    return list(await asyncio.gather(*(exchange(port, payload) for _ in range(count))))


def rss_mb(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 4, 16], help="prompt MB")
    parser.add_argument("--burst", type=int, default=8, help="large requests sent at once")
    parser.add_argument("--burst-size", type=int, default=4, help="MB per request of the burst")
    parser.add_argument("--context-length", type=int, default=None, help="the mocker's context")
    args = parser.parse_args()

    port = free_port()
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"bench{os.getpid()}",
    }
    mocker_args = ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--speedup-ratio", "100"]
    if args.context_length:
        mocker_args += ["--context-length", str(args.context_length)]
    limit = (max([*args.sizes, args.burst_size]) + 1) * MB
    with (
        run_python(mocker_args, env=env),
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
             "--max-request-bytes", str(limit)],
            env=env,
        ) as frontend,
    ):  # fmt: skip
        frontend.wait_for_line("OpenAI API on")
        fe = psutil.Process(frontend.pid)
        deadline = time.monotonic() + 30
        while run_uvloop(exchange(port, chat_request("warm up"))) != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the frontend never served the model")
            time.sleep(0.1)
        run_uvloop(burst(port, chat_request("warm up"), 20))
        start_rss = rss_mb(fe)
        print(f"context: {args.context_length or 'the model default (2048)'} tokens")
        print(
            f"{'prompt':>7}{'status':>8}{'time':>9}{'probe p50':>11}{'probe max':>11}"
            f"{'probes':>8}{'failed':>8}{'rss before':>12}{'rss after':>11}"
        )
        worst = 0.0
        for size in args.sizes:
            payload = chat_request((_WORDS * (size * MB // len(_WORDS) + 1))[: size * MB])
            before = rss_mb(fe)
            status, elapsed, lat, failed = run_uvloop(large_while_probing(port, payload))
            worst = max(worst, max(lat, default=0.0))
            print(
                f"{size:>5}MB{status:>8}{elapsed:>8.2f}s{statistics.median(lat or [math.nan]) * 1e3:>9.1f}ms"
                f"{max(lat, default=math.nan) * 1e3:>9.1f}ms{len(lat):>8}{failed:>8}"
                f"{before:>10.0f}MB{rss_mb(fe):>9.0f}MB"
            )
        payload = chat_request(
            (_WORDS * (args.burst_size * MB // len(_WORDS) + 1))[: args.burst_size * MB]
        )
        t0 = time.perf_counter()
        statuses = run_uvloop(burst(port, payload, args.burst))
        during = rss_mb(fe)
        time.sleep(1.0)
        after = rss_mb(fe)
        print(
            f"burst: {args.burst} x {args.burst_size} MB in {time.perf_counter() - t0:.2f}s, "
            f"statuses {sorted(set(statuses))}; rss at start {start_rss:.0f} MB, right after "
            f"{during:.0f} MB, 1 s later {after:.0f} MB"
        )
        print(
            f"summary: probe max {worst * 1e3:.1f} ms while large prompts ran; "
            f"rss {start_rss:.0f} -> {after:.0f} MB after the burst"
        )


if __name__ == "__main__":
    main()
