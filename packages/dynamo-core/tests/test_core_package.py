"""The public surface of dynamo_core, pinned (a change here is a change users see)."""

import importlib.util
import subprocess
import sys

import pytest

import dynamo_core
import dynamo_core.llm
import dynamo_core.router
import dynamo_core.runtime


def test_public_names() -> None:
    assert dynamo_core.__all__ == ["__version__"]
    assert sorted(dynamo_core.runtime.__all__) == [
        "Client",
        "ClientStream",
        "Component",
        "Context",
        "DistributedRuntime",
        "Endpoint",
        "Event",
        "EventPublisher",
        "EventSubscriber",
        "Instance",
        "Namespace",
        "RuntimeConfig",
        "ServedEndpoint",
        "configure_logging",
        "dynamo_worker",
        "install_uvloop",
        "run_uvloop",
    ]
    assert sorted(dynamo_core.llm.__all__) == [
        "ChatTemplate",
        "EngineOutput",
        "IncrementalDetokenizer",
        "ModelCard",
        "OutputOptions",
        "PreprocessedRequest",
        "SamplingOptions",
        "StopConditions",
        "StopStringMatcher",
        "Tokenizer",
        "Usage",
        "block_hashes",
        "register_model",
    ]
    assert "make_policy" in dynamo_core.router.__all__


def test_importing_dynamo_core_is_cheap() -> None:
    code = "import sys, dynamo_core; print(sorted(m for m in sys.modules if m.startswith('dynamo_core')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['dynamo_core', 'dynamo_core._version']"


COMPONENTS = ["dynamo_core.frontend.main", "dynamo_core.mocker.main", "dynamo_core.echo.main"]


@pytest.mark.parametrize("module", COMPONENTS)
def test_every_component_file_runs_as_a_script(module: str) -> None:
    """`python3 path/to/module.py --help` works as `python -m module --help` does."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    out = subprocess.run(
        [sys.executable, spec.origin, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m "), out.stdout[:200]
    assert out.stderr == ""
