"""When is a process of the graph ready? Two signals, both observed, never assumed.

- A component whose `Deployment.health_http_port_arg` names a flag (the frontend) is ready when
  `GET /health` on that port answers 200 (and, if its JSON body lists `models`, as the
  frontend's does, lists at least one when the graph has workers: "ready" means the first
  request can be served), *and* the listener on that port is one of this graph's own processes
  (another graph's frontend on the same port must not make this one "ready"). The port is the value the component's own parser gives
  that flag (graph args, overrides, environment or default). Nothing announces an HTTP server, so
  this is polled (every 50 ms) while one of its processes is starting, and not otherwise.
- Any other component is ready, process by process, when discovery holds an instance record
  (`v1/instances/{namespace}/...`) whose `pid` is that process's pid: the worker registered its
  endpoint, the moment it can take requests. This is a discovery watch, an event per change.

A restarted process is "starting" again until the same signal comes back for its new pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dynamo_core.runtime import RuntimeConfig
from dynamo_core.runtime.discovery import Discovery, keys, open_discovery
from dynamo_serve._claims import listens_on, port_owner
from dynamo_serve.graph import Plan

__all__ = ["ProcessState", "Readiness", "health_ready", "http_get"]

#: How long `Readiness.close` waits for its cancelled tasks.
CLOSE_TIMEOUT = 5.0


async def http_get(
    host: str, port: int, path: str = "/health", timeout: float = 1.0
) -> tuple[int, bytes]:
    """`GET path` as (status, body); status 0 when nothing answered (plain HTTP/1.1, no client
    library needed).

    Each step is bounded with `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11
    `wait_for` swallows a cancel that arrives as its inner call completes (the refused
    connection of a frontend that just stopped), and the probe calling this then never ended.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return 0, b""
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        async with asyncio.timeout(timeout):
            response = await reader.read(1 << 16)
        while len(response) < (1 << 16):
            async with asyncio.timeout(timeout):
                chunk = await reader.read(1 << 16)
            if not chunk:
                break
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body
    except (OSError, TimeoutError, ValueError):
        return 0, b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def health_ready(status: int, body: bytes, expect_models: bool) -> bool:
    """200, and, when the body lists `models` (the frontend's /health does) and the graph has
    workers, at least one model: otherwise the first request could still find no model."""
    if status != 200:
        return False
    if not expect_models:
        return True
    try:
        data = json.loads(body)
    except ValueError:
        return True
    models = data.get("models") if isinstance(data, dict) else None
    return not isinstance(models, list) or bool(models)


@dataclass
class ProcessState:
    component: str
    label: str
    pid: int
    ready: bool = False
    instance: str = ""
    ready_at: float = 0.0


ReadyCallback = Callable[[ProcessState, bool], None]


def _open_discovery(config: RuntimeConfig) -> Discovery:
    if config.discovery_backend == "file":
        from dynamo_core.runtime.discovery.file import FileDiscovery

        # A shorter scan than the components' default: readiness is seen within 50 ms.
        return FileDiscovery(config.resolved_file_kv(), poll_interval=0.05)
    return open_discovery(config)


class Readiness:
    """Follows every process of the plan from spawn to ready, and again after each restart."""

    def __init__(
        self,
        plan: Plan,
        http_ports: Mapping[str, int],
        discovery_env: Mapping[str, str],
        on_ready: ReadyCallback,
        warn: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.plan = plan
        self.warn = warn
        self.http_ports = dict(http_ports)
        self.discovery_env = dict(discovery_env)
        self.on_ready = on_ready
        self.processes: dict[int, ProcessState] = {}
        self.all_ready = asyncio.Event()
        self.ever_ready = False
        self._registered: dict[str, int] = {}  # discovery key -> pid
        self._wake: dict[str, asyncio.Event] = {c: asyncio.Event() for c in self.http_ports}
        self._tasks: list[asyncio.Task[None]] = []
        self._discovery: Discovery | None = None
        self._expected = {c.name: c.replicas for c in plan.components}
        self._has_workers = any(
            c.replicas and c.name not in self.http_ports for c in plan.components
        )

    # -- events from the supervisor ---------------------------------------------------------

    def spawned(self, component: str, label: str, pid: int) -> None:
        self.processes[pid] = ProcessState(component, label, pid)
        self.all_ready.clear()
        if component in self._wake:
            self._wake[component].set()
        elif pid in self._registered.values():
            self._mark(self.processes[pid], self._instance_of(pid))

    def exited(self, pid: int) -> ProcessState | None:
        state = self.processes.pop(pid, None)
        self.all_ready.clear()
        return state

    # -- watching ---------------------------------------------------------------------------

    async def start(self) -> None:
        workers = [c for c in self.plan.components if c.name not in self.http_ports and c.replicas]
        if workers:
            self._discovery = _open_discovery(RuntimeConfig.from_env(dict(self.discovery_env)))
            await self._discovery.start()
            watch = await self._discovery.watch_prefix(keys.instances_prefix(self.plan.namespace))
            self._tasks.append(asyncio.create_task(self._follow(watch), name="ready-discovery"))
        for component, port in self.http_ports.items():
            self._tasks.append(
                asyncio.create_task(self._probe(component, port), name=f"ready-{component}")
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that ignored its cancel must not hold up the stop
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                self.warn(f"readiness task {task.get_name()} did not stop when cancelled")
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.close()

    async def models(self) -> list[str]:
        """Names of the models registered in this namespace (for the summary)."""
        if self._discovery is None:
            return []
        cards = await self._discovery.get_prefix(keys.models_prefix(self.plan.namespace))
        return sorted({name for k in cards if (name := keys.model_name_of(k)) is not None})

    async def _follow(self, watch: Any) -> None:
        async for event in watch:
            if event.kind == "put" and event.value is not None:
                try:
                    record = json.loads(event.value)
                    pid = int(record.get("pid", 0))
                except (ValueError, TypeError, AttributeError):
                    continue
                self._registered[event.key] = pid
                state = self.processes.get(pid)
                if state is not None and not state.ready:
                    self._mark(state, self._instance_of(pid))
            elif event.kind == "delete":
                self._registered.pop(event.key, None)

    def _instance_of(self, pid: int) -> str:
        for key, owner in self._registered.items():
            if owner == pid:
                return key.rsplit("/", 1)[-1]
        return ""

    async def _probe(self, component: str, port: int) -> None:
        wake = self._wake[component]
        warned = False
        while True:
            await wake.wait()
            pending = [
                s for s in self.processes.values() if s.component == component and not s.ready
            ]
            if not pending:
                wake.clear()
                continue
            status, body = await http_get("127.0.0.1", port, timeout=0.5)
            if not health_ready(status, body, self._has_workers):
                await asyncio.sleep(0.05)
            elif listens_on([s.pid for s in pending], port):
                for state in pending:
                    self._mark(state, f"http://127.0.0.1:{port}")
            else:
                if not warned:
                    warned = True
                    self.warn(
                        f"port {port} answers, but not from this graph's {component} "
                        f"({port_owner(port)} listens there): not ready"
                    )
                await asyncio.sleep(0.05)

    def _mark(self, state: ProcessState, instance: str) -> None:
        state.ready = True
        state.instance = instance
        state.ready_at = time.monotonic()
        self.on_ready(state, self.ever_ready)
        if self._complete():
            self.ever_ready = True
            self.all_ready.set()

    def _complete(self) -> bool:
        for component, expected in self._expected.items():
            states = [s for s in self.processes.values() if s.component == component]
            if len(states) < expected or not all(s.ready for s in states):
                return False
        return True
