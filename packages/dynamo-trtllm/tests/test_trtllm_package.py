"""Packaging: the engine-package conformance kit (public names, entry point, lazy engine import,
`--help` and the one-line exit without TensorRT-LLM, scripts, deployments, the adapter)."""

from __future__ import annotations

from dynamo_core.testing.engine_package import EnginePackageConformance


class TestTrtllmPackage(EnginePackageConformance):
    package = "dynamo_trtllm"
    roles = {"worker": "trtllm-worker", "prefill": "trtllm-prefill", "decode": "trtllm-decode"}
    sample_args = ["--model-path", "x"]
    help_mentions = ("--migration-limit", "--extra-engine-args", "--tensor-parallel-size")
