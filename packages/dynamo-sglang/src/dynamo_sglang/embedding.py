"""`python -m dynamo_sglang.embedding`: an embedding model (`/v1/embeddings`) on SGLang.

    python -m dynamo_sglang.embedding --model-path Alibaba-NLP/gte-Qwen2-1.5B-instruct
    python -m dynamo_sglang.embedding --model-path DIR --context-length 512

SGLang runs the model with `--is-embedding` (set here; a `*ForCausalLM` model serves its last
token's hidden state, normalised), aggregated: a `--disaggregation-mode` other than null is a `ConfigError`. The
worker serves `{namespace}.backend.generate` with `EmbeddingHandler` (every input of a request
in one `EmbeddingReqInput` batch, as SGLang's own server sends token ids) and registers an
embedding model: its card's `EmbeddingSpec` is SGLang's `hidden_size` and the model's
Matryoshka dimensions, so the frontend answers `dimensions` the model cannot serve with a 400,
and its context length is one less than SGLang's (SGLang refuses an input as long as its
context). Chat and completions requests for this model get a 400 that names `/v1/embeddings`.
No KV events are relayed (embeddings are not routed by KV cache).
"""

from __future__ import annotations

from dynamo_core.args import DynFlexibleArgumentParser, ParsedArgs
from dynamo_core.component import run_component
from dynamo_core.deploy import BaseDeployment, Resources
from dynamo_core.llm.model_card import register_model
from dynamo_core.runtime import DistributedRuntime, dynamo_worker
from dynamo_sglang import ENGINE
from dynamo_sglang.args import SglangConfig, make_parser
from dynamo_sglang.engine import SglangAdapter

__all__ = ["Deployment", "build_parser", "main", "worker"]


class Deployment(BaseDeployment):
    name = "sglang-embedding"
    resources = Resources(gpu=1, cpu="8", memory="16Gi")


def build_parser() -> DynFlexibleArgumentParser[SglangConfig]:
    return make_parser(
        "python -m dynamo_sglang.embedding",
        "An SGLang embedding worker (--is-embedding, /v1/embeddings) served as a Dynamo component.",
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime, args: ParsedArgs[SglangConfig]) -> None:
    config = args.config
    async with SglangAdapter(args, role="embedding") as adapter:
        component = runtime.namespace(config.namespace).component(
            config.resolved_component(adapter.role)
        )
        await component.create_service()
        endpoint = component.endpoint(config.endpoint)
        engine = await adapter.start(component)  # loads the model: blocks until SGLang is ready
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
