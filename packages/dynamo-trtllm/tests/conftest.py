"""Fixtures: the fake `tensorrt_llm` (tests/fake_trtllm) on sys.path or PYTHONPATH, never
installed. The shared ones (namespace, kv_dir, proc_env, uvloop, ...) come from dynamo-core's
pytest plugin; `proc_env` here adds the fake to the child's PYTHONPATH."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dynamo_core.testing.fakes import child_env
from trtllm_testing import FAKE


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
def proc_env(proc_env: dict[str, str]) -> dict[str, str]:
    """The plugin's child environment, with the fake `tensorrt_llm` importable."""
    return child_env(FAKE, proc_env)
