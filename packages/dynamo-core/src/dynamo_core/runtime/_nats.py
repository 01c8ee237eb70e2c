"""One NATS connection per process, shared by the request and event planes (nats-py).

Publishing from synchronous code (a handler's item, a credit, an event) goes through one ordered
outgoing queue drained by a single task, so messages leave in the order they were produced and
a burst becomes a run of publishes without a task per message. nats-py reconnects by itself
(forever, every half second); `on_disconnect` listeners let the planes fail streams that were in
flight, since NATS does not resend what was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from dynamo_core.errors import BackendUnavailableError

__all__ = ["NatsConnection"]

log = logging.getLogger("dynamo.nats")


class NatsConnection:
    def __init__(self, servers: str, name: str = "dynamo") -> None:
        self.servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.name = name
        self.nc: Any = None
        self._out: deque[tuple[str, bytes, str]] = deque()
        self._wake: asyncio.Event | None = None
        self._sender: asyncio.Task[None] | None = None
        self.on_disconnect: list[Callable[[], None]] = []
        self.connected = False
        self._closing = False

    async def connect(self) -> None:
        try:
            import nats
        except ImportError:  # pragma: no cover - nats-py is a dependency
            raise BackendUnavailableError(
                "the nats backends need nats-py: pip install nats-py"
            ) from None

        async def disconnected() -> None:
            self.connected = False
            if self._closing:
                return
            log.warning("disconnected from NATS; reconnecting")
            for cb in list(self.on_disconnect):
                cb()

        async def reconnected() -> None:
            self.connected = True
            log.info("reconnected to NATS at %s", self.nc.connected_url.netloc if self.nc else "?")

        async def error(exc: Exception) -> None:
            log.debug("NATS: %s", exc)

        await self._probe()
        try:
            self.nc = await nats.connect(
                self.servers,
                name=self.name,
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except Exception as exc:
            raise BackendUnavailableError(
                f"cannot reach NATS at {', '.join(self.servers)}: {exc or type(exc).__name__}"
            ) from None
        self.connected = True
        self._wake = asyncio.Event()
        self._sender = asyncio.get_running_loop().create_task(self._send_forever())

    async def _probe(self) -> None:
        """Fail fast, with the address tried, when no server answers at start (nats-py would
        keep retrying forever, as it must once connected)."""
        from urllib.parse import urlsplit

        errors = []
        for server in self.servers:
            parts = urlsplit(server if "://" in server else f"nats://{server}")
            host, port = parts.hostname or "127.0.0.1", parts.port or 4222
            try:
                async with asyncio.timeout(2):
                    _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return
            except (OSError, TimeoutError) as exc:
                errors.append(f"{host}:{port} ({exc or 'timed out'})")
        raise BackendUnavailableError(f"cannot reach NATS at {', '.join(errors)}")

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Queue a message; sent in order by the sender task."""
        self._out.append((subject, data, reply))
        if self._wake is not None:
            self._wake.set()

    async def _send_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._out:
                subject, data, reply = self._out.popleft()
                try:
                    await self.nc.publish(subject, data, reply=reply)
                except Exception as exc:  # disconnected: the message is lost, streams are failed
                    log.debug("NATS publish to %s failed: %s", subject, exc)

    async def subscribe(self, subject: str, cb: Callable[[Any], Any]) -> Any:
        return await self.nc.subscribe(subject, cb=cb)

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (it says so when we connect)."""
        return int(getattr(self.nc, "max_payload", 0) or 1024 * 1024) - 1024

    def new_inbox(self) -> str:
        return str(self.nc.new_inbox())

    async def close(self) -> None:
        self._closing = True
        if self._sender is not None:
            # let queued messages go out first
            for _ in range(100):
                if not self._out:
                    break
                await asyncio.sleep(0.001)
            self._sender.cancel()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await self.nc.close()
