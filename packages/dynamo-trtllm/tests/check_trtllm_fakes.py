"""The fake TensorRT-LLM (tests/fake_trtllm) against what dynamo-trtllm uses of it
(`protocols`): a type-checking pass, not a test (`nox -s typecheck` runs mypy on it with the
fake on MYPYPATH). A fake that drifts from the engine boundary the code is written against fails
here."""

from __future__ import annotations

from tensorrt_llm.executor import CompletionOutput
from tensorrt_llm.llmapi import LLM, RequestOutput

from dynamo_trtllm.protocols import CompletionOutputLike, LLMLike, RequestOutputLike


def llm(engine: LLM) -> LLMLike:
    return engine


def request_output(out: RequestOutput) -> RequestOutputLike:
    return out


def completion_output(out: CompletionOutput) -> CompletionOutputLike:
    return out
