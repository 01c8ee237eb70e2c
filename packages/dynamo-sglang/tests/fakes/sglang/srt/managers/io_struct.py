"""Fake `sglang.srt.managers.io_struct`: `EmbeddingReqInput` as SGLang 0.5.23 has it (a subset
of its fields, the same names, order and defaults; `rid` keyword-only), with the batch
normalisation the tokenizer manager calls first (a batch's `rid` must be a list, one per
input)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EmbeddingReqInput:
    rid: str | list[str] | None = field(default=None, kw_only=True)
    text: list[list[str]] | list[str] | str | None = None
    input_ids: list[list[int]] | list[int] | None = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    embed_override_token_id: int | None = None
    embed_overrides: Any = None
    sampling_params: Any = None
    log_metrics: bool = True
    modalities: list[str] | None = None
    is_cross_encoder_request: bool = False
    lora_path: Any = None
    priority: int | None = None
    dimensions: int | None = None
    external_trace_header: dict[str, Any] | None = None

    def normalize_batch_and_arguments(self) -> None:
        """SGLang's checks and batch shape: one of text or input_ids; a list of lists (or of
        strings) is a batch, whose `rid` is a list of one id per input."""
        if self.text is None and self.input_ids is None:
            raise ValueError(
                "At least one of text, input_ids, image, video, or audio should be provided"
            )
        if self.text is not None and self.input_ids is not None:
            raise ValueError("text and input_ids cannot be provided at the same time")
        if self.text is not None:
            self.is_single = not isinstance(self.text, list)
            self.batch_size = 1 if self.is_single else len(self.text)
        else:
            assert self.input_ids is not None
            self.is_single = not isinstance(self.input_ids[0], list)
            self.batch_size = 1 if self.is_single else len(self.input_ids)
        if self.is_single:
            if self.rid is None:
                self.rid = uuid.uuid4().hex
        elif self.rid is None:
            self.rid = [uuid.uuid4().hex for _ in range(self.batch_size)]
        else:
            assert isinstance(self.rid, list), "The rid should be a list."
        if isinstance(self.rid, list) and len(set(self.rid)) != len(self.rid):
            raise ValueError(f"Duplicate request IDs detected within the request: {self.rid}")
