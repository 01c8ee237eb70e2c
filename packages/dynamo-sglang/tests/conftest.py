from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

from sglang_testing import FAKES


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    """Every async test runs on uvloop, as the components do."""
    return {"uvloop": uvloop.new_event_loop}


def _drop_sglang_modules() -> None:
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake `sglang` importable for this test only."""
    _drop_sglang_modules()
    monkeypatch.syspath_prepend(str(FAKES))
    import sglang

    assert Path(sglang.__file__).is_relative_to(FAKES)
    yield sglang
    _drop_sglang_modules()


@pytest.fixture
def no_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SGLang not importable, even if some environment has it."""
    _drop_sglang_modules()
    monkeypatch.setitem(sys.modules, "sglang", None)  # type: ignore[arg-type]
    yield
    _drop_sglang_modules()


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
    """Child processes: file discovery in this test's folder, the fake `sglang` importable."""
    path = [str(FAKES), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        "DYN_FILE_KV": str(kv_dir),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": namespace,
        "PYTHONPATH": os.pathsep.join(path),
    }
