"""`dynamo-run`: the frontend and one engine in one process.

    dynamo-run in=http out=mocker --model-path examples/models/tiny [--http-port 8000]
    dynamo-run in=text out=echo --model-path examples/models/tiny
    dynamo-run in=batch:prompts.jsonl out=vllm --model examples/models/tiny [--output out.jsonl]

`out=` names an engine: `echo` and `mocker` are built in; others come from the `dynamo.engines`
entry-point group (`out=vllm` once dynamo-vllm is installed). The engine is checked first (not
installed, or a version outside its package's range: one line, exit status 2); then the engine
module's own `worker()` runs on this process's runtime (`worker.run_in`: the same adapter,
`register_model` and `serve_endpoint` as `python -m dynamo_<engine>.worker`, with the engine's
flags), next to the frontend. Everything runs on the in-process backends (`mem` discovery,
`inproc` requests): no ports but the HTTP one, no files. What a process does before its runtime
starts is not done here: signals are dynamo-run's own, and TensorRT-LLM's LLM API spawns its
ranks itself rather than being re-run under mpirun.

dynamo-run's own flags (`RunConfig`, anywhere on the line): `--http-host`, `--http-port`,
`--output` (batch), `--concurrency` (batch), `--max-tokens` (text and batch defaults), and the
router's, as the frontend has them (`RouterConfig`: `--router-mode`, `--kv-overlap-score-weight`,
`--router-temperature`, the admission thresholds). The rest go to the engine's own parser.

`in=text` is a chat on the terminal: each line is a user turn, the answer streams back, and
the conversation is kept (and trimmed to the model's context, oldest turns first, with a note
on stderr). Ctrl-C cancels the answer in progress, or leaves at the prompt; Ctrl-D leaves.
Logs go to stderr at WARNING (`DYN_LOG` says otherwise). With stdin not a terminal it answers
line after line and exits with status 1 if any line failed.

`in=batch:FILE` reads one JSON object per line: `{"text": "..."}` (a user message),
`{"messages": [...]}` (a chat) or `{"prompt": "..."}` (a plain completion), with optional
`max_tokens`; it writes one JSON line per input line, in input order, with the response text,
token counts, finish reason and latency; the exit status is 1 if any line failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.engines import find_engine
from dynamo_core.errors import ConfigError, DynamoError
from dynamo_core.router.config import RouterConfig
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, configure_logging, run_uvloop

__all__ = ["RunConfig", "main"]

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


class RunConfig(RouterConfig):
    """dynamo-run's own flags: where it serves, batch settings, and the router's."""

    http_host: str = Field("0.0.0.0", description="in=http: the address to listen on.")
    http_port: int = Field(8000, ge=0, le=65535, description="in=http: the port (0: any).")
    output: Path | None = Field(None, description="in=batch: write the results here (not stdout).")
    concurrency: int = Field(8, ge=1, description="in=batch: lines in flight at once.")
    max_tokens: int | None = Field(
        None, ge=1, description="in=text and in=batch: max_tokens of a request that sets none."
    )


def _own_parser() -> DynFlexibleArgumentParser[RunConfig]:
    return DynFlexibleArgumentParser(RunConfig, prog="dynamo-run", group="dynamo-run")


def _split_own(argv: list[str]) -> tuple[RunConfig, list[str]]:
    """dynamo-run's own flags (with their values) parsed; the rest, in order, for the engine."""
    parser = _own_parser()
    actions = parser.option_actions()
    own: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        name, eq, _ = arg.partition("=")
        action = actions.get("--" + name[2:].replace("_", "-")) if name.startswith("--") else None
        if action is None or action.dest.startswith("help") or "config" in action.dest:
            rest.append(arg)
            continue
        own.append(arg)
        if not eq and action.nargs != 0:
            own.extend(itertools.islice(args, 1))  # its value
    return parser.parse(own, environ={}).config, rest


