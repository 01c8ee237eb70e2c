"""The LLM layer: wire types, model cards, tokenizer, chat template, detokenizer, KV hashing.

Builds on `dynamo_core.runtime`; the frontend, router and engine workers build on it.

The names below load on first use (PEP 562): a role module or a parser that needs one piece
(`dynamo_core.llm.kv_relay`'s config, `register_model`) does not pay for the tokenizer and the
chat-template engine at import, so `--help` and `dynamo serve`'s plan stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_core._lazy import lazy_attributes

if TYPE_CHECKING:
    from dynamo_core.llm.chat_template import ChatTemplate
    from dynamo_core.llm.detokenizer import IncrementalDetokenizer, StopStringMatcher
    from dynamo_core.llm.kv import block_hashes
    from dynamo_core.llm.model_card import ModelCard, register_model
    from dynamo_core.llm.protocol import (
        EngineOutput,
        OutputOptions,
        PreprocessedRequest,
        SamplingOptions,
        StopConditions,
        Usage,
    )
    from dynamo_core.llm.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "EngineOutput",
    "IncrementalDetokenizer",
    "ModelCard",
    "OutputOptions",
    "PreprocessedRequest",
    "SamplingOptions",
    "StopConditions",
    "StopStringMatcher",
    "Tokenizer",
    "Usage",
    "block_hashes",
    "register_model",
]

__getattr__ = lazy_attributes(
    __name__,
    {
        "ChatTemplate": "dynamo_core.llm.chat_template",
        "IncrementalDetokenizer": "dynamo_core.llm.detokenizer",
        "StopStringMatcher": "dynamo_core.llm.detokenizer",
        "block_hashes": "dynamo_core.llm.kv",
        "ModelCard": "dynamo_core.llm.model_card",
        "register_model": "dynamo_core.llm.model_card",
        "EngineOutput": "dynamo_core.llm.protocol",
        "OutputOptions": "dynamo_core.llm.protocol",
        "PreprocessedRequest": "dynamo_core.llm.protocol",
        "SamplingOptions": "dynamo_core.llm.protocol",
        "StopConditions": "dynamo_core.llm.protocol",
        "Usage": "dynamo_core.llm.protocol",
        "Tokenizer": "dynamo_core.llm.tokenizer",
    },
)
