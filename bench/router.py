"""KV-aware routing against round-robin: time to first token and prefix-cache hits, with a plot.

    python bench/router.py                          # shared prefixes, 3 runs per mode
    python bench/router.py --workload random        # no shared prefixes (kv must not lose)
    python bench/router.py --runs 5 --modes round-robin least-loaded kv
    python bench/router.py --overlap-weight 4       # an override, for comparison
    python bench/router.py --modes kv kv@service    # kv in the frontend, and in a router service

The default workload is the one issue 16 measures: 8 groups of requests sharing a system prompt
of about 1,300 tokens (each request adds its own short question), 160 requests at concurrency 4,
to 2 mockers of 380 KV blocks of 16 tokens at real-time speed (speedup 1): the prefixes do not
all fit in one worker's cache, so where a request lands decides whether its prefill is cached.
`--workload random` sends prompts of the same sizes with nothing shared.

A mode `MODE@service` routes through `python -m dynamo_core.router --router-mode MODE` (the
frontend asks it for each request with `--router-endpoint router.route`): the same decisions, one
request-plane round trip more per request.

Each run starts fresh mockers and a fresh frontend per mode (cold caches), modes alternating, and
sends the same requests in the same order (`max_tokens` and `ignore_eos` set, so every request
decodes `--max-tokens` tokens). Per run and mode it prints the TTFT mean/p50/p90 (client side,
first content chunk) and the share of prompt tokens the workers served from cache (`usage`); then
one summary line (kv against round-robin, the range over runs), and it draws the TTFT CDF per
mode and the cache-hit share into a PNG (`--plot`; needs matplotlib: `pip install
"dynamo-core[bench]"`).
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
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tokenizers import Tokenizer

from _plots import pyplot, save
from dynamo_core.runtime import run_uvloop
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import free_port

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny"
WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or has had not but what all when there can who been one more will their if out so up said "
    "river stone light garden window market winter letter doctor engine signal harbor silver"
).split()


@dataclass
class Result:
    mode: str
    ttfts: list[float] = field(default_factory=list)  # seconds
    cached_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def hit(self) -> float:
        return self.cached_tokens / max(1, self.prompt_tokens)

    def pct(self, q: float) -> float:
        values = sorted(self.ttfts)
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ttfts)


def system_prompt(rng: random.Random, tokenizer: Tokenizer, tokens: int) -> str:
    """Random words, about `tokens` tokens long."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words)).ids) < tokens:
        words += [rng.choice(WORDS) for _ in range(max(1, (tokens - len(words)) // 8))]
    return " ".join(words)


def make_requests(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(system prompt, question) per request, in sending order."""
    rng = random.Random(args.seed)
    tokenizer = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    if args.workload == "shared":
        systems = [system_prompt(rng, tokenizer, args.prefix_tokens) for _ in range(args.prefixes)]
        chosen = [rng.choice(systems) for _ in range(args.requests)]
    else:
        chosen = [system_prompt(rng, tokenizer, args.prefix_tokens) for _ in range(args.requests)]
    return [(system, f"Question {i}: what comes next?") for i, system in enumerate(chosen)]


async def send_all(
    port: int, requests: list[tuple[str, str]], args: argparse.Namespace, result: Result
) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    queue = list(reversed(requests))

    async def one_at_a_time() -> None:
        while queue:
            system, question = queue.pop()
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                max_tokens=args.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    result.prompt_tokens += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    result.cached_tokens += (details.cached_tokens or 0) if details else 0
            if first is None:
                raise RuntimeError("a request produced no content")
            result.ttfts.append(first)

    try:
        await asyncio.gather(*(one_at_a_time() for _ in range(args.concurrency)))
    finally:
        await client.close()


def wait_for_workers(port: int, workers: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            if json.load(r)["instances"].get("tiny", 0) == workers:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{workers} workers did not register within 60 s")


def run_mode(mode: str, args: argparse.Namespace, requests: list[tuple[str, str]]) -> Result:
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"r{os.getpid()}{mode.replace('-', '')}{time.monotonic_ns() % 10**6}",
    }
    port = free_port()
    mocker = ["-m", "dynamo_core.mocker", "--model-path", str(TINY),
              "--speedup-ratio", str(args.speedup_ratio), "--num-gpu-blocks", str(args.blocks),
              "--block-size", str(args.block_size)]  # fmt: skip
    policy, _, where = mode.partition("@")
    routing = ["--router-mode", policy]
    if args.overlap_weight is not None:
        routing += ["--kv-overlap-score-weight", str(args.overlap_weight)]
    if args.temperature is not None:
        routing += ["--router-temperature", str(args.temperature)]
    frontend = ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)]
    frontend += ["--router-endpoint", "router.route"] if where == "service" else routing
    result = Result(mode)
    with ExitStack() as stack:
        if where == "service":
            router = stack.enter_context(
                run_python(["-m", "dynamo_core.router", *routing], env=env)
            )
            router.wait_for_line("/route as instance")
        for _ in range(args.workers):
            stack.enter_context(run_python(mocker, env=env))
        front = stack.enter_context(run_python(frontend, env=env))
        front.wait_for_line("OpenAI API on")
        wait_for_workers(port, args.workers)
        run_uvloop(send_all(port, requests, args, result))
    return result


def describe(r: Result) -> str:
    return (
        f"{r.mode:<13} TTFT mean {r.mean * 1e3:6.1f} ms  p50 {r.pct(0.5) * 1e3:6.1f} ms  "
        f"p90 {r.pct(0.9) * 1e3:6.1f} ms   cache hits {r.hit * 100:5.1f}% of prompt tokens"
    )


def span(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if values else "n/a"


def summary(args: argparse.Namespace, runs: list[dict[str, Result]]) -> str:
    parts = [f"summary: {args.workload} runs={len(runs)}"]
    base = "round-robin" if "round-robin" in args.modes else None
    for mode in args.modes:
        res = [run[mode] for run in runs]
        parts.append(
            f"{mode} mean={span([r.mean * 1e3 for r in res], '{:.0f}')}ms "
            f"p50={span([r.pct(0.5) * 1e3 for r in res], '{:.0f}')}ms "
            f"hit={span([r.hit * 100 for r in res], '{:.0f}')}%"
        )
        if base is not None and mode != base:
            mean_x = [run[base].mean / run[mode].mean for run in runs]
            p50_x = [run[base].pct(0.5) / run[mode].pct(0.5) for run in runs]
            parts.append(
                f"{mode}/rr better: mean x{span(mean_x, '{:.2f}')} p50 x{span(p50_x, '{:.2f}')}"
            )
    return " | ".join(parts)


def plot(path: Path, args: argparse.Namespace, runs: list[dict[str, Result]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    import matplotlib.ticker

    fig, (cdf, hits) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[2.2, 1])
    for mode in args.modes:
        values = sorted(t * 1e3 for run in runs for t in run[mode].ttfts)
        ys = [(i + 1) / len(values) for i in range(len(values))]
        cdf.step(values, ys, where="post", label=f"{mode} (p50 {values[len(values) // 2]:.0f} ms)")
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    cdf.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    cdf.tick_params(axis="x", which="minor", labelsize=7)
    cdf.set_xlabel("time to first token (ms, log scale)")
    cdf.set_ylabel("share of requests")
    cdf.set_title(f"TTFT CDF, {args.workload} workload, {len(runs)} run(s) pooled")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right")
    shares = [statistics.fmean(run[mode].hit for run in runs) * 100 for mode in args.modes]
    bars = hits.bar(args.modes, shares, color=["C0", "C1", "C2", "C3"][: len(args.modes)])
    hits.bar_label(bars, fmt="%.0f%%")
    hits.set_ylim(0, 100)
    hits.set_ylabel("prompt tokens served from cache (%)")
    hits.set_title("cache-hit share")
    save(
        fig,
        path,
        f"{args.workers} mockers x {args.blocks} blocks of {args.block_size}, "
        f"{args.requests} requests at concurrency {args.concurrency}, speedup {args.speedup_ratio}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["shared", "random"], default="shared")
    parser.add_argument("--modes", nargs="+", default=["round-robin", "kv"])
    parser.add_argument("--runs", type=int, default=3, help="fresh runs per mode, alternating")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=8, help="shared system prompts")
    parser.add_argument("--prefix-tokens", type=int, default=1300, help="tokens per system prompt")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens decoded per request")
    parser.add_argument("--speedup-ratio", type=float, default=1.0)
    parser.add_argument("--blocks", type=int, default=380, help="KV blocks per mocker")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--overlap-weight", type=float, help="--kv-overlap-score-weight override")
    parser.add_argument("--temperature", type=float, help="--router-temperature override")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="PNG path (default bench/router-WORKLOAD.png)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    requests = make_requests(args)
    print(
        f"{args.workload} workload: {args.requests} requests"
        + (f" over {args.prefixes} prefixes" if args.workload == "shared" else "")
        + f" of ~{args.prefix_tokens} tokens, concurrency {args.concurrency}, {args.max_tokens} "
        f"output tokens; {args.workers} mockers of {args.blocks} blocks of {args.block_size}, "
        f"speedup {args.speedup_ratio}"
        + (f"; overlap weight {args.overlap_weight}" if args.overlap_weight is not None else "")
        + (f"; temperature {args.temperature}" if args.temperature is not None else "")
    )
    runs: list[dict[str, Result]] = []
    for n in range(args.runs):
        run = {}
        for mode in args.modes:
            run[mode] = run_mode(mode, args, requests)
            print(f"run {n + 1}  {describe(run[mode])}", flush=True)
        runs.append(run)
    print(summary(args, runs))
    if not args.no_plot:
        plot(args.plot or Path(__file__).with_name(f"router-{args.workload}.png"), args, runs)


if __name__ == "__main__":
    main()
