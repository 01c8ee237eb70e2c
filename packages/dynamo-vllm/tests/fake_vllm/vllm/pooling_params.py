"""`PoolingParams` (vllm/pooling_params.py, 0.32): what a pooling request asks of the model.

`verify(model_config)` checks `dimensions` as vLLM does (`_set_default_parameters`): a model
that is not Matryoshka refuses any `dimensions`; one that is takes 1..embedding_size, and only
its `matryoshka_dimensions` when it lists them. Errors are `VLLMValidationError` with vLLM's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.exceptions import VLLMValidationError


@dataclass
class PoolingParams:
    use_activation: bool | None = None
    dimensions: int | None = None
    task: str | None = None

    def verify(self, model_config: Any) -> None:
        if self.task == "embed" and self.use_activation is None:
            self.use_activation = True
        if self.dimensions is None:
            return
        name = model_config.served_model_name
        if not model_config.is_matryoshka:
            raise VLLMValidationError(
                f"Model {name!r} does not support Matryoshka embeddings; dimensions must be "
                f"unset (received dimensions={self.dimensions})."
            )
        size = model_config.embedding_size
        if not 1 <= self.dimensions <= size:
            raise VLLMValidationError(
                f"Model {name!r} only supports dimensions in range [1, {size}], got "
                f"{self.dimensions}."
            )
        mds = model_config.matryoshka_dimensions
        if mds is not None and self.dimensions not in mds:
            raise VLLMValidationError(
                f"Model {name!r} only supports Matryoshka dimensions {mds}, got {self.dimensions}."
            )
