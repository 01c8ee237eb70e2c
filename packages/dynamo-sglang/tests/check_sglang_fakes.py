"""The fake SGLang (tests/fakes) against what dynamo-sglang uses of SGLang (`protocols`): a
type-checking pass, not a test (`nox -s typecheck` runs mypy on it with the fake on MYPYPATH).
A fake that drifts from the engine boundary the code is written against fails here."""

from __future__ import annotations

from sglang.srt.entrypoints.engine import Engine, TokenizerManager
from sglang.srt.server_args import ServerArgs

from dynamo_sglang.protocols import EngineLike, ServerArgsClass, TokenizerManagerLike


def engine(sglang_engine: Engine) -> EngineLike:
    return sglang_engine


def tokenizer_manager(manager: TokenizerManager) -> TokenizerManagerLike:
    return manager


def server_args_class() -> ServerArgsClass:
    return ServerArgs
