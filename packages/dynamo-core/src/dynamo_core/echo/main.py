"""The echo engine: streams the prompt's own tokens back (Dynamo's `out=echo`).

    python -m dynamo_core.echo --model-path examples/models/tiny

Useful to check a graph end to end without a model: the output text is the prompt's text, so
templating, tokenizing, detokenizing and stop strings are all visible. `--delay` seconds pass
between tokens (0: as fast as the request plane goes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.model_card import register_model
from dynamo_core.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_core.runtime import (
    Context,
    DistributedRuntime,
    Endpoint,
    RuntimeConfig,
    dynamo_worker,
)

__all__ = ["Deployment", "EchoConfig", "EchoHandler", "build_parser", "main", "start_engine"]


class EchoHandler(BaseWorkerHandler):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(name="dynamo.echo")
        self.delay = delay
        self.active: set[str] = set()

    async def engine_generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        rid = request.request_id or context.id
        self.active.add(rid)
        try:
            # a migrated request goes on where the first worker stopped (token-exact)
            done = request.generated_tokens
            prompt = (
                request.token_ids[: len(request.token_ids) - done] if done else request.token_ids
            )
            limit = request.stop_conditions.max_tokens
            n = len(prompt) if limit is None else limit
            for i in range(done, done + n):
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield EngineOutput(token_ids=[prompt[i % len(prompt)]])
            yield EngineOutput(finish_reason="length" if limit is not None else "stop")
        finally:
            self.active.discard(rid)

    async def abort(self, request_id: str) -> None:
        self.active.discard(request_id)


class EchoConfig(RuntimeConfig):
    model_path: Path = Field(description="Folder with the tokenizer (tokenizer.json).")
    model_name: str | None = Field(None, description="Served model name (default: folder name).")
    component_name: str = Field("backend", description="Component to serve as.")
    endpoint: str = Field("generate", description="Endpoint name to serve.")
    delay: float = Field(0.0, ge=0, description="Seconds between tokens.")


class Deployment(BaseDeployment):
    name = "echo"


def build_parser() -> DynFlexibleArgumentParser[EchoConfig]:
    return DynFlexibleArgumentParser(
        EchoConfig, prog="python -m dynamo_core.echo", description="The echo engine."
    )


@dataclass
class EchoWorker:
    handler: EchoHandler
    endpoint: Endpoint

    async def serve(self) -> None:
        await self.endpoint.serve_endpoint(self.handler.generate)

    async def close(self) -> None:
        pass


async def start_engine(runtime: DistributedRuntime, parsed: ParsedArgs[Any]) -> EchoWorker:
    config: EchoConfig = parsed.config
    component = runtime.namespace(config.namespace).component(config.component_name)
    await component.create_service()
    endpoint = component.endpoint(config.endpoint)
    await register_model(endpoint, model_path=config.model_path, model_name=config.model_name)
    return EchoWorker(EchoHandler(config.delay), endpoint)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[EchoConfig]) -> None:
    echo = await start_engine(runtime, args)
    await echo.serve()


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
