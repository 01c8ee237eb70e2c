"""The system status port: `/health`, `/live` and `/metrics` of any component process.

Enabled by `DYN_SYSTEM_PORT` (or `--system-port`; 0 picks a free port), as in NVIDIA Dynamo.
Kubernetes probes and load balancers read it:

- `GET /live`: 200 while the process's event loop answers;
- `GET /health`: 200 once the process serves at least one endpoint and is not shutting down
  (with the endpoints and the instance id), 503 otherwise — so a worker that is still loading its
  model, or draining after SIGTERM, is not ready;
- `GET /metrics`: Prometheus text: per served endpoint, requests, in-flight requests, errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from dynamo_core.http import HttpServer, Request, Response

if TYPE_CHECKING:
    from dynamo_core.runtime._core import DistributedRuntime

__all__ = ["SystemStatusServer"]

log = logging.getLogger("dynamo.runtime.system")


class SystemStatusServer:
    def __init__(self, runtime: DistributedRuntime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self._server = HttpServer(self._handle)

    async def start(self) -> None:
        await self._server.start(self.host, self.port, flag="--system-port (DYN_SYSTEM_PORT)")
        self.port = self._server.port
        log.info("system status on http://%s:%d (/health, /live, /metrics)", self.host, self.port)

    async def close(self) -> None:
        await self._server.close(grace=1.0)

    async def _handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):  # the server answers HEAD without a body
            return Response(
                b'{"error":"method not allowed"}', status=405, headers=[("allow", "GET, HEAD")]
            )
        if request.path == "/live":
            return Response(b'{"status":"live"}')
        if request.path == "/health":
            return self._health()
        if request.path == "/metrics":
            return Response(self._metrics().encode(), content_type="text/plain; version=0.0.4")
        return Response(b'{"error":"not found"}', status=404)

    def _health(self) -> Response:
        runtime = self.runtime
        endpoints = sorted(runtime.registry.entries)
        public = [p for p in endpoints if "/_events-" not in p]
        ready = bool(public) and not runtime.is_shutting_down()
        body = {
            "status": "ready" if ready else "notready",
            "instance_id": f"{runtime.instance_id:x}",
            "endpoints": public,
        }
        return Response(msgspec.json.encode(body), status=200 if ready else 503)

    def _metrics(self) -> str:
        lines = [
            "# HELP dynamo_component_requests_total Requests a served endpoint received.",
            "# TYPE dynamo_component_requests_total counter",
        ]
        entries = sorted(self.runtime.registry.entries.items())
        for path, entry in entries:
            lines.append(f'dynamo_component_requests_total{{endpoint="{path}"}} {entry.requests}')
        lines += [
            "# HELP dynamo_component_errors_total Requests that ended with an error.",
            "# TYPE dynamo_component_errors_total counter",
        ]
        for path, entry in entries:
            lines.append(f'dynamo_component_errors_total{{endpoint="{path}"}} {entry.errors}')
        lines += [
            "# HELP dynamo_component_inflight_requests Requests being served now.",
            "# TYPE dynamo_component_inflight_requests gauge",
        ]
        for path, entry in entries:
            lines.append(
                f'dynamo_component_inflight_requests{{endpoint="{path}"}} {len(entry.inflight)}'
            )
        return "\n".join(lines) + "\n"
