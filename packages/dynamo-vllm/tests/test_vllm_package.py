"""Packaging: public names, the entry point, lazy engine imports, the one-line missing-engine exit."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import dynamo_core
import dynamo_vllm
from conftest import real_vllm_installed
from dynamo_vllm import decode, prefill, worker

ROLES = ["dynamo_vllm.worker", "dynamo_vllm.prefill", "dynamo_vllm.decode"]


def test_public_names() -> None:
    assert dynamo_vllm.__all__ == ["ENGINE", "__version__"]


def test_one_version_for_all_packages() -> None:
    assert dynamo_vllm.__version__ == dynamo_core.__version__


def test_engine_spec() -> None:
    spec = dynamo_vllm.ENGINE
    assert (spec.name, spec.module, spec.extra) == (
        "vllm",
        "dynamo_vllm.worker",
        "dynamo-vllm[vllm]",
    )
    module = spec.load()
    assert module is worker


def test_entry_point_when_installed() -> None:
    try:
        importlib.metadata.distribution("dynamo-vllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dynamo-vllm is not installed (run through nox)")
    from dynamo_core.engines import find_engine

    assert find_engine("vllm") == dynamo_vllm.ENGINE


def test_deployments() -> None:
    assert worker.Deployment.name == "vllm-worker"
    assert prefill.Deployment.name == "vllm-prefill"
    assert decode.Deployment.name == "vllm-decode"
    assert all(m.Deployment.resources.gpu == 1 for m in (worker, prefill, decode))


def _python(code_or_args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # keep the source folders (tests run from source too), never the fake vllm
    paths = [p for p in sys.path if p and "fake_vllm" not in p and os.path.isdir(p)]
    clean["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, *code_or_args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def test_importing_the_roles_never_imports_vllm() -> None:
    code = (
        "import sys, dynamo_vllm, dynamo_vllm.worker, dynamo_vllm.prefill, dynamo_vllm.decode, "
        "dynamo_vllm.args, dynamo_vllm.handlers, dynamo_vllm.events, dynamo_vllm.engine\n"
        "for m in ('dynamo_vllm.worker', 'dynamo_vllm.prefill', 'dynamo_vllm.decode'):\n"
        "    sys.modules[m].build_parser()\n"
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
    )
    result = _python(["-c", code])
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(real_vllm_installed(), reason="vLLM is installed")
@pytest.mark.parametrize("role", ROLES)
def test_without_vllm_the_worker_exits_with_one_line(role: str) -> None:
    result = _python(["-m", role, "--model", "x", "--max-model-len", "64"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'pip install "dynamo-vllm[vllm]"' in lines[0]
    assert result.stdout == ""


@pytest.mark.skipif(real_vllm_installed(), reason="vLLM is installed")
def test_help_works_without_vllm() -> None:
    result = _python(["-m", "dynamo_vllm.worker", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--migration-limit" in result.stdout
    assert "--kv-events" in result.stdout
    assert "dynamo-vllm[vllm]" in result.stdout
