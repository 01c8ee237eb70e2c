"""Frontend figures: streaming chat requests against frontend + mocker, as processes.

    python bench/frontend.py                      # concurrency 1, 16, 64; keep-alive and new connections
    python bench/frontend.py --requests 2000 --concurrency 64 --no-new-connections
    python bench/frontend.py --http-workers 1 2 --runs 3 --no-new-connections   # 1 vs 2 processes
    python bench/frontend.py --router-service     # routing decisions from python -m dynamo_core.router
    python bench/frontend.py --aiperf             # also run aiperf at concurrency 1 (if installed)
    python bench/frontend.py --dyn-tool-call-parser hermes --dyn-reasoning-parser qwen3 --tools
                                                  # the cost of parsing the output (a tool in each request)

Starts `python -m dynamo_core.mocker` (high speedup ratio, so the engine is not the bottleneck)
and `python -m dynamo_core.frontend` (`--http-workers N` for each N given, runs alternating),
then drives them with a lean raw-socket HTTP client (so the load generator costs as little CPU as
possible on a 2-core machine), pinned to one CPU (`--client-cpu`, default the last one; the
servers are not pinned). Prints requests/s, output tokens/s, TTFT and inter-token latency
percentiles, and the CPU seconds each part used per request: the frontend (all its processes:
the figure to compare with NVIDIA Dynamo's 0.85 CPU-ms), the router service if any, the mocker
and the client. Then one summary line per connection kind (the range over runs, and N against
1), and, with several N or concurrencies, a PNG of req/s and frontend CPU per request against
concurrency per N (`--plot`; needs matplotlib: `pip install "dynamo-core[bench]"`).
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
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from _plots import pyplot, save
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


def cpu(proc: psutil.Process, tree: bool = True) -> float:
    """CPU seconds of `proc` and (`tree`) every process below it (the --http-workers copies)."""
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if tree else ())]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


@dataclass
class Row:
    workers: int
    keep_alive: bool
    concurrency: int
    rps: float
    fe_ms: float  # frontend CPU per request, all its processes
    line: str


def wait_for_model(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
            if json.load(r)["data"]:
                return
        time.sleep(0.05)
    raise RuntimeError("no model within 60 s")


def run_setup(args: argparse.Namespace, workers: int, prompt: str) -> list[Row]:
    """Fresh mocker, router (if asked) and frontend with `workers` HTTP processes; every
    connection kind and concurrency against them."""
    port = free_port()
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"bench{os.getpid()}w{workers}{time.monotonic_ns() % 10**6}",
    }
    mocker = ["-m", "dynamo_core.mocker", "--model-path", str(TINY),
              "--speedup-ratio", str(args.speedup_ratio), *args.parsers]  # fmt: skip
    frontend = ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                "--http-workers", str(workers), "--router-mode", args.router_mode]  # fmt: skip
    rows = []
    with ExitStack() as stack:
        router = None
        if args.router_service:
            router = stack.enter_context(
                run_python(["-m", "dynamo_core.router", "--router-mode", args.router_mode], env=env)
            )
            router.wait_for_line("/route as instance")
            frontend += ["--router-endpoint", "router.route"]
        mk = stack.enter_context(run_python(mocker, env=env))
        fe = stack.enter_context(run_python(frontend, env=env))
        for n in range(workers):
            fe.wait_for_line(f"HTTP worker {n})" if workers > 1 else "OpenAI API on")
        wait_for_model(port)
        procs = [psutil.Process(p.pid) for p in (fe, mk)]
        procs.append(psutil.Process(router.pid) if router else None)  # type: ignore[arg-type]
        me = psutil.Process()
        run_uvloop(run_load(port, 50 * workers, 4, True, prompt, args.max_tokens))  # warm up
        for keep_alive in (True, False) if not args.no_new_connections else (True,):
            for conc in args.concurrency:
                c0 = [cpu(p) if p else 0.0 for p in procs] + [cpu(me, tree=False)]
                result, dt = run_uvloop(
                    run_load(
                        port, args.requests, conc, keep_alive, prompt, args.max_tokens, args.tools
                    )
                )
                c1 = [cpu(p) if p else 0.0 for p in procs] + [cpu(me, tree=False)]
                n = args.requests
                per = [(b - a) / n * 1e3 for a, b in zip(c0, c1, strict=True)]
                line = (
                    f"{workers:>2} {'keepalive' if keep_alive else 'new-conn':<10}{conc:>5}"
                    f"{n / dt:>9.0f}{result.tokens / dt:>10.0f}"
                    f"{pct(result.ttft, 0.5) * 1e3:>8.1f}ms{pct(result.ttft, 0.99) * 1e3:>8.1f}ms"
                    f"{pct(result.itl, 0.5) * 1e3:>7.2f}ms{pct(result.itl, 0.99) * 1e3:>7.2f}ms"
                    f"{per[0]:>15.3f}{per[2]:>8.3f}{per[1]:>8.3f}{per[3]:>8.3f}{result.errors:>5}"
                )
                print(line, flush=True)
                rows.append(Row(workers, keep_alive, conc, n / dt, per[0], line))
        if args.aiperf:
            run_aiperf(port, args.max_tokens)
    return rows


def span(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def summary(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    """One line per connection kind at the highest concurrency: each N's req/s and frontend
    CPU per request (the range over runs), and N against the first N."""
    lines = []
    conc = max(args.concurrency)
    for keep_alive in sorted({r.keep_alive for r in rows}, reverse=True):
        parts = [f"summary: {'keepalive' if keep_alive else 'new-conn'} conc={conc}"]
        sel = [r for r in rows if r.keep_alive == keep_alive and r.concurrency == conc]
        base = [r.rps for r in sel if r.workers == args.http_workers[0]]
        for n in args.http_workers:
            mine = [r for r in sel if r.workers == n]
            part = (
                f"N={n} req/s={span([r.rps for r in mine], '{:.0f}')} "
                f"fe-cpu/req={span([r.fe_ms for r in mine], '{:.3f}')}ms"
            )
            if n != args.http_workers[0] and len(mine) == len(base):
                part += f" x{span([m.rps / b for m, b in zip(mine, base, strict=True)], '{:.2f}')}"
            parts.append(part)
        lines.append(" | ".join(parts))
    return lines


def plot(path: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (rps, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in args.http_workers:
        for keep_alive in sorted({r.keep_alive for r in rows}, reverse=True):
            mine = [r for r in rows if r.workers == n and r.keep_alive == keep_alive]
            concs = sorted({r.concurrency for r in mine})
            label = f"{n} process{'es' if n > 1 else ''}" + ("" if keep_alive else ", new conn.")
            style = "-o" if keep_alive else "--s"
            for ax, attr in ((rps, "rps"), (cost, "fe_ms")):
                means = [
                    sum(getattr(r, attr) for r in mine if r.concurrency == c)
                    / len([r for r in mine if r.concurrency == c])
                    for c in concs
                ]
                ax.plot(concs, means, style, label=label)
    rps.set_title("requests/s")
    cost.set_title("frontend CPU per request (ms, all its processes)")
    for ax in (rps, cost):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted(set(args.concurrency)), [str(c) for c in sorted(set(args.concurrency))]
        )
        ax.set_xlabel("concurrency (streaming clients)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    cost.set_ylim(bottom=0)
    rps.set_ylim(bottom=0)
    save(
        fig,
        path,
        f"frontend --http-workers, {args.max_tokens} streamed tokens per request, "
        f"{os.cpu_count()} cores, client on CPU "
        f"{args.client_cpu if args.client_cpu >= 0 else 'any'}, {args.runs} run(s) averaged",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-new-connections", action="store_true", help="keep-alive runs only")
    parser.add_argument("--speedup-ratio", type=float, default=10000.0)
    parser.add_argument("--http-workers", type=int, nargs="+", default=[1], help="N to compare")
    parser.add_argument("--runs", type=int, default=1, help="runs per N, alternating")
    parser.add_argument("--router-mode", default="round-robin")
    parser.add_argument(
        "--router-service", action="store_true", help="route through python -m dynamo_core.router"
    )
    parser.add_argument(
        "--client-cpu", type=int, default=(os.cpu_count() or 1) - 1, help="-1: not pinned"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default bench/frontend.png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--aiperf", action="store_true", help="also run aiperf at concurrency 1")
    parser.add_argument("--dyn-tool-call-parser", help="the mocker's tool-call parser")
    parser.add_argument("--dyn-reasoning-parser", help="the mocker's reasoning parser")
    parser.add_argument("--tools", action="store_true", help="a tool in every request")
    args = parser.parse_args()
    args.parsers = []
    for flag in ("dyn_tool_call_parser", "dyn_reasoning_parser"):
        if getattr(args, flag):
            args.parsers += ["--" + flag.replace("_", "-"), getattr(args, flag)]

    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})  # the load generator, apart (taskset -c)
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens
    print(
        f"cores: {os.cpu_count()}   prompt ~60 tokens, max_tokens {args.max_tokens}, ignore_eos; "
        f"router {args.router_mode}{' (service)' if args.router_service else ''}; "
        f"client on CPU {args.client_cpu if args.client_cpu >= 0 else 'any'}"
        + (f"; parsers {' '.join(args.parsers)}" if args.parsers else "")
        + ("; tools" if args.tools else "")
    )
    print(
        f"{'N':>2} {'conn':<10}{'conc':>5}{'req/s':>9}{'tok/s':>10}{'ttft p50':>10}"
        f"{'ttft p99':>10}{'itl p50':>9}{'itl p99':>9}{'fe cpu-ms/req':>15}{'router':>8}"
        f"{'mocker':>8}{'client':>8}{'err':>5}"
    )
    rows: list[Row] = []
    for _ in range(args.runs):
        for workers in args.http_workers:
            rows += run_setup(args, workers, prompt)
    for line in summary(args, rows):
        print(line)
    several = len(args.http_workers) > 1 or len(args.concurrency) > 1
    if several and not args.no_plot:
        plot(args.plot or Path(__file__).with_name("frontend.png"), args, rows)


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
