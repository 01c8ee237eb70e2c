"""The LLM layer: wire types, model cards, tokenizer, chat template, detokenizer, KV hashing.

Builds on `dynamo_core.runtime`; the frontend, router and engine workers build on it.
"""

from __future__ import annotations

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
