"""dynamo-trtllm: Dynamo workers for TensorRT-LLM (its LLM API).

Roles, each a module with its own `main()`: `dynamo_trtllm.worker` (aggregated),
`dynamo_trtllm.prefill` and `dynamo_trtllm.decode` (disaggregated serving through TensorRT-LLM's
`DisaggregatedParams`). `dynamo-run out=trtllm` finds `ENGINE` through the `dynamo.engines` entry
point. Importing this package never imports TensorRT-LLM.
"""

from dynamo_core.engines import EngineSpec
from dynamo_trtllm._version import __version__

#: How `dynamo-run out=trtllm`, the role modules' `main()` and the test kit know this engine;
#: the TensorRT-LLM versions it runs on are the `trtllm` extra's range in pyproject.toml.
ENGINE = EngineSpec(
    name="trtllm",
    module="dynamo_trtllm.worker",
    extra="dynamo-trtllm[trtllm]",
    description="TensorRT-LLM (LLM API, PyTorch backend)",
    import_name="tensorrt_llm",
    display_name="TensorRT-LLM",
    # NVIDIA publishes the real wheel on its own index
    index_url="https://pypi.nvidia.com",
)

__all__ = ["ENGINE", "__version__"]
