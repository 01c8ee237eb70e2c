"""`DistributedRuntime` and the objects it hands out: namespace, component, endpoint, client.

The names and calls mirror NVIDIA Dynamo's Python bindings, so component code reads the same:

    component = runtime.namespace("demo").component("backend")
    await component.create_service()
    await component.endpoint("generate").serve_endpoint(handler.generate)

    client = await runtime.endpoint("demo.backend.generate").client()
    await client.wait_for_instances()
    async for item in await client.round_robin(request):
        ...

An instance is this process (its discovery lease id) serving one endpoint. `serve_endpoint`
registers the endpoint in discovery and returns when the runtime shuts down, after removing the
registration and letting in-flight streams finish within `graceful_shutdown_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import msgspec

from dynamo_core.errors import (
    ConfigError,
    ConnectionLostError,
    DrainingError,
    DynamoError,
    InstanceNotFoundError,
    NoInstancesError,
)
from dynamo_core.runtime.config import RuntimeConfig
from dynamo_core.runtime.context import Context
from dynamo_core.runtime.discovery import Discovery, Watch, WatchEvent, keys, open_discovery
from dynamo_core.runtime.transport import (
    DEFAULT_WINDOW,
    ClientStream,
    EndpointRegistry,
    HandlerEntry,
    InstanceHealth,
    RequestPlaneClient,
    RequestPlaneServer,
)

__all__ = [
    "Client",
    "Component",
    "DistributedRuntime",
    "Endpoint",
    "Instance",
    "Namespace",
    "ServedEndpoint",
]

log = logging.getLogger("dynamo.runtime")


def _check_name(kind: str, name: str) -> str:
    if not name or any(c in name for c in "/. \t\n") or name.startswith("_"):
        raise ConfigError(f"invalid {kind} name {name!r}: use letters, digits, '-' and '_'")
    return name


class Instance(msgspec.Struct, frozen=True):
    """One process serving one endpoint, as recorded in discovery."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    transport: dict[str, Any]
    pid: int = 0
    host: str = ""
    metadata: dict[str, Any] = {}

    @property
    def path(self) -> str:
        return f"{self.namespace}/{self.component}/{self.endpoint}"


_instance_decoder = msgspec.json.Decoder(Instance)


