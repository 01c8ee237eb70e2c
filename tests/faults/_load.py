"""The fault suite's load: concurrent streaming chats, each one watched to the last byte.

Per stream it records what a user would notice: the text, the finish reason, the usage, an
error event, whether `data: [DONE]` came and the chunked body ended properly, and the longest
silence between two events (a stall). `exact_against_reference` then asks the same prompts again,
without streaming, on the healthy graph: the mocker's tokens are a pure function of the request,
so a stream that was migrated mid-way must match its reference text exactly.

Used in-process by the tests, and as a script where the load must run in another network
namespace (`python _load.py URL --streams N --max-tokens M`): it prints `STARTED` once every
stream has its first token, then one JSON line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

MODEL = "tiny"


@dataclass
class StreamResult:
    prompt: str
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: dict[str, Any] | None = None
    done: bool = False  # `data: [DONE]` seen
    complete: bool = False  # the chunked body ended properly
    transport_error: str | None = None
    max_gap: float = 0.0  # longest silence between two events, first token included
    exact: bool | None = None

    @property
    def ok(self) -> bool:
        """Finished normally: no error event, [DONE], a complete body, every token."""
        return (
            self.status == 200
            and self.error is None
            and self.done
            and self.complete
            and self.finish_reason is not None
            and self.transport_error is None
        )


@dataclass
class Load:
    url: str
    streams: int
    max_tokens: int
    results: list[StreamResult] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _first: int = 0

    def body(self, prompt: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    async def one(self, http: httpx.AsyncClient, prompt: str) -> StreamResult:
        result = StreamResult(prompt)
        self.results.append(result)
        last = time.monotonic()
        got_first = False
        try:
            async with http.stream(
                "POST", "/v1/chat/completions", json=self.body(prompt, True)
            ) as response:
                result.status = response.status_code
                if response.status_code != 200:
                    result.error = json.loads(await response.aread()).get("error")
                    result.complete = True
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.monotonic()
                    result.max_gap = max(result.max_gap, now - last)
                    last = now
                    data = line[6:]
                    if data == "[DONE]":
                        result.done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        result.error = event["error"]
                        continue
                    if event.get("usage"):
                        result.completion_tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices") or ():
                        result.text += choice.get("delta", {}).get("content") or ""
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                        if not got_first and result.text:
                            got_first = True
                            self._first += 1
                            if self._first == self.streams:
                                self.started.set()
                result.complete = True
        except httpx.HTTPError as exc:
            result.transport_error = f"{type(exc).__name__}: {exc}"
        return result

    async def run(self, start_gap: float = 0.0) -> list[StreamResult]:
        """All streams at once (or `start_gap` seconds apart), to the end."""
        async with _client(self.url, self.streams) as http:

            async def later(i: int) -> StreamResult:
                await asyncio.sleep(i * start_gap)
                return await self.one(http, f"stream {i}: tell me a story")

            return list(await asyncio.gather(*(later(i) for i in range(self.streams))))

    async def exact_against_reference(self) -> int:
        """Ask each finished stream's prompt again (whole response); mark and count matches."""
        async with _client(self.url, 16) as http:
            gate = asyncio.Semaphore(16)

            async def check(result: StreamResult) -> None:
                async with gate:
                    reply = await http.post(
                        "/v1/chat/completions", json=self.body(result.prompt, False)
                    )
                reply.raise_for_status()
                result.exact = reply.json()["choices"][0]["message"]["content"] == result.text

            await asyncio.gather(*(check(r) for r in self.results if r.ok))
        return sum(1 for r in self.results if r.exact)


def _client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(60.0),
        limits=httpx.Limits(max_connections=connections + 4),
    )


def summary(results: list[StreamResult], bound: float | None = None) -> dict[str, int]:
    """The counts a fault case asserts on."""
    counts = {
        "streams": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "exact": sum(bool(r.exact) for r in results),
        "error_events": sum(r.error is not None for r in results),
        "done": sum(r.done for r in results),
        "complete": sum(r.complete for r in results),
    }
    if bound is not None:
        counts["stalled"] = sum(r.max_gap > bound for r in results)
    return counts


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.05
) -> float:
    """Poll `predicate` (for state nothing announces, like an HTTP endpoint's answer) until
    it holds; the seconds it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not await predicate():
        if loop.time() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(step)
    return loop.time() - t0


async def instances(url: str) -> int:
    """Live instances of the model, as the frontend routes to them now."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        try:
            reply = await http.get("/health")
        except httpx.HTTPError:
            return -1
        return int(reply.json().get("instances", {}).get(MODEL, 0))


async def _main(args: argparse.Namespace) -> None:
    load = Load(args.url, args.streams, args.max_tokens)
    task = asyncio.create_task(load.run())
    await asyncio.wait_for(load.started.wait(), 60)
    print("STARTED", flush=True)
    await task
    await load.exact_against_reference()
    print(json.dumps({"results": [asdict(r) for r in load.results]}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=100)
    asyncio.run(_main(parser.parse_args()))
    sys.exit(0)
