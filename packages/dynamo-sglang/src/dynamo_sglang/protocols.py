"""What this package uses of SGLang, as `Protocol`s: the engine boundary, typed.

The adapter and the handlers are typed with these instead of `Any`, so mypy checks every use of
the engine against them; and `tests/check_sglang_fakes.py` assigns the test fake's classes to
them (`nox -s typecheck`), so a fake that drifts from what the code uses fails type-checking.
Written against SGLang 0.5 (`sglang.srt.entrypoints.engine.Engine`, its tokenizer manager, and
`sglang.srt.server_args.ServerArgs`); only what is used is declared. `nox -s sglang_args` also
holds the fake's methods against the real SGLang's source (`test_sglang_real_fakes.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator
from typing import Any, Protocol

__all__ = ["EngineLike", "ServerArgsClass", "TokenizerManagerLike"]


class TokenizerManagerLike(Protocol):
    """`engine.tokenizer_manager`: the context length it enforces, aborts, the resolved args,
    the model's config, and the requests of `EmbeddingReqInput` (what `Engine.async_encode`
    calls, with token ids instead of text)."""

    @property
    def context_len(self) -> int: ...
    @property
    def server_args(self) -> Any: ...
    @property
    def model_config(self) -> Any: ...  # hidden_size, is_matryoshka, matryoshka_dimensions

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None: ...

    def generate_request(
        self, obj: Any, request: Any = None
    ) -> AsyncGenerator[Any, None]: ...  # an EmbeddingReqInput batch: one list of outputs


class EngineLike(Protocol):
    """`sglang.Engine`, as the adapter and the handlers use it."""

    @property
    def tokenizer_manager(self) -> TokenizerManagerLike: ...
    @property
    def server_args(self) -> Any: ...

    async def async_generate(
        self,
        *,
        input_ids: list[int] | None = None,
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        rid: str | None = None,
    ) -> Any: ...  # stream=True: an async generator of {"output_ids", "meta_info"} maps

    def shutdown(self) -> None: ...


class ServerArgsClass(Protocol):
    """The `ServerArgs` class: SGLang's flags and the engine's arguments from them."""

    def add_cli_args(self, parser: argparse.ArgumentParser) -> None: ...

    def from_cli_args(self, args: argparse.Namespace) -> Any: ...
