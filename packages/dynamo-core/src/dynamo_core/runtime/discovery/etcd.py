"""`etcd` discovery: keys bound to a lease the process keeps alive, across many machines.

Client choice: etcd's own JSON gateway (`/v3/...` over HTTP, in every etcd since 3.4) through a
small asyncio HTTP client written here, rather than a gRPC client library. Discovery makes a
handful of calls (grant, keep-alive, put, delete, range, watch), none on the hot path; the gateway
needs no gRPC stack in every worker process (grpcio wheels are large, and gRPC's threads have a
history of trouble with the forking engines that workers host), and the same JSON is what
`etcdctl`/`curl` users see when debugging.

Behaviour:

- the lease id is chosen by us (a random 63-bit id, granted explicitly), so the instance id is
  known before the first call and survives a re-grant;
- the lease granted is `lease_ttl - 0.5 s`, rounded down to whole seconds (etcd's unit; etcd
  raises anything below 2 s to 2 s): etcd revokes expired leases on a half-second tick, so a
  process that stops renewing (killed, hung, cut off) loses its keys within `lease_ttl` of its
  last renewal, and every watcher sees the delete event then;
- keep-alive every third of the granted TTL; if etcd says the lease is gone (it expired while etcd was down or
  unreachable), the lease is granted again under the same id and every key this process owns is
  written again: a restarted etcd gets the graph's registrations back within seconds;
- watches resume from the last revision they saw after a reconnect; if that revision was
  compacted, the prefix is listed again and the difference is delivered as events;
- `ETCD_ENDPOINTS` may list several endpoints; calls go to the first that answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
from typing import Any
from urllib.parse import urlsplit

from dynamo_core.errors import BackendUnavailableError

from .base import Discovery, Watch, WatchEvent

__all__ = ["EtcdDiscovery"]

log = logging.getLogger("dynamo.discovery.etcd")


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: str) -> bytes:
    """The smallest key greater than every key starting with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


class _EtcdError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") or body.get("error") if isinstance(body, dict) else body
        super().__init__(f"etcd answered {status}: {message}")


