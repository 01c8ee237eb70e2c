"""A fake `tensorrt_llm` for tests: the LLM API's names, signatures and output shapes, no GPU.

Written from TensorRT-LLM 1.0's LLM API (see `tests/test_trtllm_handlers.py` for the signatures relied
on and their sources). The "model" is a deterministic function of the prompt, the seed and the
position, so the same request gives the same tokens in any process.
"""

from tensorrt_llm.disaggregated_params import DisaggregatedParams
from tensorrt_llm.llmapi import LLM, KvCacheConfig, RequestOutput
from tensorrt_llm.sampling_params import SamplingParams

__version__ = "1.0.0+fake"

__all__ = ["LLM", "DisaggregatedParams", "KvCacheConfig", "RequestOutput", "SamplingParams"]
