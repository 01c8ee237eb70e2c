"""Packaging: the engine-package conformance kit (public names, entry point, lazy engine import,
`--help` and the one-line exit without SGLang, scripts, deployments, the adapter)."""

from __future__ import annotations

from dynamo_core.testing.engine_package import EnginePackageConformance


class TestSglangPackage(EnginePackageConformance):
    package = "dynamo_sglang"
    roles = {
        "worker": "sglang-worker",
        "prefill": "sglang-prefill",
        "decode": "sglang-decode",
        "embedding": "sglang-embedding",
    }
    sample_args = ["--model-path", "x"]
    help_mentions = ("--migration-limit", "--kv-events", "--kv-events-port", "--bootstrap-host")
