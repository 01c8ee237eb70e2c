"""The echo engine: streams the prompt's own tokens back (Dynamo's `out=echo`).

    python -m dynamo_core.echo --model-path examples/models/tiny

Useful to check a graph end to end without a model: the output text is the prompt's text, so
templating, tokenizing, detokenizing and stop strings are all visible. `--delay` seconds pass
between tokens (0: as fast as the request plane goes). `worker()` is the role-module recipe
every engine follows; `EchoAdapter` has no engine to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from dynamo_core.adapter import EngineAdapter, EngineInfo, WorkerConfig
from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment
from dynamo_core.handlers import BaseWorkerHandler
from dynamo_core.llm.model_card import register_model
from dynamo_core.llm.protocol import EngineOutput, PreprocessedRequest
from dynamo_core.runtime import Component, Context, DistributedRuntime, dynamo_worker

__all__ = [
    "Deployment",
    "EchoAdapter",
    "EchoConfig",
    "EchoHandler",
    "build_parser",
    "main",
    "worker",
]


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


class EchoConfig(WorkerConfig):
    model_path: Path = Field(description="Folder with the tokenizer (tokenizer.json).")
    model_name: str | None = Field(None, description="Served model name (default: folder name).")
    delay: float = Field(0.0, ge=0, description="Seconds between tokens.")


class EchoAdapter(EngineAdapter[EchoConfig]):
    """No engine to start: the model card comes from the model folder, the handler echoes."""

    def __init__(self, args: ParsedArgs[EchoConfig]) -> None:
        super().__init__(args, "worker")

    async def start(self, component: Component) -> EngineInfo:
        return EngineInfo(
            context_length=None,  # the model's config.json
            kv_block_size=16,
            model_dir=self.config.model_path,
            served_name=self.config.model_name,
        )

    def handler(self, cls: type[BaseWorkerHandler] | None = None) -> BaseWorkerHandler:
        return (cls or EchoHandler)(self.config.delay)

    async def close(self) -> None:
        pass


class Deployment(BaseDeployment):
    name = "echo"


def build_parser() -> DynFlexibleArgumentParser[EchoConfig]:
    return DynFlexibleArgumentParser(
        EchoConfig, prog="python -m dynamo_core.echo", description="The echo engine."
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[EchoConfig]) -> None:
    config = args.config
    async with EchoAdapter(args) as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)
        handler = adapter.handler(EchoHandler)
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
            context_length=engine.context_length,
            kv_block_size=engine.kv_block_size,
            migration_limit=config.migration_limit,
            parsers=config.parser_spec(),
        )
        await endpoint.serve_endpoint(handler.generate)


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv)


if __name__ == "__main__":
    main()
