"""dynamo-sglang: SGLang workers as Dynamo components.

`python -m dynamo_sglang.worker` (aggregated, or as `--disaggregation-mode` says),
`python -m dynamo_sglang.prefill`, `python -m dynamo_sglang.decode`,
`python -m dynamo_sglang.embedding` (an embedding model: /v1/embeddings); `dynamo-run out=sglang`
finds `ENGINE` through the `dynamo.engines` entry point. Importing this package does not
import SGLang (`pip install "dynamo-sglang[sglang]"` brings it).
"""

from dynamo_core.engines import EngineSpec
from dynamo_sglang._version import __version__

#: How `dynamo-run out=sglang`, the role modules' `main()` and the test kit know this engine;
#: the SGLang versions it runs on are the `sglang` extra's range in pyproject.toml.
ENGINE = EngineSpec(
    name="sglang",
    module="dynamo_sglang.worker",
    extra="dynamo-sglang[sglang]",
    description="SGLang (aggregated, prefill or decode by --disaggregation-mode)",
    import_name="sglang",
    display_name="SGLang",
)

__all__ = ["ENGINE", "__version__"]
