"""`python -m dynamo_core.router`: routing decisions as a component, for several frontends.

    python -m dynamo_core.router --namespace demo --router-mode kv
    python -m dynamo_core.frontend --namespace demo --router-endpoint demo.router.route

It serves `<namespace>.<component-name>.route` (`--component-name`, default `router`), `mark`
and `stats` (`RouterService`: one router per workers' endpoint, fed by the workers' KV events
and load metrics, counting every frontend's requests). Frontends opt in with
`--router-endpoint` (`DYN_ROUTER_ENDPOINT`); the mode, knobs and admission thresholds are then
this component's. Run two for a standby: frontends ask the first live one.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.router.config import RouterConfig
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker

__all__ = ["Deployment", "RouterServiceConfig", "build_parser", "main"]

log = logging.getLogger("dynamo.router")


class RouterServiceConfig(RouterConfig, RuntimeConfig):
    """The router component's flags: the runtime's, the router's, and its name."""

    component_name: str = Field(
        default="router", description="Component to serve as (frontends name its route endpoint)."
    )


class Deployment(BaseDeployment):
    name = "router"
    resources = Resources(gpu=0, cpu="2", memory="2Gi")


def build_parser() -> DynFlexibleArgumentParser[RouterServiceConfig]:
    return DynFlexibleArgumentParser(
        RouterServiceConfig,
        prog="python -m dynamo_core.router",
        description="The router as a service: routing decisions for several frontends.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[RouterServiceConfig]) -> None:
    from dynamo_core.router.service import RouterService

    config = args.config

    service = RouterService(runtime, config.router_settings())
    component = runtime.namespace(config.namespace).component(config.component_name)
    await component.create_service()
    try:
        await asyncio.gather(
            component.endpoint("route").serve_endpoint(service.route),
            component.endpoint("mark").serve_endpoint(service.mark),
            component.endpoint("stats").serve_endpoint(service.stats),
        )
    finally:
        await service.close()


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
