"""Run real processes in tests (and benchmarks): start, wait for a ready line (an event, not a sleep), always stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Proc:
    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, needle: str, timeout: float = 20.0) -> str:
        """Block until a line containing `needle` appears; fail with the output if it dies."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(needle in ln for ln in self.lines) or self.popen.poll() is not None,
                timeout,
            )
            for ln in self.lines:
                if needle in ln:
                    return ln
        output = "\n".join(self.lines[-40:])
        raise AssertionError(
            f"{needle!r} not seen (exited={self.popen.poll()}, timed out={not ok}):\n{output}"
        )

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._thread.join(5)
        return self.popen.returncode


@contextmanager
def run_python(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[Proc]:
    """`python <args>` in its own process group, stdout+stderr captured, stopped on exit."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    popen = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    proc = Proc(popen)
    try:
        yield proc
    finally:
        proc.stop(signal.SIGKILL if popen.poll() is None else signal.SIGTERM, timeout=5)


#: The line `register_model` logs (the card's name, endpoint, context length, KV block size).
_REGISTERED = re.compile(r"model \S+ registered on .*: context length \d+, KV block size \d+")


def registered_card(output: str) -> str:
    """The one model card a process's `output` says it registered (without the log prefix)."""
    found = [m.group(0) for m in _REGISTERED.finditer(output)]
    assert len(found) == 1, f"{len(found)} registered cards in: {output[-3000:]}"
    return found[0]


def card_of_module(
    module: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> str:
    """`python -m module argv` on an in-process runtime (no etcd, no NATS): the model card it
    registers, as `registered_card` reads it; the process is stopped once it is logged."""
    local = ["--discovery-backend", "mem", "--request-plane", "inproc"]
    with run_python(["-m", module, *argv, *local], env) as proc:
        return registered_card(proc.wait_for_line("registered on", timeout))
