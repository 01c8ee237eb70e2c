"""What this package uses of vLLM, as `Protocol`s: the engine boundary, typed.

The adapter and the handlers are typed with these instead of `Any`, so mypy checks every use of
the engine against them; and `tests/check_vllm_fakes.py` assigns the test fake's classes to
them (`nox -s typecheck`), so a fake that drifts from what the code uses fails type-checking
rather than passing tests against an engine that does not exist. Written against vLLM's V1
`AsyncLLM` (`vllm.v1.engine.async_llm`) and `vllm.outputs`; only what is used is declared.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

__all__ = [
    "AsyncLLMClass",
    "AsyncLLMLike",
    "CompletionOutputLike",
    "PoolingRequestOutputLike",
    "RequestOutputLike",
]


class CompletionOutputLike(Protocol):
    """`vllm.outputs.CompletionOutput`: one sequence's tokens so far."""

    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def logprobs(self) -> Any: ...  # one {token_id: Logprob} per token, or None
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def stop_reason(self) -> int | str | None: ...


class RequestOutputLike(Protocol):
    """`vllm.outputs.RequestOutput`: what `AsyncLLM.generate` streams."""

    @property
    def outputs(self) -> Sequence[CompletionOutputLike]: ...
    @property
    def prompt_logprobs(self) -> Any: ...  # None, or per prompt token None | {id: Logprob}
    @property
    def num_cached_tokens(self) -> int | None: ...
    @property
    def kv_transfer_params(self) -> dict[str, Any] | None: ...


class TensorLike(Protocol):
    """`torch.Tensor`, as far as a pooling output's data is read."""

    def tolist(self) -> Any: ...


class PoolingOutputLike(Protocol):
    """`vllm.outputs.PoolingOutput`: the pooled hidden states (1-D for an embedding)."""

    @property
    def data(self) -> TensorLike: ...


class PoolingRequestOutputLike(Protocol):
    """`vllm.outputs.PoolingRequestOutput`: what `AsyncLLM.encode` yields."""

    @property
    def outputs(self) -> PoolingOutputLike: ...
    @property
    def finished(self) -> bool: ...


class AsyncLLMLike(Protocol):
    """`vllm.v1.engine.async_llm.AsyncLLM`, as the adapter and the handlers use it."""

    @property
    def vllm_config(self) -> Any: ...

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str
    ) -> AsyncGenerator[RequestOutputLike, None]: ...

    def encode(
        self, prompt: Any, pooling_params: Any, request_id: str
    ) -> AsyncGenerator[PoolingRequestOutputLike, None]: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


class AsyncLLMClass(Protocol):
    """The `AsyncLLM` class itself: how the adapter builds one."""

    def from_engine_args(
        self, engine_args: Any, *, stat_loggers: list[Any] | None = None
    ) -> AsyncLLMLike: ...
