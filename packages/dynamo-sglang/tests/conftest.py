"""dynamo-sglang's fixtures: the fake `sglang` (tests/fakes) importable, or SGLang blocked. The
shared ones (namespace, kv_dir, proc_env, uvloop, ...) come from dynamo-core's pytest plugin."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from dynamo_core.testing.fakes import blocked, child_env, drop_modules, importable
from sglang_testing import FAKES


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake `sglang` importable for this test only."""
    yield importable(monkeypatch, FAKES, "sglang")
    drop_modules("sglang")


@pytest.fixture
def no_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SGLang not importable, even if some environment has it."""
    blocked(monkeypatch, "sglang")
    yield
    drop_modules("sglang")


@pytest.fixture
def engines(fake_sglang: ModuleType) -> Iterator[list[Any]]:
    """Fake `sglang.Engine`s a test starts (append them): shut down when it ends."""
    started: list[Any] = []
    yield started
    for engine in started:
        engine.shutdown()


@pytest.fixture
def proc_env(proc_env: dict[str, str]) -> dict[str, str]:
    """The plugin's child environment, with the fake `sglang` importable."""
    return child_env(FAKES, proc_env)
