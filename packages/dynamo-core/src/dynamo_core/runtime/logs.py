"""`configure_logging()`: how every component's `main()` sets up logging, from `DYN_LOG`.

`DYN_LOG` is NVIDIA Dynamo's variable: a level (`error`, `warn`, `info`, `debug`, `trace`),
optionally followed by `,logger=level` entries for parts of the tree, e.g.
`DYN_LOG=warn,dynamo.frontend=debug`. Unset, each program picks its own default: `info` for
components (their log is what an operator reads), `warning` for `dynamo-run in=text` (its
terminal is a conversation). Logs always go to stderr, one line per event. A value that cannot
be read is said once, on stderr, and the default is used.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

__all__ = ["LOG_FORMAT", "configure_logging", "parse_log_spec"]

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
    logging.basicConfig(level=root, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    if problem is not None:
        logging.getLogger("dynamo").warning("%s", problem)