class DistributedRuntime:
    """The process's connection to its graph: discovery, request plane and event plane."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = (config or RuntimeConfig.from_env()).runtime_settings()
        self.discovery: Discovery = open_discovery(self.config)
        self.registry = EndpointRegistry()
        self._server: RequestPlaneServer | None = None
        self._server_lock = asyncio.Lock()
        self._clients: dict[str, RequestPlaneClient] = {}
        #: instances this process routes around (hung, unreachable or draining), for every client
        self.health = InstanceHealth()
        self._served: set[ServedEndpoint] = set()
        self._endpoint_keys: dict[str, list[str]] = {}
        self._shutdown = asyncio.Event()
        self._started = False
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        self._nats: Any = None
        self.system: Any = None  # the status server, when `system_port` is set

    # -- life cycle -----------------------------------------------------------------------

    @classmethod
    async def create(cls, config: RuntimeConfig | None = None) -> DistributedRuntime:
        runtime = cls(config)
        await runtime.start()
        return runtime

    async def start(self) -> None:
        if not self._started:
            await self.discovery.start()
            if "nats" in (self.config.request_plane, self.config.event_plane):
                await self.nats()  # an unreachable NATS is reported at start, not at first use
            if self.config.system_port is not None:
                from dynamo_core.runtime.system import SystemStatusServer

                self.system = SystemStatusServer(
                    self, self.config.system_host, self.config.system_port
                )
                await self.system.start()
            self._started = True

    async def nats(self) -> Any:
        """The process's NATS connection (`dynamo_core.runtime._nats.NatsConnection`)."""
        if self._nats is None:
            from dynamo_core.runtime._nats import NatsConnection

            conn = NatsConnection(self.config.nats_server, name=f"dynamo-{self.instance_id:x}")
            await conn.connect()
            self._nats = conn
        return self._nats

    async def __aenter__(self) -> DistributedRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def instance_id(self) -> int:
        """This process's id in discovery (its lease id); the same for all its endpoints."""
        return self.discovery.lease_id

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown: `serve_endpoint` calls unregister, drain and return."""
        self._shutdown.set()

    def is_shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def wait_for_shutdown(self) -> None:
        await self._shutdown.wait()

    async def shutdown(self) -> None:
        """Unregister every endpoint, let in-flight streams finish, then close all backends."""
        if self._closed:
            return
        self._closed = True
        self.request_shutdown()
        await asyncio.gather(*(s.stop() for s in list(self._served)), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        if self._server is not None:
            await self._server.close()
        for client in self._clients.values():
            await client.close()
        await self.discovery.close()
        if self._nats is not None:
            await self._nats.close()
        if self.system is not None:
            await self.system.close()

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        """Run a background task that the runtime cancels on shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- names ----------------------------------------------------------------------------

    def namespace(self, name: str | None = None) -> Namespace:
        return Namespace(self, _check_name("namespace", name or self.config.namespace))

    def endpoint(self, path: str) -> Endpoint:
        """`runtime.endpoint("ns.component.endpoint")`, short for the three calls."""
        parts = path.replace("/", ".").split(".")
        if len(parts) != 3:
            raise ConfigError(f"endpoint path {path!r} must be 'namespace.component.endpoint'")
        ns, comp, ep = parts
        return self.namespace(ns).component(comp).endpoint(ep)

    # -- request plane --------------------------------------------------------------------

    async def request_plane_server(self) -> RequestPlaneServer:
        async with self._server_lock:
            if self._server is None:
                server = await self._make_server()
                await server.start()
                self._server = server
            return self._server

    async def _make_server(self) -> RequestPlaneServer:
        cfg = self.config
        if cfg.request_plane == "nats":
            from dynamo_core.runtime.transport.nats import NatsServer

            return NatsServer(
                self.registry,
                await self.nats(),
                self.instance_id,
                heartbeat_timeout=cfg.heartbeat_timeout,
            )
        if cfg.request_plane == "inproc":
            from dynamo_core.runtime.transport.inproc import InprocServer

            return InprocServer(self.registry)
        if cfg.request_plane == "tcp":
            from dynamo_core.runtime.transport.tcp import TcpServer

            # one machine (file, mem): loopback; many machines (etcd): every interface,
            # advertising this host's address (DYN_TCP_HOST overrides both)
            host = cfg.tcp_host or ("0.0.0.0" if cfg.discovery_backend == "etcd" else "127.0.0.1")
            bind = host
            advertise = host
            if host in ("0.0.0.0", "::"):
                advertise = _local_address(_discovery_host(cfg))
            token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
            return TcpServer(
                self.registry,
                host=bind,
                port=cfg.tcp_port,
                advertise_host=advertise,
                token=token,
                heartbeat_timeout=cfg.heartbeat_timeout,
            )
        raise ConfigError(f"request plane {cfg.request_plane!r} is not available in this version")

    async def request_plane_client(self, kind: str) -> RequestPlaneClient:
        client = self._clients.get(kind)
        if client is None:
            client = await self._make_client(kind)
            self._clients[kind] = client
        return client

    async def _make_client(self, kind: str) -> RequestPlaneClient:
        liveness: dict[str, Any] = {
            "health": self.health,
            "heartbeat_timeout": self.config.heartbeat_timeout,
        }
        if kind == "nats":
            from dynamo_core.runtime.transport.nats import NatsClient

            return NatsClient(await self.nats(), **liveness)
        if kind == "inproc":
            from dynamo_core.runtime.transport.inproc import InprocClient

            return InprocClient(**liveness)
        if kind == "tcp":
            from dynamo_core.runtime.transport.tcp import TcpClient

            token = self.config.auth_token
            return TcpClient(token=token.get_secret_value() if token else None, **liveness)
        raise ConfigError(f"request plane {kind!r} is not available in this version")


