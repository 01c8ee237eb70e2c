"""`python -m dynamo_vllm.embedding`: an embedding model (`/v1/embeddings`) on vLLM.

    python -m dynamo_vllm.embedding --model BAAI/bge-small-en-v1.5    # next to the frontend
    python -m dynamo_vllm.embedding --model DIR --max-model-len 512

vLLM runs the model with `--runner pooling` (a `*ForCausalLM` model is converted to an
embedding model by vLLM's `--convert auto`: last-token pooling, normalised). The worker serves
`{namespace}.backend.generate` with `EmbeddingHandler` (`AsyncLLM.encode`) and registers an
embedding model: its card's `EmbeddingSpec` is vLLM's embedding size and Matryoshka dimensions,
so the frontend answers `dimensions` the model cannot serve with a 400. Chat and completions
requests for this model get a 400 that names `/v1/embeddings`.
"""

from __future__ import annotations

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_vllm import ENGINE
from dynamo_vllm.args import VllmConfig, make_parser
from dynamo_vllm.engine import VllmAdapter

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "vllm-embedding"
    resources = Resources(gpu=1, cpu="8", memory="16Gi")


def build_parser() -> DynFlexibleArgumentParser[VllmConfig]:
    return make_parser(
        "python -m dynamo_vllm.embedding",
        "A vLLM embedding worker (a pooling model, /v1/embeddings) served as a Dynamo component.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[VllmConfig]) -> None:
    config = args.config
    async with VllmAdapter(args, role="embedding") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model (in a thread)
        handler = adapter.embedding_handler()
        await register_model(
            endpoint,
            model_path=engine.model_dir,
            model_name=engine.served_name,
            aliases=engine.aliases,
            context_length=engine.context_length,
            kv_block_size=engine.kv_block_size,
            migration_limit=config.migration_limit,
            embedding=engine.embedding,
        )
        await endpoint.serve_endpoint(handler.generate)


def main(argv: list[str] | None = None) -> None:
    run_component(build_parser(), worker, argv, engine=ENGINE)


if __name__ == "__main__":
    main()
