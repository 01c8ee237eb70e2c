"""Frontend figures: streaming chat requests against frontend + mocker, as processes.

    python bench/frontend.py                      # concurrency 1, 16, 64; keep-alive and new connections
    python bench/frontend.py --requests 2000 --concurrency 64 --no-new-connections
    python bench/frontend.py --aiperf             # also run aiperf at concurrency 1 (if installed)
    python bench/frontend.py --dyn-tool-call-parser hermes --dyn-reasoning-parser qwen3 --tools
                                                  # the cost of parsing the output (a tool in each request)

Starts `python -m dynamo_core.mocker` (high speedup ratio, so the engine is not the bottleneck)
and `python -m dynamo_core.frontend`, then drives them with a lean raw-socket HTTP client (so
the load generator costs as little CPU as possible on a 2-core machine). Prints requests/s,
output tokens/s, TTFT and inter-token latency percentiles, and the CPU seconds each process used
(per request, for the frontend: the figure to compare with NVIDIA Dynamo's 0.85 CPU-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from dynamo_core.runtime import run_uvloop
from dynamo_core.testing.procs import run_python

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "models" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Result:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.errors = 0


async def one(
    port: int,
    payload: bytes,
    result: Result,
    conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None,
) -> None:
    if conn:
        reader, writer = conn[0]
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn is not None:
            conn.append((reader, writer))
    t0 = time.perf_counter()
    writer.write(payload)
    status = await reader.readline()
    if b" 200 " not in status:
        result.errors += 1
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    last = None
    events = 0
    while True:
        size_line = await reader.readline()
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            break
        chunk = await reader.readexactly(size + 2)
        now = time.perf_counter()
        n = chunk.count(b'"content":"') - chunk.count(b'"content":""')
        if n:
            if last is None:
                result.ttft.append(now - t0)
            else:
                result.itl.extend([(now - last) / n] * n)
            last = now
            events += n
    result.tokens += events
    if conn is None:
        writer.close()


#: What `--tools` adds to each request (so that the tool-call parser runs on the output).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def run_load(
    port: int,
    requests: int,
    concurrency: int,
    keep_alive: bool,
    prompt: str,
    max_tokens: int,
    tools: bool = False,
) -> tuple[Result, float]:
    request: dict[str, object] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    if tools:
        request["tools"] = TOOLS
    body = json.dumps(request).encode()
    payload = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%b\r\n"
        % (len(body), b"" if keep_alive else b"connection: close\r\n")
    ) + body
    result = Result()
    todo = iter(range(requests))

    async def worker() -> None:
        conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = (
            [] if keep_alive else None
        )
        for _ in todo:
            await one(port, payload, result, conn)
        if conn:
            conn[0][1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result, time.perf_counter() - t0


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-new-connections", action="store_true", help="keep-alive runs only")
    parser.add_argument("--speedup-ratio", type=float, default=10000.0)
    parser.add_argument("--aiperf", action="store_true", help="also run aiperf at concurrency 1")
    parser.add_argument("--dyn-tool-call-parser", help="the mocker's tool-call parser")
    parser.add_argument("--dyn-reasoning-parser", help="the mocker's reasoning parser")
    parser.add_argument("--tools", action="store_true", help="a tool in every request")
    args = parser.parse_args()
    parsers = []
    for flag in ("dyn_tool_call_parser", "dyn_reasoning_parser"):
        if getattr(args, flag):
            parsers += ["--" + flag.replace("_", "-"), getattr(args, flag)]

    port = free_port()
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"bench{os.getpid()}",
    }
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens
    with (
        run_python(
            [
                "-m",
                "dynamo_core.mocker",
                "--model-path",
                str(TINY),
                "--speedup-ratio",
                str(args.speedup_ratio),
                *parsers,
            ],
            env=env,
        ) as mocker,
        run_python(
            ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
            env=env,
        ) as frontend,
    ):
        frontend.wait_for_line("OpenAI API on")
        fe, mk, me = psutil.Process(frontend.pid), psutil.Process(mocker.pid), psutil.Process()
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                if json.load(r)["data"]:
                    break
            time.sleep(0.05)
        run_uvloop(run_load(port, 50, 4, True, prompt, args.max_tokens))  # warm up
        print(
            f"cores: {os.cpu_count()}   prompt ~60 tokens, max_tokens {args.max_tokens}, ignore_eos"
            + (f", parsers {' '.join(parsers)}" if parsers else "")
            + (", tools" if args.tools else "")
        )
        header = (
            f"{'conn':<10}{'conc':>5}{'req/s':>9}{'tok/s':>10}{'ttft p50':>10}{'ttft p99':>10}"
            f"{'itl p50':>9}{'itl p99':>9}{'fe cpu-ms/req':>15}{'mocker':>8}{'client':>8}{'err':>5}"
        )
        print(header)
        for keep_alive in (True, False) if not args.no_new_connections else (True,):
            for conc in args.concurrency:
                c0 = (cpu(fe), cpu(mk), cpu(me))
                result, dt = run_uvloop(
                    run_load(
                        port, args.requests, conc, keep_alive, prompt, args.max_tokens, args.tools
                    )
                )
                c1 = (cpu(fe), cpu(mk), cpu(me))
                n = args.requests
                print(
                    f"{'keepalive' if keep_alive else 'new-conn':<10}{conc:>5}{n / dt:>9.0f}"
                    f"{result.tokens / dt:>10.0f}"
                    f"{pct(result.ttft, 0.5) * 1e3:>8.1f}ms{pct(result.ttft, 0.99) * 1e3:>8.1f}ms"
                    f"{pct(result.itl, 0.5) * 1e3:>7.2f}ms{pct(result.itl, 0.99) * 1e3:>7.2f}ms"
                    f"{(c1[0] - c0[0]) / n * 1e3:>15.3f}{(c1[1] - c0[1]) / n * 1e3:>8.3f}"
                    f"{(c1[2] - c0[2]) / n * 1e3:>8.3f}{result.errors:>5}"
                )
        if args.aiperf:
            run_aiperf(port, args.max_tokens)


def run_aiperf(port: int, max_tokens: int) -> None:
    cmd = [
        "aiperf", "profile", "--model", "tiny", "--url", f"http://127.0.0.1:{port}",
        "--endpoint-type", "chat", "--streaming", "--concurrency", "1", "--request-count", "200",
        "--synthetic-input-tokens-mean", "60", "--output-tokens-mean", str(max_tokens),
        "--extra-inputs", "ignore_eos:true", "--tokenizer", str(TINY),
    ]  # fmt: skip
    print("\n$ " + " ".join(cmd))
    try:
        subprocess.run(cmd, check=False, timeout=600)
    except FileNotFoundError:
        print("aiperf is not installed: pip install aiperf", file=sys.stderr)


if __name__ == "__main__":
    main()
