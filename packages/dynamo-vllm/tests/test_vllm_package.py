"""Packaging: the engine-package conformance kit (public names, entry point, lazy engine import,
`--help` and the one-line exit without vLLM, scripts, deployments, the adapter)."""

from __future__ import annotations

from dynamo_core.testing.engine_package import EnginePackageConformance


class TestVllmPackage(EnginePackageConformance):
    package = "dynamo_vllm"
    roles = {
        "worker": "vllm-worker",
        "prefill": "vllm-prefill",
        "decode": "vllm-decode",
        "embedding": "vllm-embedding",
    }
    sample_args = ["--model", "x", "--max-model-len", "64"]
    help_mentions = ("--migration-limit", "--kv-events", "--kv-events-port")
