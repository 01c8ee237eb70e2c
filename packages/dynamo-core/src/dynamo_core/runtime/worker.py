"""`@dynamo_worker()`: turn `async def worker(runtime, ...)` into a process entry point.

    @dynamo_worker()
    async def worker(runtime: DistributedRuntime, config: MyConfig) -> None:
        ...
        await endpoint.serve_endpoint(handler.generate)

    def main() -> None:
        worker(parse_config())        # runs to completion; returns the exit status

Calling the decorated function installs uvloop, builds the runtime from the first positional
argument that is a `RuntimeConfig` (a component config subclasses it) or else from the
environment, runs the coroutine, and shuts down cleanly on SIGINT/SIGTERM: the runtime stops
taking requests, unregisters from discovery and lets in-flight streams finish within
`graceful_shutdown_timeout`; a second signal ends the process at once. A backend that cannot be
reached, a bad flag, or an engine that fails to start (any `DynamoError`) ends the process
with one line naming it, not a traceback; the exit status is `EXIT_CONFIG` (78) for a
`ConfigError` (it would recur identically on a restart, so `dynamo serve` stops the graph) and 1
for anything else (worth a restart). `await worker.run_async(...)` runs the same inside an
existing event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol

from dynamo_core.errors import EXIT_CONFIG, ConfigError, DynamoError
from dynamo_core.runtime._core import DistributedRuntime
from dynamo_core.runtime.config import RuntimeConfig

__all__ = ["DynamoWorker", "dynamo_worker", "install_uvloop", "run_uvloop"]

log = logging.getLogger("dynamo.worker")
P = ParamSpec("P")


def install_uvloop() -> bool:
    """Use uvloop's event loop policy where uvloop is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run_uvloop(coro: Awaitable[Any]) -> Any:
    """`asyncio.run` on uvloop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


class DynamoWorker(Protocol[P]):
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> int: ...

    async def run_async(self, *args: P.args, **kwargs: P.kwargs) -> None: ...


def dynamo_worker(
    config: RuntimeConfig | None = None,
) -> Callable[[Callable[Concatenate[DistributedRuntime, P], Awaitable[Any]]], DynamoWorker[P]]:
    def decorate(
        fn: Callable[Concatenate[DistributedRuntime, P], Awaitable[Any]],
    ) -> DynamoWorker[P]:
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> None:
            cfg = (
                config
                or next((a for a in args if isinstance(a, RuntimeConfig)), None)
                or RuntimeConfig.from_env()
            )
            runtime = DistributedRuntime(cfg)
            loop = asyncio.get_running_loop()
            main = asyncio.current_task()
            signals = 0

            def on_signal(signame: str) -> None:
                nonlocal signals
                signals += 1
                if signals == 1:
                    log.info("%s received: shutting down gracefully", signame)
                    runtime.request_shutdown()
                elif main is not None:
                    log.warning("%s received again: stopping now", signame)
                    main.cancel()

            installed = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, on_signal, sig.name)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread: the caller handles signals
            try:
                await runtime.start()
                await fn(runtime, *args, **kwargs)
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)
                await runtime.shutdown()

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                run_uvloop(run_async(*args, **kwargs))
            except ConfigError as exc:  # a flag, a model, a port: the same again on a restart
                sys.stderr.write(f"error: {exc}\n")
                return EXIT_CONFIG
            except DynamoError as exc:  # a backend, an engine that failed: one line
                sys.stderr.write(f"error: {exc}\n")
                return 1
            except (KeyboardInterrupt, asyncio.CancelledError):
                return 130
            return 0

        run.run_async = run_async  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate
