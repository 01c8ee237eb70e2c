"""The fake vLLM (tests/fake_vllm) against what dynamo-vllm uses of vLLM (`protocols`): a
type-checking pass, not a test (`nox -s typecheck` runs mypy on it with the fake on MYPYPATH).
A fake that drifts from the engine boundary the code is written against fails here."""

from __future__ import annotations

from vllm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from dynamo_vllm.protocols import (
    AsyncLLMClass,
    AsyncLLMLike,
    CompletionOutputLike,
    PoolingRequestOutputLike,
    RequestOutputLike,
)


def engine(llm: AsyncLLM) -> AsyncLLMLike:
    return llm


def engine_class() -> AsyncLLMClass:
    return AsyncLLM


def request_output(out: RequestOutput) -> RequestOutputLike:
    return out


def completion_output(out: CompletionOutput) -> CompletionOutputLike:
    return out


def pooling_output(out: PoolingRequestOutput) -> PoolingRequestOutputLike:
    return out
