"""What this package uses of TensorRT-LLM, as `Protocol`s: the engine boundary, typed.

The adapter, the handlers and the publisher are typed with these instead of `Any`, so mypy
checks every use of the engine against them; and `tests/check_trtllm_fakes.py` assigns the
test fake's classes to them (`nox -s typecheck`), so a fake that drifts from what the code uses
fails type-checking. Written against the LLM API (`tensorrt_llm.LLM`, `RequestOutput`,
`CompletionOutput`); only what is used is declared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

__all__ = ["CompletionOutputLike", "LLMLike", "RequestOutputLike"]


class CompletionOutputLike(Protocol):
    """`tensorrt_llm.executor.CompletionOutput`: one sequence's tokens so far."""

    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def logprobs(self) -> Any: ...


class RequestOutputLike(Protocol):
    """`tensorrt_llm.executor.RequestOutput`: updated in place while it is iterated."""

    @property
    def outputs(self) -> Sequence[CompletionOutputLike]: ...
    @property
    def finished(self) -> bool: ...

    def abort(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[RequestOutputLike]: ...


class LLMLike(Protocol):
    """`tensorrt_llm.LLM`, as the adapter, the handlers and the publisher use it."""

    @property
    def args(self) -> Any: ...  # LlmArgs: max_seq_len, kv_cache_config.tokens_per_block

    def generate_async(
        self,
        inputs: Any,
        sampling_params: Any = None,
        *,
        streaming: bool = False,
        disaggregated_params: Any = None,
    ) -> RequestOutputLike: ...

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> AsyncIterator[Any]: ...

    def get_stats_async(self, timeout: float | None = 2) -> AsyncIterator[Any]: ...

    def shutdown(self) -> None: ...