async def _run(source: str, target: str, own: RunConfig, engine_argv: list[str]) -> int:
    from dynamo_core.frontend.service import OpenAIService

    spec = find_engine(target)
    spec.check()  # not installed, or the wrong version: one line, before anything starts
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
        # the engine module's own worker() body on this process's runtime: its adapter,
        # register_model and serve_endpoint, line for line what python -m runs
        serving = asyncio.create_task(module.worker.run_in(runtime, parsed))
        service = OpenAIService(runtime, namespace=namespace, router=own.router_settings())
        await service.start()
        try:
            await _until_listed(service, serving, target)
            entry = service.models.listed()[0]
            code = 0
            if source == "http":
                await _serve_http(runtime, service, own)
            elif source == "text":
                code = await _chat_loop(service, entry.name, entry.card.context_length, own)
            else:
                code = await _batch(service, entry.name, Path(source[len("batch:") :]), own)
        finally:
            runtime.request_shutdown()
            await service.close()
            await _stop(serving, runtime.config.graceful_shutdown_timeout + 10)
    return code


async def _until_listed(service: Any, serving: asyncio.Task[Any], target: str) -> None:
    """Wait (120 s at most) until the frontend lists a model; the engine's own error if its
    worker ends first."""
    async with asyncio.timeout(120):
        while not service.models.listed():
            change = asyncio.ensure_future(service.models.wait_for_change())
            await asyncio.wait([change, serving], return_when=asyncio.FIRST_COMPLETED)
            change.cancel()
            if serving.done():
                serving.result()
                raise ConfigError(f"engine {target} stopped before serving a model")


async def _stop(serving: asyncio.Task[Any], timeout: float) -> None:
    """Let the worker drain and close its engine after a shutdown request; cancel it after
    `timeout` (its `async with` still closes the engine)."""
    done, _ = await asyncio.wait([serving], timeout=timeout)
    if not done:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    elif not serving.cancelled() and serving.exception() is not None:
        log.warning("the engine stopped with an error: %s", serving.exception())


async def _serve_http(runtime: DistributedRuntime, service: Any, own: RunConfig) -> None:
    import signal

    from dynamo_core.http import serve_http

    server = await serve_http(service.handle, own.http_host, own.http_port, flag="--http-port")
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


class _Refused(DynamoError):
    """The frontend answered a request with an error (its OpenAI `code`, and message)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


async def _stream_chat(service: Any, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    from dynamo_core.http import Request, Response

    request = Request("POST", "/v1/chat/completions", "", {}, json.dumps(body).encode(), True)
    response = await service.handle(request)
    if isinstance(response, Response):
        error = json.loads(response.body).get("error", {})
        raise _Refused(error.get("message", f"HTTP {response.status}"), error.get("code"))
    async for chunk in response.body:
        for line in bytes(chunk).split(b"\n"):
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise DynamoError(event["error"]["message"])
                yield event


class _StdinLines:
    """Lines from stdin, read on the event loop, so that Ctrl-C never waits behind a blocked
    read in a thread (and no thread is left to call back into a closed loop). A regular file
    cannot be watched with epoll: it is read directly (such reads never block)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._eof = False
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_reader(fd, self._on_readable)
            self._watched = True
        except PermissionError:
            self._watched = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._buffer += data
        else:
            self._eof = True
            self._loop.remove_reader(self.fd)
        self._ready.set()

    async def readline(self) -> str | None:
        """The next line without its newline; None at end of input (Ctrl-D)."""
        while b"\n" not in self._buffer and not self._eof:
            if not self._watched:
                self._on_readable()
                continue
            self._ready.clear()
            await self._ready.wait()
        if not self._buffer:
            return None
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = rest
        return line.decode("utf-8", "replace")

    def close(self) -> None:
        if self._watched and not self._eof:
            self._loop.remove_reader(self.fd)


def _note(text: str) -> None:
    sys.stderr.write(f"[{text}]\n")
    sys.stderr.flush()


