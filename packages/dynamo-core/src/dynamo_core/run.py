"""`dynamo-run`: the frontend and one engine in one process.

    dynamo-run in=http out=mocker --model-path examples/models/tiny [--http-port 8000]
    dynamo-run in=text out=echo --model-path examples/models/tiny
    dynamo-run in=batch:prompts.jsonl out=vllm --model examples/models/tiny [--output out.jsonl]

`out=` names an engine: `echo` and `mocker` are built in; others come from the `dynamo.engines`
entry-point group (`out=vllm` once dynamo-vllm is installed), and run the very same worker code
as `python -m dynamo_<engine>.worker`. Everything runs on the in-process backends (`mem`
discovery, `inproc` requests): no ports but the HTTP one, no files.

Flags before the engine's: `--http-host`, `--http-port`, `--router-mode`, `--output` (batch),
`--concurrency` (batch), `--max-tokens` (text and batch defaults). The rest go to the engine's
own parser.

`in=batch:FILE` reads one JSON object per line: `{"text": "..."}` (a user message),
`{"messages": [...]}` (a chat) or `{"prompt": "..."}` (a plain completion), with optional
`max_tokens`; it writes one JSON line per input line, in input order, with the response text,
token counts, finish reason and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from dynamo_core.engines import find_engine
from dynamo_core.errors import ConfigError, DynamoError
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, run_uvloop

__all__ = ["main"]

log = logging.getLogger("dynamo.run")

USAGE = "dynamo-run in=http|text|batch:FILE.jsonl out=echo|mocker|<engine> [flags]"


def _split(argv: list[str]) -> tuple[str, str, list[str]]:
    source, target, rest = "http", "", []
    for arg in argv:
        if arg.startswith("in="):
            source = arg[3:]
        elif arg.startswith("out="):
            target = arg[4:]
        else:
            rest.append(arg)
    if not target:
        raise ConfigError(f"missing out=ENGINE; usage: {USAGE}")
    if source not in ("http", "text") and not source.startswith("batch:"):
        raise ConfigError(f"unknown in={source}: use http, text or batch:FILE.jsonl")
    return source, target, rest


def _own_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--http-host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument(
        "--router-mode",
        default="round-robin",
        choices=["round-robin", "random", "least-loaded", "kv"],
    )
    p.add_argument("--output", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None)
    return p


async def _run(source: str, target: str, own: argparse.Namespace, engine_argv: list[str]) -> int:
    from dynamo_core.frontend.service import OpenAIService

    spec = find_engine(target)
    module = spec.load()
    parsed = module.build_parser().parse_or_exit(engine_argv)
    namespace = parsed.config.namespace if isinstance(parsed.config, RuntimeConfig) else "dynamo"
    runtime_config = RuntimeConfig.in_process(namespace=namespace)
    if isinstance(parsed.config, RuntimeConfig):
        # the engine's runtime settings must say in-process too
        parsed = dataclasses.replace(
            parsed,
            config=parsed.config.model_copy(
                update={"discovery_backend": "mem", "request_plane": "inproc"}
            ),
        )
    async with DistributedRuntime(runtime_config) as runtime:
        worker = await module.start_engine(runtime, parsed)
        serving = asyncio.create_task(worker.serve())
        service = OpenAIService(runtime, namespace=namespace, router_mode=own.router_mode)
        await service.start()
        try:
            async with asyncio.timeout(120):
                while not service.models.listed():
                    if serving.done():
                        serving.result()
                        raise ConfigError(f"engine {target} stopped before serving a model")
                    await service.models.wait_for_change()
            model = service.models.listed()[0].name
            if source == "http":
                await _serve_http(runtime, service, own)
            elif source == "text":
                await _chat_loop(service, model, own)
            else:
                await _batch(service, model, Path(source[len("batch:") :]), own)
        finally:
            runtime.request_shutdown()
            await service.close()
            await asyncio.wait([serving], timeout=10)
            await worker.close()
    return 0


async def _serve_http(runtime: DistributedRuntime, service: Any, own: argparse.Namespace) -> None:
    import signal

    from dynamo_core.http import serve_http

    server = await serve_http(service.handle, own.http_host, own.http_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runtime.request_shutdown)
    host = "localhost" if own.http_host in ("0.0.0.0", "::") else own.http_host
    log.info("OpenAI API on http://%s:%d/v1", host, server.port)
    await runtime.wait_for_shutdown()
    await server.close()


async def _complete(service: Any, body: dict[str, Any], path: str) -> dict[str, Any]:
    """One request through the frontend's own pipeline (no HTTP)."""
    from dynamo_core.http import Request, Response

    request = Request("POST", path, "", {}, json.dumps(body).encode(), True)
    response = await service.handle(request)
    assert isinstance(response, Response)
    data: dict[str, Any] = json.loads(response.body)
    if response.status != 200:
        raise DynamoError(data.get("error", {}).get("message", f"HTTP {response.status}"))
    return data


