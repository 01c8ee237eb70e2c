"""`SamplingParams`, `StructuredOutputsParams` and `RequestOutputKind` (vllm/sampling_params.py,
0.32), the fields dynamo-vllm sets."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vllm.exceptions import VLLMValidationError


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """One structured-output constraint; vLLM counts every field that is not None."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        kinds = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
        count = sum(getattr(self, k) is not None for k in kinds)
        if count > 1:
            raise VLLMValidationError(
                "You can only use one kind of structured outputs constraint "
                f"but multiple are specified: {self.__dict__}"
            )
        if count < 1:
            raise VLLMValidationError(
                "You must use one kind of structured outputs constraint "
                f"but none are specified: {self.__dict__}"
            )

    def validate(self) -> None:
        """What `SamplingParams._validate_structured_outputs` and the xgrammar backend check
        when the request is added (the parts this fake can check without a grammar compiler)."""
        if isinstance(self.choice, list) and not self.choice:
            raise VLLMValidationError(f"Choice '{self.choice}' cannot be an empty list")
        if isinstance(self.grammar, str) and not self.grammar.strip():
            raise VLLMValidationError("structured_outputs.grammar cannot be an empty string")
        if self.json_object is False:
            raise VLLMValidationError("structured_outputs.json_object must be True if set")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as exc:
                raise VLLMValidationError("Invalid JSON grammar specification.") from exc
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise VLLMValidationError(f"Failed to convert the regex: {exc}") from exc


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:  # vLLM's own checks, the ones that matter here
        if self.n != 1:
            raise ValueError("n must be 1 in this fake")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be greater than or equal to 0")
        if self.temperature < 0.0:
            raise ValueError("temperature must be non-negative")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True.")
