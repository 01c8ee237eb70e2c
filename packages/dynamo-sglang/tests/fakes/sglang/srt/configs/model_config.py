"""Fake `sglang.srt.configs.model_config`: what `ModelConfig` reads from the model's config.json
that callers use (SGLang 0.5.23's attribute names): `hidden_size`, `context_len`,
`is_generation` (False with `--is-embedding`), and the Matryoshka settings
(`matryoshka_dimensions`, else `is_matryoshka`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelConfig:
    def __init__(self, model_path: str, context_length: int, is_embedding: bool = False) -> None:
        config = Path(model_path) / "config.json"
        hf: dict[str, Any] = json.loads(config.read_text()) if config.is_file() else {}
        self.model_path = model_path
        self.hidden_size = int(hf.get("hidden_size", 64))
        self.context_len = context_length
        self.is_generation = not is_embedding
        self.matryoshka_dimensions: list[int] | None = hf.get("matryoshka_dimensions")
        self.is_matryoshka = self.matryoshka_dimensions or hf.get("is_matryoshka", False)
