"""`inproc` request plane: caller and handler in one process, same semantics as over the wire.

Items are handed over as Python objects (no encoding), but the window, cancellation and error
typing are exactly those of the TCP plane, so code tested on `mem`+`inproc` behaves the same
across processes. Handler exceptions are converted to their wire form too, so the caller sees
the same error types it would see from another process.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from dynamo_core.errors import DrainingError, InstanceNotFoundError
from dynamo_core.runtime.context import Context

from .base import (
    DEFAULT_WINDOW,
    ClientStream,
    EndpointRegistry,
    RequestPlaneClient,
    RequestPlaneServer,
    ServerStream,
)

__all__ = ["InprocClient", "InprocServer"]

_SERVERS: dict[int, InprocServer] = {}
_IDS = itertools.count(1)


class _InprocServerStream(ServerStream):
    __slots__ = ("_client",)

    def __init__(self, context: Context, window: int, client: ClientStream) -> None:
        super().__init__(context, window)
        self._client = client

    def _emit(self, item: Any) -> None:
        self._client.deliver_one(item)

    def _end(self) -> None:
        self._client.finish()

    def _fail(self, type_name: str, message: str) -> None:
        self._client.fail_from_wire(type_name, message)


class InprocServer(RequestPlaneServer):
    kind = "inproc"

    def __init__(self, registry: EndpointRegistry) -> None:
        super().__init__(registry)
        self.server_id = next(_IDS)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        _SERVERS[self.server_id] = self

    def transport_info(self) -> dict[str, Any]:
        return {"kind": "inproc", "server": self.server_id}

    async def close(self) -> None:
        _SERVERS.pop(self.server_id, None)
        for task in list(self._tasks):
            task.cancel()

    def open(
        self, path: str, request: Any, context: Context, instance_id: int, window: int
    ) -> ClientStream:
        entry = self.registry.admit(path, context.id)
        server_ctx = Context(context.id, dict(context.metadata))
        holder: list[_InprocServerStream] = []

        def on_credit(n: int) -> None:
            holder[0].add_credit(n)

        def on_cancel() -> None:
            holder[0].cancel()

        client = ClientStream(
            window=window,
            on_credit=on_credit,
            on_cancel=on_cancel,
            instance_id=instance_id,
            context=context,
            path=path,
        )
        stream = _InprocServerStream(server_ctx, window, client)
        holder.append(stream)
        task = stream.start(entry, request)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client


class InprocClient(RequestPlaneClient):
    async def open_stream(
        self,
        transport: dict[str, Any],
        path: str,
        request: Any,
        *,
        context: Context,
        instance_id: int,
        window: int = DEFAULT_WINDOW,
    ) -> ClientStream:
        server = _SERVERS.get(int(transport["server"]))
        if server is None:
            raise InstanceNotFoundError(f"instance {instance_id:x} is gone")
        try:
            return server.open(path, request, context, instance_id, window)
        except DrainingError:
            self.health.drain(instance_id, path)
            raise

    async def close(self) -> None:
        pass