class _Chat:
    """One conversation with a model: turns kept, trimmed to its context oldest first."""

    def __init__(self, service: Any, model: str, context_length: int, max_tokens: int) -> None:
        self.service = service
        self.model = model
        self.context_length = context_length
        self.max_tokens = max_tokens
        self.messages: list[dict[str, str]] = []

    async def answer(self, prompt: str) -> None:
        """Stream the answer to `prompt` on stdout; the turn is kept only when it completes."""
        self.messages.append({"role": "user", "content": prompt})
        pieces: list[str] = []
        try:
            async for piece in self._stream():
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except BaseException:
            self.messages.pop()
            if pieces:
                sys.stdout.write("\n")
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    async def _stream(self) -> AsyncIterator[str]:
        while True:
            body = {
                "model": self.model,
                "messages": self.messages,
                "max_tokens": self.max_tokens,
                "stream": True,
            }
            try:
                async for event in _stream_chat(self.service, body):
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            yield piece
                return
            except _Refused as exc:  # refused before the first token: nothing was shown
                if exc.code != "context_length_exceeded" or len(self.messages) < 3:
                    raise
            del self.messages[:2]  # the oldest user turn and its answer
            _note(
                f"the conversation is longer than the model's {self.context_length}-token "
                "context: dropped its oldest turn"
            )


async def _chat_loop(service: Any, model: str, context_length: int, own: RunConfig) -> int:
    """The REPL (see the module docstring); returns the exit status."""
    max_tokens = own.max_tokens or max(16, min(1024, context_length // 4))
    chat = _Chat(service, model, context_length, max_tokens)
    interactive = sys.stdin.isatty()
    lines = _StdinLines(sys.stdin.fileno())
    loop = asyncio.get_running_loop()
    interrupt: asyncio.Future[None] = loop.create_future()

    def on_sigint() -> None:
        if not interrupt.done():
            interrupt.set_result(None)

    async def until_interrupted(work: asyncio.Future[Any]) -> bool:
        """Wait for `work`; True (and `work` cancelled) if Ctrl-C came first."""
        nonlocal interrupt
        await asyncio.wait([work, interrupt], return_when=asyncio.FIRST_COMPLETED)
        if not interrupt.done():
            return False
        interrupt = loop.create_future()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return True

    failures = 0
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            reading = asyncio.ensure_future(lines.readline())
            if await until_interrupted(reading):
                sys.stdout.write("\n")
                break
            line = reading.result()
            if line is None:
                if interactive:
                    sys.stdout.write("\n")
                break
            prompt = line.strip()
            if not prompt:
                continue
            answering = asyncio.ensure_future(chat.answer(prompt))
            if await until_interrupted(answering):
                _note("cancelled")
                continue
            exc = answering.exception()
            if isinstance(exc, DynamoError):
                failures += 1
                sys.stderr.write(f"error: {exc}\n")
            elif exc is not None:
                raise exc
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        lines.close()
        sys.stdout.flush()
    return 1 if failures and not interactive else 0


async def _batch(service: Any, model: str, path: Path, own: RunConfig) -> int:
    try:
        lines = await asyncio.to_thread(path.read_text)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    entries = [ln for ln in lines.splitlines() if ln.strip()]
    results: list[str | None] = [None] * len(entries)
    failed: list[int] = []
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
                failed.append(i + 1)
            results[i] = json.dumps(out, ensure_ascii=False)

    await asyncio.gather(*(one(i, raw) for i, raw in enumerate(entries)))
    text = "".join(f"{r}\n" for r in results)
    if own.output:
        await asyncio.to_thread(Path(own.output).write_text, text)
        log.info("wrote %d results to %s", len(results), own.output)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if failed:
        log.warning(
            "%d of %d lines failed (their results hold the error)", len(failed), len(results)
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(f"usage: {USAGE}\n\n{__doc__}")
        return
    try:
        source, target, rest = _split(args)
        # a chat's terminal is the conversation: only warnings unless DYN_LOG asks for more
        configure_logging("warning" if source == "text" else "info")
        own, engine_argv = _split_own(rest)
        code = run_uvloop(_run(source, target, own, engine_argv))
    except ConfigError as exc:
        sys.stderr.write(f"dynamo-run: error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
