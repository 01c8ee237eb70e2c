"""What a graph claims on this machine before it starts: its components' names, its HTTP ports.

Two `dynamo serve` runs of the same graph on one machine would share a namespace: the second's
workers would register next to the first's and take its traffic, and its frontend would
crash-loop on the busy port while the health probe, answered by the first graph's frontend,
reported the second as ready. So a run refuses to start, with one line naming the conflict, when:

- another `dynamo serve` on this machine runs one of its components in the same namespace. Each
  run holds an exclusive `flock` on `<temp>/dynamo-<user>/serve/<namespace>.<component>.lock` for
  its whole life (the kernel drops it when the run dies, `kill -9` included), with its pid inside
  for the message. Different components of one namespace may run apart (`--only frontend` and
  `--only backend`, as the multi-node walk-through does on one machine);
- a port a component will listen on for HTTP (its `health_http_port_arg`) is already taken.

These are checks before the start, not guarantees for its whole life: `_ready` also confirms that
the process answering a health probe is one of this graph's own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = ["Claims", "claim_components", "listens_on", "port_owner", "port_taken"]


class Claims:
    """The lock files a run holds; `release()` (or the process's exit) gives them up."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def add(self, fd: int) -> None:
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _lock_dir() -> Path:
    user = os.environ.get("USER") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"dynamo-{user}" / "serve"


def claim_components(namespace: str, components: Iterable[str]) -> tuple[Claims, str | None]:
    """Lock `namespace`'s components for this run; on a conflict, release everything and
    return the one-line reason."""
    claims = Claims()
    folder = _lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    taken: dict[str, str] = {}
    for name in components:
        fd = os.open(folder / f"{namespace}.{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            taken[name] = holder
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        claims.add(fd)
    if not taken:
        return claims, None
    claims.release()
    holders = ", ".join(sorted(set(taken.values())))
    return claims, (
        f"namespace '{namespace}' already runs {', '.join(sorted(taken))} on this machine "
        f"(dynamo serve pid {holders}): stop that graph, or give this one another --namespace"
    )


def port_taken(host: str, port: int) -> bool:
    """True when something listens on `port` where `host` would bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def port_owner(port: int) -> str:
    """`pid N (command)` of the process listening on `port`, when this user may see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    break
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())
                    return f"pid {conn.pid} ({cmd[:60]}{'...' if len(cmd) > 60 else ''})"
                return f"pid {conn.pid}"
    return "another process"


def listens_on(pids: Iterable[int], port: int) -> bool:
    """True when one of `pids` (or a process below one of them) listens on `port`."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    for conn in p.net_connections(kind="tcp"):
                        if (
                            conn.status == psutil.CONN_LISTEN
                            and conn.laddr
                            and conn.laddr.port == port
                        ):
                            return True
    return False
