"""A fake worker: registers `<namespace>.<component>.generate` and echoes requests.

python -m serve_fakes.worker --model-path PATH [--component-name backend] [--fail-at-start]
                             [--config-error TEXT]
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser
from dynamo_core.deploy import BaseDeployment
from dynamo_core.errors import ConfigError
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker


class Deployment(BaseDeployment):
    name = "fake-worker"


class WorkerConfig(RuntimeConfig):
    model_path: str = Field(description="Model folder (only echoed).")
    component_name: str = Field("backend", description="Component to register as.")
    fail_at_start: bool = Field(False, description="Exit with status 3 at once.")
    tags: list[str] = Field(default_factory=list, description="Free tags (checks list flags).")
    config_error: str | None = Field(
        None, description="Stop with this ConfigError once the runtime is up (exit status 78)."
    )


def build_parser() -> DynFlexibleArgumentParser[WorkerConfig]:
    return DynFlexibleArgumentParser(WorkerConfig, prog="serve_fakes.worker")


@dynamo_worker()
async def worker(runtime: DistributedRuntime, config: WorkerConfig) -> None:
    component = runtime.namespace(config.namespace).component(config.component_name)
    await component.create_service()
    if config.config_error:
        raise ConfigError(config.config_error)

    async def generate(request: Any) -> AsyncIterator[Any]:
        yield {"pid": os.getpid(), "echo": request, "model": config.model_path}

    print(f"fake worker {os.getpid()} serving, tags={config.tags}", flush=True)
    await component.endpoint("generate").serve_endpoint(generate)


def main() -> int:
    config = build_parser().parse_or_exit().config
    if config.fail_at_start:
        print("failing at start as asked", file=sys.stderr, flush=True)
        return 3
    logging.basicConfig(level=logging.WARNING)
    return worker.run(config)


if __name__ == "__main__":
    raise SystemExit(main())
