"""`python -m dynamo_core.frontend`: the OpenAI-compatible HTTP entry point of a graph.

    python -m dynamo_core.frontend --http-port 8000 [--router-mode least-loaded]

It watches model cards in its namespace, so workers can come and go: `/v1/models` lists what is
live, and each request is routed to a live instance of its model.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from dynamo_core.args import (
    DEFAULT_MIGRATION_LIMIT,
    DynFlexibleArgumentParser,
    ParsedArgs,
    ParserFlags,
)
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.http import HttpLimits
from dynamo_core.router.config import RouterClientConfig
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker

__all__ = ["Deployment", "FrontendConfig", "build_parser", "main"]

log = logging.getLogger("dynamo.frontend")


class FrontendConfig(RouterClientConfig, RuntimeConfig, ParserFlags):
    """The frontend's flags: the runtime's, the router's (`RouterClientConfig`), the output
    parsers' overrides (`ParserFlags`), then its own."""

    http_host: str = Field("0.0.0.0", description="Address the HTTP server listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port).")
    http_workers: int = Field(
        default=1,
        ge=1,
        le=512,
        description="Frontend processes serving the HTTP port (SO_REUSEPORT), each with its own "
        "event loop: up to one per core. Their routers share the load they dispatch through "
        "the event plane (as --router-replica-sync).",
    )
    migration_limit: int = Field(
        DEFAULT_MIGRATION_LIMIT,
        ge=0,
        description="Times a broken stream may move to another worker (a model card may lower "
        "it; 0: never).",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="Largest request body accepted (larger: 413). Prompts are bounded by the "
        "model's context anyway: 8 MiB holds a prompt of about 2M tokens.",
    )
    http_max_header_bytes: int = Field(
        64 * 1024, gt=0, description="Largest request head: request line and headers (431)."
    )
    http_max_headers: int = Field(100, gt=0, description="Most header fields in a request (431).")
    http_max_url_bytes: int = Field(8 * 1024, gt=0, description="Longest request target (414).")
    http_header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request head, and the longest pause in a "
        "body; past it the connection is closed (slowloris).",
    )
    http_idle_timeout: float = Field(
        60.0, gt=0, description="Seconds a kept-alive connection may wait for its next request."
    )
    responses_max_stored: int = Field(
        1024,
        ge=0,
        description="Responses (/v1/responses) each frontend process keeps for "
        "previous_response_id and GET /v1/responses/{id}, of those it made; the least recently "
        "used go first (0: none kept). With --http-workers N, up to N times this in all.",
    )
    responses_max_stored_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Bytes the responses a frontend process stored may take in all (each keeps "
        "its conversation). With --http-workers N, up to N times this in all.",
    )
    responses_store_dir: Path | None = Field(
        None,
        description="Folder where stored responses are kept, one file each: they survive a "
        "restart of the frontend, and every frontend process using the folder answers for "
        "all of them (previous_response_id, GET and DELETE /v1/responses/{id}). At start, "
        "files beyond the bounds (--responses-max-stored, --responses-max-stored-bytes, times "
        "--http-workers) go, oldest first. Unset: in memory, or with --http-workers above 1 in "
        "a private temporary folder, removed when the frontend stops.",
    )
    http_max_connections: int = Field(
        8192,
        gt=0,
        description="Open client connections; past it a new one gets a 503 at once. Lowered to "
        "fit the open-file limit (whose soft value is raised to the hard one at start).",
    )


class Deployment(BaseDeployment):
    name = "frontend"
    resources = Resources(gpu=0, cpu="2", memory="2Gi")
    health_http_port_arg = "http-port"


def build_parser() -> DynFlexibleArgumentParser[FrontendConfig]:
    from dynamo_core.frontend._workers import WORKER_INDEX_ENV

    return DynFlexibleArgumentParser(
        FrontendConfig,
        prog="python -m dynamo_core.frontend",
        description="OpenAI-compatible HTTP frontend: preprocessing, routing, streaming.",
        env_allowlist=[WORKER_INDEX_ENV],
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[FrontendConfig]) -> None:
    """One frontend process; with `--http-workers N`, the first of N on the port (the copies
    repeat its command line, `args.argv`; see `dynamo_core.frontend._workers`)."""
    from dynamo_core._memory import return_large_blocks
    from dynamo_core.frontend._workers import HttpWorkers, reserve_port, worker_index
    from dynamo_core.frontend.responses import ResponseStore
    from dynamo_core.frontend.service import OpenAIService
    from dynamo_core.http import raise_open_file_limit, serve_http

    config = args.config

    raise_open_file_limit()
    return_large_blocks()

    index = worker_index()
    shared = index > 0 or config.http_workers > 1
    port = config.http_port
    copies = None
    store = ResponseStore(
        config.responses_max_stored,
        config.responses_max_stored_bytes,
        config.responses_store_dir,
    )
    if store.directory is not None and index == 0:
        store.open(config.http_workers)  # at start, before anything is served
    private_dir = None
    if index == 0 and config.http_workers > 1:  # the copies start now, before any thread does
        port = reserve_port(config.http_host, port)
        argv = args.argv
        if store.directory is None:  # the N processes share their stored responses in files
            private_dir = store.directory = Path(tempfile.mkdtemp(prefix="dynamo-responses-"))
            argv = [*argv, "--responses-store-dir", str(private_dir)]
        copies = HttpWorkers(argv, port, config.http_workers, config.graceful_shutdown_timeout)
        copies.start()
    router = config.router_settings()
    if shared:
        router = router.model_copy(update={"router_replica_sync": True})
    service = OpenAIService(
        runtime,
        namespace=config.namespace,
        router=router,
        migration_limit=config.migration_limit,
        tool_call_parser=config.dyn_tool_call_parser,
        reasoning_parser=config.dyn_reasoning_parser,
        responses_store=store,
    )
    try:
        await service.start()
        server = await serve_http(
            service.handle, config.http_host, port, limits=http_limits(config), reuse_port=shared
        )
        host = "localhost" if config.http_host in ("0.0.0.0", "::") else config.http_host
        log.info(
            "OpenAI API on http://%s:%d/v1 (namespace %s%s)",
            host,
            server.port,
            config.namespace,
            f", HTTP worker {index}" if shared else "",
        )
        await runtime.wait_for_shutdown()
        await server.close(grace=config.graceful_shutdown_timeout)
        await service.close()
    finally:
        if copies is not None:
            await copies.stop()
        if private_dir is not None:
            await asyncio.to_thread(shutil.rmtree, private_dir, ignore_errors=True)


def http_limits(config: FrontendConfig) -> HttpLimits:
    return HttpLimits(
        max_body=config.max_request_bytes,
        max_header_bytes=config.http_max_header_bytes,
        max_headers=config.http_max_headers,
        max_url=config.http_max_url_bytes,
        header_timeout=config.http_header_timeout,
        idle_timeout=config.http_idle_timeout,
        max_connections=config.http_max_connections,
    )


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
