"""Start-up time of a graph: from the command to the first successful chat completion.

    python bench/serve_startup.py [--runs 5]

Measures, `--runs` times each (median, min, max), with fresh processes and a fresh discovery
folder every time:

- `dynamo serve examples/graphs/agg.yaml` (launcher, validation, circus, frontend + mocker);
- the same two processes started by hand (`python -m dynamo_core.frontend ...` and
  `python -m dynamo_core.mocker ...`, as `--dry-run` prints them), started together.

The clock stops at the first chat completion that succeeds; the client retries every 10 ms
(nothing else tells a client the graph is up). Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_completion(port: int, deadline: float) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if client.post(url, json=body).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    raise TimeoutError("no successful completion")


def popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def one_run(kind: str) -> float:
    port = free_port()
    namespace = "bench" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as kv:
        env = {"DYN_FILE_KV": kv, "DYN_NAMESPACE": namespace}
        t0 = time.monotonic()
        if kind == "dynamo serve":
            argv = [sys.executable, "-m", "dynamo_serve", "serve", "examples/graphs/agg.yaml"]
            argv += ["--frontend.http-port", str(port), "--namespace", namespace]
            argv += ["--log-dir", str(Path(kv) / "logs")]
            procs = [popen(argv, env)]
        else:
            procs = [
                popen(
                    [sys.executable, "-m", "dynamo_core.frontend", "--http-port", str(port)], env
                ),
                popen(
                    [
                        sys.executable,
                        "-m",
                        "dynamo_core.mocker",
                        "--model-path",
                        "examples/models/tiny",
                    ],
                    env,
                ),
            ]
        try:
            first_completion(port, t0 + 60)
            return time.monotonic() - t0
        finally:
            stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"time to first chat completion, {args.runs} cold starts each (seconds)")
    for kind in ("dynamo serve", "by hand"):
        times = [one_run(kind) for _ in range(args.runs)]
        print(
            f"  {kind:<13} median {statistics.median(times):.3f}  min {min(times):.3f}  "
            f"max {max(times):.3f}  ({', '.join(f'{t:.3f}' for t in times)})"
        )


if __name__ == "__main__":
    main()
