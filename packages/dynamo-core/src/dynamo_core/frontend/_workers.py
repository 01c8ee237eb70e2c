"""`--http-workers N`: N frontend processes on one HTTP port, each with its own event loop.

One frontend process is one core (its event loop); a machine with more cores serves more by
running more of them on the same port. The process the user started is worker 0: it takes the
port first (`reserve_port`: refused at once if any other program holds it, even one that shares
ports; port 0 becomes a free one), then starts N-1 copies of itself (`HttpWorkers`), each run
with the same command line plus `--http-port <that port> --http-workers 1` (and, unless the
user named one, `--responses-store-dir` of a private folder worker 0 made, where the processes
share their stored responses: `dynamo_core.frontend.responses`) and
`DYN_HTTP_WORKER_INDEX=<i>`. Every process listens with SO_REUSEPORT, and the kernel spreads new
connections over their sockets. Each copy is a whole frontend (model watch, tokenizers, routers,
its own runtime instance); their routers share the load they dispatch through the event plane
(`--router-replica-sync`, on with N > 1: `dynamo_core.router.sync`).

What happens when a process fails: a copy that exits is started again (after 1 s, doubling up
to 30 s while it keeps failing within a minute of its start); the streams it had open break
(HTTP cannot move a response to another process) and connections it had accepted but not read
are reset; the others keep serving. SIGTERM/SIGINT to worker 0 reach the copies, which drain as
it does; worker 0 waits for them. If worker 0 is killed outright, the kernel sends each copy
SIGTERM (`PR_SET_PDEATHSIG`, Linux), so none is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from dynamo_core.errors import listen_errors

__all__ = ["WORKER_INDEX_ENV", "HttpWorkers", "reserve_port", "worker_index"]

log = logging.getLogger("dynamo.frontend.workers")

WORKER_INDEX_ENV = "DYN_HTTP_WORKER_INDEX"
"""Set in the copies (1..N-1): they join worker 0's port instead of taking their own."""
_PR_SET_PDEATHSIG = 1
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
_STABLE = 60.0  # a copy that ran this long before exiting starts again at the first back-off


def worker_index() -> int:
    """0 in the process the user started; i in the i-th copy."""
    try:
        return int(os.environ.get(WORKER_INDEX_ENV, "0"))
    except ValueError:
        return 0


def reserve_port(host: str, port: int, flag: str = "--http-port") -> int:
    """Check that `host:port` is free for this frontend's processes alone; the port (a free
    one for 0). A program already listening there is `PortInUseError`, even if it set
    SO_REUSEPORT itself (a socket without the option cannot join its group)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with listen_errors(host, port, flag), socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # past TIME_WAIT, not a listener
        probe.bind((host, port))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: worker 0's shutdown still stops the copies


class HttpWorkers:
    """Worker 0's copies: started, restarted when they exit, stopped with it."""

    def __init__(self, argv: Sequence[str], port: int, count: int, grace: float) -> None:
        self.argv = list(argv)
        self.port = port
        self.count = count
        self.grace = grace
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def command(self) -> list[str]:
        """A copy's command line: worker 0's, then the port it holds and one worker each."""
        flags = ["--http-port", str(self.port), "--http-workers", "1"]
        return [sys.executable, "-m", "dynamo_core.frontend", *self.argv, *flags]

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(i)) for i in range(1, self.count)]

    async def _keep(self, index: int) -> None:
        backoff = _FIRST_BACKOFF
        while not self._stopping:
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *self.command(),
                env={**os.environ, WORKER_INDEX_ENV: str(index)},
                preexec_fn=_die_with_parent,
            )
            self.procs[index] = proc
            code = await proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started > _STABLE:
                backoff = _FIRST_BACKOFF
            self.restarts += 1
            log.warning(
                "HTTP worker %d (pid %d) exited with status %s: starting it again in %g s",
                index,
                proc.pid,
                code,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def stop(self) -> None:
        """SIGTERM every copy (they drain within `grace`), SIGKILL those still running after."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [p for p in self.procs.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=self.grace + 5
            )
        for proc in running:
            if proc.returncode is None:
                log.warning("HTTP worker pid %d did not stop: killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
