"""Engine fakes in tests: a package that imitates an engine's Python API, importable on demand.

Each engine package's tests hold a fake of its engine (`tests/fake_vllm/vllm`,
`tests/fakes/sglang`, `tests/fake_trtllm/tensorrt_llm`): a folder that, put first on the path,
is imported instead of the real library. These helpers do that the same way everywhere:

- `importable(monkeypatch, root, name)`: the fake package `name` under `root`, imported fresh
  for this test (a cached real or fake module is dropped first; the path goes when the test
  ends);
- `blocked(monkeypatch, name)`: `import name` fails for this test, even where the library is
  installed (`sys.modules[name] = None`, what "not installed" looks like to Python);
- `child_env(root, env)`: the environment of a child process that should import the fake.

Each package keeps its own small fixture over these (`fake_vllm`, `fake_sglang`,
`fake_trtllm`), because they differ: vLLM's skips where a real vLLM is installed, TensorRT-LLM's
clears the fake's record of engines.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

__all__ = ["blocked", "child_env", "drop_modules", "importable"]


def drop_modules(name: str) -> None:
    """Forget `name` and its submodules, so the next import finds them again."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def importable(monkeypatch: pytest.MonkeyPatch, root: Path, name: str) -> ModuleType:
    """Put `root` first on `sys.path` for this test and import the fake package `name` from it."""
    drop_modules(name)
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(name)
    origin = Path(module.__file__ or "")
    if not origin.is_relative_to(root):
        raise AssertionError(f"import {name} found {origin}, not the fake under {root}")
    return module


def blocked(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """`import name` raises ImportError for this test."""
    drop_modules(name)
    monkeypatch.setitem(sys.modules, name, None)


def child_env(root: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` plus a PYTHONPATH that puts the fake under `root` first for a child process."""
    path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**(env or {}), "PYTHONPATH": os.pathsep.join(path)}
