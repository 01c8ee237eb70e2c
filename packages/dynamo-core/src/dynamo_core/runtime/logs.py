"""`configure_logging()`: how every component's `main()` sets up logging, from `DYN_LOG`.

`DYN_LOG` is NVIDIA Dynamo's variable: a level (`error`, `warn`, `info`, `debug`, `trace`),
optionally followed by `,logger=level` entries for parts of the tree, e.g.
`DYN_LOG=warn,dynamo.frontend=debug`. Unset, each program picks its own default: `info` for
components (their log is what an operator reads), `warning` for `dynamo-run in=text` (its
terminal is a conversation). Logs always go to stderr, one line per event. A value that cannot
be read is said once, on stderr, and the default is used.

`DYN_LOGGING_JSONL=1` writes one JSON object per line instead (for a log collector):
`{"time": "2026-01-01T12:00:00.123456Z", "level": "INFO", "target": "dynamo.frontend",
"message": "..."}`, plus `"exception"` (the formatted traceback) when there is one. Its times
are UTC unless `DYN_LOG_USE_LOCAL_TZ=1` (then local, with the offset). The text format keeps
local times, as `asctime` always has.

`configure_logging` replaces the root logger's handlers (a second call, or a program that
configured logging first, does not double every line).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = ["LOG_FORMAT", "JsonLinesFormatter", "configure_logging", "parse_log_spec"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


def parse_log_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """`"warn,dynamo.frontend=debug"` -> (root level or None, {logger: level}); ValueError."""
    root: int | None = None
    loggers: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, level = part.rpartition("=")
        value = _LEVELS.get(level.strip().lower())
        if value is None:
            raise ValueError(f"unknown log level {level.strip()!r} (use {', '.join(_LEVELS)})")
        if eq:
            loggers[name.strip()] = value
        else:
            root = value
    return root, loggers


_TRUE = frozenset({"1", "true", "yes", "on"})


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, target (the logger), message[, exception]."""

    def __init__(self, *, local_time: bool = False) -> None:
        super().__init__()
        self.local_time = local_time

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, tz=UTC)
        stamp = when.astimezone().isoformat() if self.local_time else when.isoformat()
        line: dict[str, str] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _formatter(env: Mapping[str, str]) -> logging.Formatter:
    if env.get("DYN_LOGGING_JSONL", "").strip().lower() in _TRUE:
        local = env.get("DYN_LOG_USE_LOCAL_TZ", "").strip().lower() in _TRUE
        return JsonLinesFormatter(local_time=local)
    return logging.Formatter(LOG_FORMAT)


def configure_logging(default: str = "info", environ: Mapping[str, str] | None = None) -> None:
    """Log to stderr at `DYN_LOG`'s levels, else at `default`."""
    env = os.environ if environ is None else environ
    root = _LEVELS[default]
    loggers: dict[str, int] = {}
    problem = None
    spec = env.get("DYN_LOG", "").strip()
    if spec:
        try:
            given, loggers = parse_log_spec(spec)
        except ValueError as exc:
            problem = f"DYN_LOG={spec!r} ignored: {exc}"
        else:
            root = given if given is not None else root
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(env))
    logging.basicConfig(level=root, handlers=[handler], force=True)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    if problem is not None:
        logging.getLogger("dynamo").warning("%s", problem)
