"""Fixtures: the fake `tensorrt_llm` (tests/fake_trtllm) on sys.path or PYTHONPATH, never
installed; uvloop; a per-test namespace and file-discovery folder for child processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from trtllm_testing import FAKE, with_fake_path


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    """Every async test runs on uvloop, as the components do."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`import tensorrt_llm` gives the fake (for this test; the module stays cached)."""
    monkeypatch.syspath_prepend(str(FAKE))
    import tensorrt_llm

    assert tensorrt_llm.__version__.endswith("+fake")
    tensorrt_llm.LLM.instances.clear()
    yield tensorrt_llm
    for llm in tensorrt_llm.LLM.instances:
        llm.shutdown()
    tensorrt_llm.LLM.instances.clear()


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
    """Environment for child processes: file discovery in this test's own folder, the fake."""
    return with_fake_path(
        {
            "DYN_FILE_KV": str(kv_dir),
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_REQUEST_PLANE": "tcp",
            "DYN_NAMESPACE": namespace,
        }
    )
