"""Where the output of a graph goes: the terminal, with a coloured prefix, and one file per process.

Circus hands a stream object raw chunks of a child's stdout or stderr (`{"data": bytes, "pid":
int, "name": "stdout"}`), cut wherever a read ended. `ComponentLog` re-assembles lines per pid and
stream, so a prefix never lands in the middle of a line, and writes each line twice: to the
terminal as `backend.1 | <line>` and to `<log dir>/backend.1.log` as is. The launcher's own lines
(`dynamo | ...`) go through the same `Console`, so the terminal never interleaves half lines, and
into `<log dir>/dynamo.log`. The last lines of every process are kept in memory, so that a process
that keeps failing at start-up can be reported with its own last words.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

__all__ = ["ComponentLog", "Console"]

_COLORS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)
_RESET = "\033[0m"


class Console:
    """The terminal (and the launcher's own log file), written a whole line at a time."""

    def __init__(
        self, out: IO[str] | None = None, *, color: bool | None = None, width: int = 8
    ) -> None:
        self.out = out if out is not None else sys.stdout
        if color is None:
            isatty = getattr(self.out, "isatty", lambda: False)
            color = bool(isatty()) and "NO_COLOR" not in os.environ
        self.color = color
        self.width = width
        self.file: IO[str] | None = None

    def open_file(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8", buffering=1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def line(self, prefix: str, text: str, color: int | None = None) -> None:
        head = f"{prefix:<{self.width}} |"
        if self.color and color is not None:
            head = f"\033[{color}m{head}{_RESET}"
        try:
            self.out.write(f"{head} {text}\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the terminal went away; the files still get everything

    def system(self, text: str) -> None:
        """A line of the launcher itself."""
        self.line("dynamo", text, 1 if self.color else None)
        if self.file is not None:
            self.file.write(f"{time.strftime('%H:%M:%S')} {text}\n")


class ComponentLog:
    """The circus stream of one component: lines to the console and to per-process files."""

    def __init__(self, console: Console, log_dir: Path, index: int, tail: int = 40) -> None:
        self.console = console
        self.log_dir = log_dir
        self.color = _COLORS[index % len(_COLORS)]
        self.tail_size = tail
        self._labels: dict[int, str] = {}
        self._files: dict[str, IO[str]] = {}
        self._partial: dict[tuple[int, str], str] = {}
        self._tails: dict[str, deque[str]] = {}

    # -- process life ---------------------------------------------------------------------

    def started(self, pid: int, label: str) -> None:
        self._labels[pid] = label
        self._tails[label] = deque(maxlen=self.tail_size)
        self._file(label).write(f"--- {label}: pid {pid} started {time.strftime('%c')} ---\n")

    def ended(self, pid: int) -> None:
        """Write what is left of the pid's last lines (output without a final newline)."""
        for key in [k for k in self._partial if k[0] == pid]:
            rest = self._partial.pop(key)
            if rest:
                self._emit(pid, rest)

    def label_of(self, pid: int, default: str) -> str:
        return self._labels.get(pid, default)

    def tail(self, label: str) -> list[str]:
        return list(self._tails.get(label, ()))

    def path(self, label: str) -> Path:
        return self.log_dir / f"{label}.log"

    # -- circus stream API ----------------------------------------------------------------

    def __call__(self, data: dict[str, Any]) -> None:
        pid = int(data.get("pid", 0))
        raw = data.get("data", b"")
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        key = (pid, str(data.get("name", "stdout")))
        text = self._partial.pop(key, "") + text
        *lines, rest = text.split("\n")
        if rest:
            self._partial[key] = rest
        for line in lines:
            self._emit(pid, line.rstrip("\r"))

    def close(self) -> None:
        for pid in list(self._labels):
            self.ended(pid)
        for f in self._files.values():
            f.close()
        self._files.clear()

    # -- internals --------------------------------------------------------------------------

    def _file(self, label: str) -> IO[str]:
        f = self._files.get(label)
        if f is None:
            f = self.path(label).open("a", encoding="utf-8", buffering=1)
            self._files[label] = f
        return f

    def _emit(self, pid: int, line: str) -> None:
        label = self._labels.get(pid, f"pid {pid}")
        self.console.line(label, line, self.color)
        self._file(label).write(line + "\n")
        tail = self._tails.get(label)
        if tail is not None:
            tail.append(line)
