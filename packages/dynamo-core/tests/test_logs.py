"""`configure_logging()`: DYN_LOG levels and targets, JSON lines, time zones (in a child process:
it replaces the root logger's handlers, pytest's among them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest

from dynamo_core.runtime.logs import parse_log_spec

SNIPPET = """
import logging
from dynamo_core.runtime import configure_logging
configure_logging()
configure_logging()  # twice: still one handler, one line per event
logging.getLogger("dynamo.router").debug("router detail")
logging.getLogger("dynamo.frontend").debug("frontend detail")
logging.getLogger("dynamo.frontend").info("frontend news")
logging.getLogger("other").warning("a warning")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("dynamo.worker").exception("it broke")
"""


def _stderr(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DYN_LOG")}
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=True,
    )
    assert out.stdout == ""
    return out.stderr.splitlines()


def test_levels_and_targets() -> None:
    assert parse_log_spec("warn,dynamo.router=debug") == (30, {"dynamo.router": 10})
    assert parse_log_spec("trace") == (10, {})
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_log_spec("loud")


def test_default_is_info_in_the_text_format() -> None:
    lines = _stderr()
    messages = [ln.split(": ", 1)[1] for ln in lines if ": " in ln and " INFO " in ln]
    assert messages == ["frontend news"]
    assert not any("detail" in ln for ln in lines)
    assert any(" WARNING other: a warning" in ln for ln in lines)
    assert any(" ERROR dynamo.worker: it broke" in ln for ln in lines)


def test_dyn_log_sets_the_level_and_per_logger_levels() -> None:
    lines = _stderr(DYN_LOG="warn,dynamo.router=debug")
    text = "\n".join(lines)
    assert "router detail" in text
    assert "frontend detail" not in text and "frontend news" not in text
    assert "a warning" in text


def test_a_bad_dyn_log_is_said_once_and_info_is_used() -> None:
    lines = _stderr(DYN_LOG="verbose")
    warnings = [ln for ln in lines if "DYN_LOG='verbose' ignored" in ln]
    assert len(warnings) == 2  # once per call: the snippet configures logging twice
    assert any("frontend news" in ln for ln in lines)


def test_json_lines_in_utc() -> None:
    records = [json.loads(line) for line in _stderr(DYN_LOGGING_JSONL="1", DYN_LOG="debug")]
    assert [r["message"] for r in records] == [
        "router detail",
        "frontend detail",
        "frontend news",
        "a warning",
        "it broke",
    ]
    news = records[2]
    assert set(news) == {"time", "level", "target", "message"}
    assert (news["level"], news["target"]) == ("INFO", "dynamo.frontend")
    assert news["time"].endswith("Z")
    assert "ZeroDivisionError" in records[-1]["exception"]


def test_json_lines_in_local_time() -> None:
    env = {"DYN_LOGGING_JSONL": "true", "DYN_LOG_USE_LOCAL_TZ": "1", "TZ": "Asia/Kolkata"}
    record = json.loads(_stderr(**env)[0])
    assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    assert record["time"].endswith("+05:30")