async def _stream_chat(service: Any, body: dict[str, Any]) -> Any:
    from dynamo_core.http import Request, Response

    request = Request("POST", "/v1/chat/completions", "", {}, json.dumps(body).encode(), True)
    response = await service.handle(request)
    if isinstance(response, Response):
        raise DynamoError(json.loads(response.body)["error"]["message"])
    async for chunk in response.body:
        for line in bytes(chunk).split(b"\n"):
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


async def _chat_loop(service: Any, model: str, own: argparse.Namespace) -> None:
    """Interactive chat on the terminal; history is kept until EOF (Ctrl-D)."""
    messages: list[dict[str, str]] = []
    loop = asyncio.get_running_loop()
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("? ")
            sys.stdout.flush()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        prompt = line.strip()
        if not prompt:
            continue
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        if own.max_tokens:
            body["max_tokens"] = own.max_tokens
        answer = []
        try:
            async for event in _stream_chat(service, body):
                if "error" in event:
                    raise DynamoError(event["error"]["message"])
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except DynamoError as exc:
            sys.stderr.write(f"error: {exc}\n")
            messages.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})


async def _batch(service: Any, model: str, path: Path, own: argparse.Namespace) -> None:
    try:
        lines = await asyncio.to_thread(path.read_text)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    entries = [ln for ln in lines.splitlines() if ln.strip()]
    results: list[str | None] = [None] * len(entries)
    sem = asyncio.Semaphore(max(1, own.concurrency))

    async def one(i: int, raw: str) -> None:
        async with sem:
            t0 = time.monotonic()
            try:
                item = json.loads(raw)
                if not isinstance(item, dict):
                    raise ValueError("each line must be a JSON object")
                max_tokens = item.get("max_tokens", own.max_tokens)
                if "prompt" in item:
                    body: dict[str, Any] = {"model": model, "prompt": item["prompt"]}
                    path_ = "/v1/completions"
                else:
                    messages = item.get("messages") or [{"role": "user", "content": item["text"]}]
                    body = {"model": model, "messages": messages}
                    path_ = "/v1/chat/completions"
                if max_tokens:
                    body["max_tokens"] = max_tokens
                data = await _complete(service, body, path_)
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                out = {
                    **item,
                    "response": text,
                    "tokens_in": data["usage"]["prompt_tokens"],
                    "tokens_out": data["usage"]["completion_tokens"],
                    "finish_reason": choice["finish_reason"],
                    "elapsed_ms": round((time.monotonic() - t0) * 1000, 3),
                }
            except (ValueError, KeyError, TypeError, DynamoError) as exc:
                out = {"line": i + 1, "error": str(exc)}
            results[i] = json.dumps(out, ensure_ascii=False)

    await asyncio.gather(*(one(i, raw) for i, raw in enumerate(entries)))
    text = "".join(f"{r}\n" for r in results)
    if own.output:
        await asyncio.to_thread(Path(own.output).write_text, text)
        log.info("wrote %d results to %s", len(results), own.output)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(f"usage: {USAGE}\n\n{__doc__}")
        return
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        source, target, rest = _split(args)
        own, engine_argv = _own_flags().parse_known_args(rest)
        code = run_uvloop(_run(source, target, own, engine_argv))
    except ConfigError as exc:
        sys.stderr.write(f"dynamo-run: error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