class Namespace:
    def __init__(self, runtime: DistributedRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def component(self, name: str) -> Component:
        return Component(self, _check_name("component", name))

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"


class Component:
    def __init__(self, namespace: Namespace, name: str) -> None:
        self.namespace = namespace
        self.runtime = namespace.runtime
        self.name = name

    async def create_service(self) -> None:
        """Prepare the runtime to serve this component's endpoints (starts the listener)."""
        await self.runtime.start()
        await self.runtime.request_plane_server()

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(self, _check_name("endpoint", name))

    async def event_publisher(self, topic: str) -> Any:
        """A publisher of events on `topic` (see `dynamo_core.runtime.events`)."""
        from dynamo_core.runtime.events import EventPublisher, NatsEventPublisher

        cls = NatsEventPublisher if self.runtime.config.event_plane == "nats" else EventPublisher
        publisher = cls(self, _check_name("topic", topic))
        await publisher.start()
        return publisher

    async def subscribe(self, topic: str) -> Any:
        """Events on `topic` from every instance of this component, as they are published."""
        from dynamo_core.runtime.events import EventSubscriber, NatsEventSubscriber

        cls = NatsEventSubscriber if self.runtime.config.event_plane == "nats" else EventSubscriber
        subscriber = cls(self, _check_name("topic", topic))
        await subscriber.start()
        return subscriber

    def __repr__(self) -> str:
        return f"Component({self.namespace.name}.{self.name})"


class Endpoint:
    def __init__(self, component: Component, name: str) -> None:
        self.component = component
        self.runtime = component.runtime
        self.name = name
        self.namespace_name = component.namespace.name
        self.path = f"{self.namespace_name}/{component.name}/{name}"

    @property
    def discovery_prefix(self) -> str:
        return keys.instances_prefix(self.namespace_name, self.component.name, self.name)

    def instance_key(self, instance_id: int) -> str:
        return keys.instance_key(self.namespace_name, self.component.name, self.name, instance_id)

    async def serve_endpoint(
        self,
        handler: Callable[..., Any],
        *,
        graceful_shutdown: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Serve `handler` until the runtime shuts down; then unregister and drain.

        `handler` is an async generator function taking `(request)` or `(request, context)`
        (an `async def` returning one value is served as a one-item stream).
        """
        served = await self.start_serving(handler, metadata=metadata)
        try:
            await self.runtime.wait_for_shutdown()
        finally:
            await served.stop(drain=graceful_shutdown)

    async def register(self, key: str, value: bytes) -> None:
        """Keep `key` in discovery for as long as this process serves this endpoint.

        Used for what describes the endpoint beyond its address (e.g. a model card): the key
        goes when `serve_endpoint` stops, or with the process's lease.
        """
        await self.runtime.discovery.put(key, value)
        keys = self.runtime._endpoint_keys.setdefault(self.path, [])
        if key not in keys:
            keys.append(key)

    async def start_serving(
        self, handler: Callable[..., Any], *, metadata: dict[str, Any] | None = None
    ) -> ServedEndpoint:
        """Register `handler` and return at once; `stop()` on the result undoes it."""
        runtime = self.runtime
        await runtime.start()
        server = await runtime.request_plane_server()
        entry = runtime.registry.add(self.path, handler)
        record = Instance(
            namespace=self.namespace_name,
            component=self.component.name,
            endpoint=self.name,
            instance_id=runtime.instance_id,
            transport=server.transport_info(),
            pid=os.getpid(),
            host=socket.gethostname(),
            metadata=metadata or {},
        )
        served = ServedEndpoint(self, entry)
        runtime._served.add(served)
        await runtime.discovery.put(
            self.instance_key(runtime.instance_id), msgspec.json.encode(record)
        )
        log.info("serving %s as instance %x", self.path, runtime.instance_id)
        return served

    async def client(self) -> Client:
        client = Client(self)
        await client._start()
        return client

    def __repr__(self) -> str:
        return f"Endpoint({self.path})"


class ServedEndpoint:
    """A handler being served; `stop()` unregisters it, drains in-flight streams, removes it."""

    def __init__(self, endpoint: Endpoint, entry: HandlerEntry) -> None:
        self.endpoint = endpoint
        self.entry = entry
        self._stopped: asyncio.Future[None] | None = None

    @property
    def inflight(self) -> int:
        return len(self.entry.inflight)

    async def stop(self, drain: bool = True) -> None:
        """Drain, in this order: refuse new requests (`DrainingError`: the caller retries them
        elsewhere at once), leave discovery, let the streams in flight finish within
        `graceful_shutdown_timeout`, cancel what is left (its callers migrate it), unregister.

        Refusing comes first so that no request is accepted, and then cut, by a process that is
        on its way out: a caller that has not yet seen the discovery change is told at once.
        """
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        runtime = self.endpoint.runtime
        path = self.endpoint.path
        try:
            self.entry.draining = True
            await self._leave_discovery()
            grace = runtime.config.graceful_shutdown_timeout if drain else 0.0
            streams = list(self.entry.inflight.values())
            tasks = [s.task for s in streams if s.task is not None and not s.task.done()]
            if tasks:
                log.info("%s: draining %d request(s), up to %gs", path, len(tasks), grace)
                done: set[asyncio.Task[None]] = set()
                pending = set(tasks)
                if grace > 0:
                    done, pending = await asyncio.wait(tasks, timeout=grace)
                if pending:
                    log.warning(
                        "%s: %d request(s) still running after %gs: cancelled (their callers "
                        "move them elsewhere)",
                        path,
                        len(pending),
                        grace,
                    )
                    for task in pending:
                        task.cancel()
                    await asyncio.wait(pending, timeout=1.0)
                log.info("%s: drained (%d finished)", path, len(done))
            if runtime.registry.entries.get(path) is self.entry:
                runtime.registry.remove(path)
        finally:
            runtime._served.discard(self)
            self._stopped.set_result(None)

    async def _leave_discovery(self) -> None:
        runtime = self.endpoint.runtime
        keys = [self.endpoint.instance_key(runtime.instance_id)]
        keys += runtime._endpoint_keys.pop(self.endpoint.path, [])
        for key in keys:
            try:
                await runtime.discovery.delete(key)
            except DynamoError as exc:  # the lease takes the key with it when we exit
                log.warning("could not remove %s from discovery: %s", key, exc)


class Client:
    """Calls one endpoint on its live instances, tracked by a discovery watch.

    "Live" means registered in discovery *and* available in the runtime's `InstanceHealth`:
    an instance that stopped answering heartbeats, cannot be reached, or refused a request
    while draining is left out of `instance_ids()` (and so out of routing) until it answers
    again or discovery drops it. `direct()` still reaches any registered instance.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.runtime = endpoint.runtime
        self._instances: dict[int, Instance] = {}
        self._registered: list[int] = []  # in discovery, sorted
        self._ids: list[int] = []  # of those, the available ones
        self._rr = 0
        self._changed = asyncio.Event()
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []

    async def _start(self) -> None:
        await self.runtime.start()
        self.runtime.health.on_change(self._refresh)
        self._watch = await self.runtime.discovery.watch_prefix(self.endpoint.discovery_prefix)
        for event in self._watch.pending():
            self._apply(event)
        self._task = self.runtime.spawn(
            self._follow(self._watch), name=f"client-{self.endpoint.path}"
        )

    async def _follow(self, watch: Watch) -> None:
        async for event in watch:
            self._apply(event)

    def _apply(self, event: WatchEvent) -> None:
        if event.kind == "put" and event.value is not None:
            try:
                inst = _instance_decoder.decode(event.value)
            except msgspec.DecodeError:
                log.warning("ignoring malformed instance record %s", event.key)
                return
            self._instances[inst.instance_id] = inst
        else:
            iid = keys.instance_id_of(event.key)
            if iid is None:
                return
            gone = self._instances.pop(iid, None)
            if gone is not None:
                plane = self.runtime._clients.get(str(gone.transport.get("kind")))
                if plane is not None:
                    plane.instance_gone(iid)
        self._registered = sorted(self._instances)
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Recompute the available instances (discovery or health changed); tell listeners."""
        health = self.runtime.health
        path = self.endpoint.path
        ids = [i for i in self._registered if health.available(i, path)]
        if ids == self._ids and not force:
            return
        self._ids = ids
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self._listeners):
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever the set of instances changes."""
        self._listeners.append(listener)

    def instance_ids(self) -> list[int]:
        return list(self._ids)

    def instances(self) -> list[Instance]:
        return [self._instances[i] for i in self._ids]

    async def wait_for_instances(self, timeout: float | None = None) -> list[int]:
        """Return the live instance ids as soon as there is at least one."""
        async with asyncio.timeout(timeout):
            while not self._ids:
                await self._changed.wait()
        return list(self._ids)

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    # -- calls ----------------------------------------------------------------------------

    async def generate(
        self,
        request: Any,
        *,
        context: Context | None = None,
        instance_id: int | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> ClientStream:
        if instance_id is not None:
            return await self.direct(request, instance_id, context=context, window=window)
        return await self.round_robin(request, context=context, window=window)

    async def round_robin(
        self, request: Any, *, context: Context | None = None, window: int = DEFAULT_WINDOW
    ) -> ClientStream:
        def pick(candidates: list[int]) -> int:
            iid = candidates[self._rr % len(candidates)]
            self._rr += 1
            return iid

        return await self._routed(pick, request, context, window)

    async def random(
        self, request: Any, *, context: Context | None = None, window: int = DEFAULT_WINDOW
    ) -> ClientStream:
        return await self._routed(random.choice, request, context, window)

    async def direct(
        self,
        request: Any,
        instance_id: int,
        *,
        context: Context | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> ClientStream:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise InstanceNotFoundError(
                f"instance {instance_id:x} of {self.endpoint.path} is not live"
            )
        return await self._open(inst, request, context, window)

    async def _routed(
        self,
        pick: Callable[[list[int]], int],
        request: Any,
        context: Context | None,
        window: int,
    ) -> ClientStream:
        candidates = list(self._ids)
        if not candidates:
            raise NoInstancesError(f"no instances of {self.endpoint.path}")
        while True:
            iid = pick(candidates)
            try:
                return await self._open(self._instances[iid], request, context, window)
            except (ConnectionLostError, DrainingError):
                # a dead instance discovery has not dropped yet, or one shutting down: the others
                candidates.remove(iid)
                if not candidates:
                    raise

    async def _open(
        self, inst: Instance, request: Any, context: Context | None, window: int
    ) -> ClientStream:
        transport = await self.runtime.request_plane_client(str(inst.transport.get("kind")))
        return await transport.open_stream(
            inst.transport,
            inst.path,
            request,
            context=context if context is not None else Context(),
            instance_id=inst.instance_id,
            window=window,
        )

    async def close(self) -> None:
        self.runtime.health.remove_listener(self._refresh)
        if self._watch is not None:
            self._watch.close()
        if self._task is not None:
            self._task.cancel()


def _discovery_host(cfg: RuntimeConfig) -> str | None:
    if cfg.discovery_backend != "etcd":
        return None
    from urllib.parse import urlsplit

    first = cfg.etcd_endpoints.split(",")[0].strip()
    return urlsplit(first if "://" in first else f"http://{first}").hostname


def _local_address(peer: str | None = None) -> str:
    """This host's address as other hosts see it: the one it uses to reach `peer` (the
    discovery server, which every other process reaches too), else the default route's."""
    if peer is not None and (peer.startswith("127.") or peer == "localhost"):
        return "127.0.0.1"  # discovery on loopback: the whole graph is on this machine
    for target in (peer, "192.0.2.1"):  # 192.0.2.1: TEST-NET, never answers
        if not target:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # a UDP connect sends nothing; it only picks a route
                return str(s.getsockname()[0])
            except OSError:
                continue
    return "127.0.0.1"
