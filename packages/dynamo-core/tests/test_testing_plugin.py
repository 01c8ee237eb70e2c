"""dynamo-core's pytest plugin (`dynamo_core.testing.plugin`), seen from a suite of its own."""

from __future__ import annotations

import os
import sys

import pytest

SUITE = """
import asyncio
from pathlib import Path

def test_fixtures(namespace, kv_dir, proc_env, tiny_model):
    assert namespace.startswith("t") and len(namespace) == 11
    assert kv_dir.is_dir()
    assert proc_env == {
        "DYN_FILE_KV": str(kv_dir),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": namespace,
    }
    assert (tiny_model / "tokenizer.json").is_file()

async def test_loop():
    print("LOOP", type(asyncio.get_running_loop()).__module__)
"""


def _suite(pytester: pytest.Pytester, *ini: str) -> None:
    pytester.makeini("\n".join(["[pytest]", "asyncio_mode = auto", *ini]))
    pytester.makepyfile(test_suite=SUITE)
    models = pytester.path / "examples" / "models"
    models.mkdir(parents=True)
    tiny = models / "tiny"
    tiny.mkdir()
    (tiny / "tokenizer.json").write_text("{}")


def test_the_fixtures_come_with_dynamo_core(pytester: pytest.Pytester) -> None:
    _suite(pytester, "dynamo_uvloop = true")
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*LOOP uvloop*"])


def test_the_event_loop_is_left_alone_without_the_ini_option(pytester: pytest.Pytester) -> None:
    _suite(pytester)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*LOOP asyncio*"])


def test_a_conftest_fixture_overrides_the_plugins(pytester: pytest.Pytester) -> None:
    _suite(pytester)
    pytester.makeconftest(
        "import pytest\n"
        "@pytest.fixture\n"
        "def proc_env(proc_env):\n"
        "    return {**proc_env, 'EXTRA': '1'}\n"
    )
    pytester.makepyfile(
        test_override="def test_it(proc_env, namespace):\n"
        "    assert proc_env['EXTRA'] == '1' and proc_env['DYN_NAMESPACE'] == namespace\n"
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_override.py").assert_outcomes(
        passed=1
    )


def test_importing_the_plugin_imports_no_runtime() -> None:
    import subprocess

    code = (
        "import sys, dynamo_core.testing.plugin; "
        "print(sorted(m for m in sys.modules if m.startswith('dynamo_core.runtime') or m == 'uvloop'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
