"""KV-aware routing against round-robin: prefix-cache hits and time to first token.

    python bench/router.py                      # 2 mockers, 16 shared prefixes, 320 requests
    python bench/router.py --overlap-weight 4   # favour cache hits over load balance
    python bench/router.py --workers 4 --prefixes 32

For each router mode, starts N mocker processes (prefix caching on, a speedup ratio at which
prefill time matters) and a frontend, then sends chat requests whose long system prompts repeat
(`--prefixes` distinct ones, random order, concurrency 8). Prints the share of prompt tokens
served from the workers' caches (as the workers report it in `usage`) and TTFT percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import openai

from dynamo_core.runtime import run_uvloop
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import free_port

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(port: int, prompts: list[str], concurrency: int) -> tuple[float, list[float]]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    queue = list(prompts)
    cached = total = 0
    ttfts: list[float] = []

    async def worker() -> None:
        nonlocal cached, total
        while queue:
            system = queue.pop()
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": "go"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    total += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    cached += (details.cached_tokens or 0) if details else 0
            ttfts.append(first or 0.0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return cached / max(1, total), ttfts


def run_mode(mode: str, args: argparse.Namespace, prompts: list[str]) -> None:
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"r{os.getpid()}{mode}",
    }
    port = free_port()
    with ExitStack() as stack:
        for _ in range(args.workers):
            stack.enter_context(
                run_python(
                    ["-m", "dynamo_core.mocker", "--model-path", str(TINY),
                     "--speedup-ratio", str(args.speedup_ratio), "--num-gpu-blocks", str(args.blocks)],
                    env=env,
                )
            )  # fmt: skip
        front = stack.enter_context(
            run_python(
                ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                 "--router-mode", mode, "--kv-overlap-score-weight", str(args.overlap_weight)],
                env=env,
            )
        )  # fmt: skip
        front.wait_for_line("OpenAI API on")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                if json.load(r)["instances"].get("tiny", 0) == args.workers:
                    break
            time.sleep(0.05)
        hit, ttfts = run_uvloop(load(port, prompts, 8))
        print(
            f"{mode:<12} cache hits {hit * 100:5.1f}% of prompt tokens   "
            f"TTFT p50 {pct(ttfts, 0.5) * 1e3:6.1f} ms   p90 {pct(ttfts, 0.9) * 1e3:6.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--speedup-ratio", type=float, default=5.0)
    parser.add_argument("--words", type=int, default=100, help="words per shared prefix")
    parser.add_argument("--blocks", type=int, default=300, help="KV blocks per mocker")
    parser.add_argument("--overlap-weight", type=float, default=1.0, help="kv router's weight")
    args = parser.parse_args()
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    systems = [" ".join(rng.choice(words) for _ in range(args.words)) for _ in range(args.prefixes)]
    prompts = [rng.choice(systems) for _ in range(args.requests)]
    print(
        f"{args.workers} mockers of {args.blocks} KV blocks, {args.prefixes} shared prefixes of "
        f"{args.words} words, {args.requests} requests, speedup {args.speedup_ratio}, "
        f"kv overlap weight {args.overlap_weight}"
    )
    for mode in ("round-robin", "kv"):
        run_mode(mode, args, prompts)


if __name__ == "__main__":
    main()
