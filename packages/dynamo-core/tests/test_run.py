"""`dynamo-run` as a user meets it: the chat REPL on a real terminal (a pty: Ctrl-C, Ctrl-D,
what the screen shows), the conversation trimmed to the context, exit statuses of the
non-interactive modes, and a busy HTTP port."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamo_core.testing.procs import card_of_module, registered_card

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
MOCKER = ["out=mocker", "--model-path", str(TINY)]
PROMPT = b"\r\n> "


class Terminal:
    """`dynamo-run` on a pseudo-terminal: its controlling tty, so Ctrl-C is the tty's SIGINT."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once, nothing else
            os.execve(sys.executable, [sys.executable, "-m", "dynamo_core.run", *argv], env)
        self.pid, self.fd = pid, fd
        self.screen = b""
        self.status: int | None = None

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        """Everything up to and including the next `marker` (after what was read before)."""
        start = len(self.screen)
        deadline = time.monotonic() + timeout
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} after {timeout}s; screen: {self.screen!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"exited before {marker!r}; screen: {self.screen!r}"
                self.screen += chunk
        end = self.screen.index(marker, start) + len(marker)
        return self.screen[start:end]

    def read_more(self, timeout: float = 30) -> bytes:
        """Whatever comes next (at least one byte)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        assert ready, f"nothing more after {timeout}s; screen: {self.screen!r}"
        chunk = os.read(self.fd, 65536)
        self.screen += chunk
        return chunk

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float = 30) -> int:
        """Read the screen until the child closes the terminal, then its exit status."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"still running; screen: {self.screen!r}"
            if not select.select([self.fd], [], [], left)[0]:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: every end of the terminal's other side is closed
                break
            if not chunk:
                break
            self.screen += chunk
        self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@contextmanager
def terminal(*argv: str, log: str | None = None) -> Iterator[Terminal]:
    env = {k: v for k, v in os.environ.items() if k != "DYN_LOG"}
    if log is not None:
        env["DYN_LOG"] = log
    term = Terminal(list(argv), env)
    try:
        yield term
    finally:
        term.close()


def test_repl_answers_ctrl_c_cancels_the_answer_then_leaves_at_the_prompt() -> None:
    with terminal("in=text", *MOCKER, "--mean-output-tokens", "4") as term:
        term.read_until(b"> ")
        term.type(b"hello\r")
        answer = term.read_until(PROMPT)
        assert re.search(rb"hello\r\n.+\r\n> $", answer, re.S), answer  # an answer, then a prompt
        term.type(b"\x03")  # Ctrl-C at the prompt: leave
        assert term.wait() == 0
    assert b"Traceback" not in term.screen and b" INFO " not in term.screen

    # a decode step of 0.2 s and answers that do not end: the answer is running at Ctrl-C
    with terminal(
        "in=text", *MOCKER, "--speedup-ratio", "0.02", "--mean-output-tokens", "10000"
    ) as term:
        term.read_until(b"> ")
        term.type(b"tell me everything\r")
        term.read_until(b"everything\r\n")
        term.read_more()  # the answer has begun
        term.type(b"\x03")
        assert b"[cancelled]" in term.read_until(PROMPT, timeout=10)
        term.type(b"\x04")  # Ctrl-D: leave
        assert term.wait() == 0
    assert b"Traceback" not in term.screen and b"Event loop is closed" not in term.screen


def test_repl_ctrl_d_leaves_and_dyn_log_brings_the_logs_back() -> None:
    with terminal("in=text", *MOCKER, log="info") as term:
        term.read_until(b"> ")
        term.type(b"\x04")
        assert term.wait() == 0
    assert b" INFO dynamo" in term.screen and b"Traceback" not in term.screen


def dynamo_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_long_conversation_is_trimmed_oldest_turns_first_with_a_note() -> None:
    turns = "".join(f"question number {i} about the weather today\n" for i in range(12))
    result = dynamo_run(
        "in=text", *MOCKER, "--context-length", "160", "--max-tokens", "40", stdin=turns
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr  # every question answered
    notes = [ln for ln in result.stderr.splitlines() if "dropped its oldest turn" in ln]
    assert notes and notes[0] == (
        "[the conversation is longer than the model's 160-token context: dropped its oldest turn]"
    )


def test_non_interactive_errors_end_with_a_non_zero_status(tmp_path: Path) -> None:
    lines = "a short one\n" + "word " * 400 + "\nanother short one\n"
    result = dynamo_run("in=text", *MOCKER, "--context-length", "160", stdin=lines)
    assert result.returncode == 1  # after answering the lines around the failure
    (error,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "context length is 160" in error

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "fine"}\nnot json\n')
    out = tmp_path / "out.jsonl"
    result = dynamo_run(f"in=batch:{prompts}", *MOCKER, "--output", str(out))
    assert result.returncode == 1
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert results[0]["response"] and results[1]["line"] == 2 and "error" in results[1]


def test_in_http_busy_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dynamo_run(
            "in=http", "--http-host", "127.0.0.1", "--http-port", str(port), *MOCKER
        )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"dynamo-run: error: cannot listen on 127.0.0.1:{port}: the port is already in use; "
        "choose another with --http-port"
    )
    assert "Traceback" not in result.stderr


def test_the_routers_flags_are_dynamo_runs_too(tmp_path: Path) -> None:
    """`RouterConfig` is composed by dynamo-run as by the frontend: the KV router's knobs and the
    admission thresholds are accepted anywhere on the line, a bad value is one line, exit 2."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "one"}\n{"text": "two"}\n')
    out = tmp_path / "out.jsonl"
    result = dynamo_run(
        f"in=batch:{prompts}",
        "--router-mode",
        "kv",
        *MOCKER,
        "--router-temperature=0.5",
        "--kv-overlap-score-weight",
        "2",
        "--active-requests-threshold",
        "4",
        "--max-tokens",
        "3",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["tokens_out"] for r in results] == [3, 3]

    result = dynamo_run(f"in=batch:{prompts}", *MOCKER, "--router-temperature", "-1")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("dynamo-run: error: ")
    assert "router-temperature" in result.stderr and "Traceback" not in result.stderr


def test_out_mocker_registers_the_card_python_m_registers(tmp_path: Path) -> None:
    """`dynamo-run out=mocker` runs the mocker's own `worker()`: the same model card (name,
    endpoint, context length, KV block size) as `python -m dynamo_core.mocker` with the same
    flags, the non-default ones included."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "one"}\n')
    flags = ["--model-path", str(TINY), "--model-name", "mini", "--block-size", "32",
             "--context-length", "512", "--speedup-ratio", "1000"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", f"in=batch:{prompts}", "out=mocker", *flags,
         "--output", str(tmp_path / "out.jsonl")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = registered_card(result.stderr)
    assert card == (
        "model mini registered on dynamo.backend.generate: context length 512, KV block size 32"
    )
    assert card_of_module("dynamo_core.mocker", flags, env) == card