class _Gateway:
    """Just enough HTTP/1.1 to talk to etcd's JSON gateway."""

    def __init__(self, endpoints: list[str], timeout: float = 5.0) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._preferred = 0

    def _addresses(self) -> list[tuple[str, int, str]]:
        order = self.endpoints[self._preferred :] + self.endpoints[: self._preferred]
        out = []
        for url in order:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            out.append((parts.hostname or "127.0.0.1", parts.port or 2379, url))
        return out

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        errors = []
        for i, (host, port, url) in enumerate(self._addresses()):
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{url}: {exc or 'timed out'}")
                continue
            self._preferred = (self._preferred + i) % len(self.endpoints)
            return reader, writer, f"{host}:{port}"
        raise BackendUnavailableError(f"cannot reach etcd at {', '.join(errors)}")

    @staticmethod
    def _request(path: str, body: dict[str, Any], host: str) -> bytes:
        data = json.dumps(body).encode()
        return (
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
        ).encode() + data

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reader, writer, url = await self._open()
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(self._request(path, body, url))
                status, headers = await _read_head(reader)
                payload = await _read_body(reader, headers)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise BackendUnavailableError(f"etcd at {url}: {exc or 'timed out'}") from None
        finally:
            writer.close()
        try:
            data = json.loads(payload) if payload else {}
        except json.JSONDecodeError:
            data = {"message": payload.decode(errors="replace")}
        if status != 200:
            raise _EtcdError(status, data)
        return data

    async def stream(self, path: str, body: dict[str, Any]) -> Any:
        """POST and yield each JSON object of a streamed response."""
        reader, writer, url = await self._open()
        try:
            writer.write(self._request(path, body, url))
            status, headers = await _read_head(reader)
            if status != 200:
                raise _EtcdError(status, await _read_body(reader, headers))
            buffer = b""
            async for piece in _chunks(reader):
                buffer += piece
                while True:
                    obj, end = _first_json(buffer)
                    if obj is None:
                        break
                    buffer = buffer[end:]
                    yield obj
        finally:
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise asyncio.IncompleteReadError(b"", None)
    status = int(line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        return b"".join([c async for c in _chunks(reader)])
    return await reader.read()


async def _chunks(reader: asyncio.StreamReader) -> Any:
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


def _first_json(buffer: bytes) -> tuple[Any, int]:
    text = buffer.lstrip()
    if not text:
        return None, 0
    skipped = len(buffer) - len(text)
    try:
        obj, end = json.JSONDecoder().raw_decode(text.decode())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, 0
    return obj, skipped + len(text.decode()[:end].encode())


class EtcdDiscovery(Discovery):
    def __init__(self, endpoints: str, ttl: float = 10.0, lease_id: int | None = None) -> None:
        super().__init__(lease_id)
        self.endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        self.ttl = max(2, math.floor(ttl - 0.5))  # granted: see the module docstring
        self.gateway = _Gateway(self.endpoints)
        self._owned: dict[str, bytes] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._watch_tasks: dict[Watch, asyncio.Task[None]] = {}
        self._closed = False
        self._lease_lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await self._grant()
        except BackendUnavailableError:
            raise
        except _EtcdError as exc:
            raise BackendUnavailableError(f"etcd at {self.endpoints[0]}: {exc}") from None
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _grant(self) -> None:
        try:
            await self.gateway.call("/v3/lease/grant", {"TTL": self.ttl, "ID": self.lease_id})
        except _EtcdError as exc:
            if "exists" not in str(exc.body):
                raise

    async def _keep_alive(self) -> None:
        interval = max(0.2, self.ttl / 3)
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                reply = await self.gateway.call("/v3/lease/keepalive", {"ID": self.lease_id})
                ttl = int(reply.get("result", {}).get("TTL", 0))
                if ttl <= 0:
                    await self._reregister("etcd no longer knows our lease")
            except BackendUnavailableError as exc:
                log.warning("etcd keep-alive failed (%s); retrying", exc)
                interval = 0.5
                continue
            except _EtcdError as exc:
                await self._reregister(str(exc))
            except Exception:
                log.exception("etcd keep-alive failed")
            interval = max(0.2, self.ttl / 3)

    async def _reregister(self, why: str) -> None:
        async with self._lease_lock:
            log.warning("lease %x lost (%s): registering again", self.lease_id, why)
            await self._grant()
            for key, value in list(self._owned.items()):
                await self._put(key, value)

    async def _put(self, key: str, value: bytes) -> None:
        await self.gateway.call(
            "/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": self.lease_id}
        )

    async def put(self, key: str, value: bytes) -> None:
        self._owned[key] = value
        try:
            await self._put(key, value)
        except _EtcdError:
            await self._reregister("put refused")

    async def delete(self, key: str) -> None:
        self._owned.pop(key, None)
        await self.gateway.call("/v3/kv/deleterange", {"key": _b64(key)})

    async def _range(self, prefix: str) -> tuple[dict[str, bytes], int]:
        reply = await self.gateway.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        )
        revision = int(reply.get("header", {}).get("revision", 0))
        kvs = {_unb64(kv["key"]).decode(): _unb64(kv.get("value")) for kv in reply.get("kvs", [])}
        return kvs, revision

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return (await self._range(prefix))[0]

    async def _on_watch_added(self, watch: Watch) -> None:
        known, revision = await self._range(watch.prefix)
        for key, value in sorted(known.items()):
            watch.push(WatchEvent("put", key, value))
        task = asyncio.get_running_loop().create_task(self._follow(watch, known, revision))
        self._watch_tasks[watch] = task

    def _remove_watch(self, watch: Watch) -> None:
        super()._remove_watch(watch)
        task = self._watch_tasks.pop(watch, None)
        if task is not None:
            task.cancel()

    async def _follow(self, watch: Watch, known: dict[str, bytes], revision: int) -> None:
        """Deliver changes after `revision`, resuming after reconnects."""
        delay = 0.1
        while not self._closed:
            body = {
                "create_request": {
                    "key": _b64(watch.prefix),
                    "range_end": _b64(_prefix_end(watch.prefix)),
                    "start_revision": revision + 1,
                }
            }
            try:
                async for message in self.gateway.stream("/v3/watch", body):
                    result = message.get("result", {})
                    if int(result.get("compact_revision") or 0) > revision:
                        break  # history we need was compacted: list again below
                    for event in result.get("events", []):
                        kv = event["kv"]
                        key = _unb64(kv["key"]).decode()
                        revision = max(revision, int(kv.get("mod_revision", revision)))
                        if event.get("type") == "DELETE":
                            if known.pop(key, None) is not None:
                                watch.push(WatchEvent("delete", key))
                        else:
                            value = _unb64(kv.get("value"))
                            known[key] = value
                            watch.push(WatchEvent("put", key, value))
                    delay = 0.1
            except (
                BackendUnavailableError,
                OSError,
                asyncio.IncompleteReadError,
                _EtcdError,
            ) as exc:
                log.debug("etcd watch on %s broke (%s); resuming", watch.prefix, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            # The stream ended: etcd restarted (perhaps empty, with a new history), compacted,
            # or dropped us. List the prefix again, deliver the difference, watch from there.
            with contextlib.suppress(BackendUnavailableError, _EtcdError):
                revision = await self._resync(watch, known)

    async def _resync(self, watch: Watch, known: dict[str, bytes]) -> int:
        current, revision = await self._range(watch.prefix)
        for key in set(known) - set(current):
            watch.push(WatchEvent("delete", key))
        for key, value in current.items():
            if known.get(key) != value:
                watch.push(WatchEvent("put", key, value))
        known.clear()
        known.update(current)
        return revision

    async def close(self) -> None:
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        for task in list(self._watch_tasks.values()):
            task.cancel()
        self._close_watches()
        with contextlib.suppress(BackendUnavailableError, _EtcdError):
            await self.gateway.call("/v3/lease/revoke", {"ID": self.lease_id})
