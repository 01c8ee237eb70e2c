"""`python -m dynamo_core.frontend`: the OpenAI-compatible HTTP entry point of a graph.

    python -m dynamo_core.frontend --http-port 8000 [--router-mode least-loaded]

It watches model cards in its namespace, so workers can come and go: `/v1/models` lists what is
live, and each request is routed to a live instance of its model.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, configure_logging, dynamo_worker

__all__ = ["Deployment", "FrontendConfig", "build_parser", "main"]

log = logging.getLogger("dynamo.frontend")


class FrontendConfig(RuntimeConfig):
    http_host: str = Field("0.0.0.0", description="Address the HTTP server listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port).")
    router_mode: Literal["round-robin", "random", "least-loaded", "kv"] = Field(
        "round-robin",
        description="How a worker is chosen for each request (kv: where the prompt's prefix "
        "is cached, from the workers' KV events, balanced against their load).",
    )
    kv_overlap_score_weight: float = Field(
        1.0,
        ge=0,
        description="With --router-mode kv: weight of prefill work against load (0: load only).",
    )
    router_temperature: float = Field(
        0.0,
        ge=0,
        description="With --router-mode kv: softmax temperature of the choice (0: always the best).",
    )
    migration_limit: int | None = Field(
        None,
        ge=0,
        description="Times a broken stream may move to another worker (default: the model card's).",
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest request body accepted."
    )


class Deployment(BaseDeployment):
    name = "frontend"
    resources = Resources(gpu=0, cpu="2", memory="2Gi")
    health_http_port_arg = "http-port"


def build_parser() -> DynFlexibleArgumentParser[FrontendConfig]:
    return DynFlexibleArgumentParser(
        FrontendConfig,
        prog="python -m dynamo_core.frontend",
        description="OpenAI-compatible HTTP frontend: preprocessing, routing, streaming.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, config: FrontendConfig) -> None:
    from dynamo_core.frontend.service import OpenAIService
    from dynamo_core.http import serve_http

    service = OpenAIService(
        runtime,
        namespace=config.namespace,
        router_mode=config.router_mode,
        migration_limit=config.migration_limit,
        kv_overlap_weight=config.kv_overlap_score_weight,
        router_temperature=config.router_temperature,
    )
    await service.start()
    server = await serve_http(
        service.handle, config.http_host, config.http_port, max_body=config.max_request_bytes
    )
    host = "localhost" if config.http_host in ("0.0.0.0", "::") else config.http_host
    log.info("OpenAI API on http://%s:%d/v1 (namespace %s)", host, server.port, config.namespace)
    await runtime.wait_for_shutdown()
    await server.close(grace=config.graceful_shutdown_timeout)
    await service.close()


def main(argv: list[str] | None = None) -> None:
    config = build_parser().parse_or_exit(argv).config
    configure_logging()
    sys.exit(worker(config))
