"""Every command in every README runs, as written, on a fresh copy of the repository with a
fresh virtual environment (`nox -s integration`).

The READMEs mark each fenced command block (`bash`, `sh`, `console` or unlabelled) after its
language, and `test_every_command_block_is_marked` holds them to it:

    ```bash test                 run it: every command must succeed (bash -e)
    ```bash test server=8000     its last command serves on that port: run it in the background,
                                 wait until http://127.0.0.1:8000/v1/models lists a model, run
                                 the next `test client` block against it, then Ctrl-C (SIGINT)
    ```bash test client          the commands "from another shell" of the server block above
    ```bash skip: REASON         not run here, for that reason (a GPU, the model hub, a cluster)

How a block runs: the README's own text, unchanged, with `bash -e`, in a copy of the work tree
(tracked and unignored files: what a clone has), with a virtual environment this module makes
(`python -m venv`, nothing installed: the READMEs' `pip install` lines do that) first on PATH.
Each block runs in its own PID namespace (`unshare`): when the block ends, every process it
started dies with the namespace. A server block holds a lock named after its port (in the temp
dir) while it runs, so two runs of this module on one machine take turns on port 8000; a port
held by anything else is a failure that says so. (A network namespace would isolate the port
too, but also cut the `pip install` lines off the package index.) Blocks of one README run in
order, so an install line serves the blocks after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import venv
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [
    ROOT / "README.md",
    *sorted(ROOT.glob("packages/*/README.md")),
    *sorted(ROOT.glob("examples/**/README.md")),
]
COMMAND_LANGS = {"bash", "sh", "shell", "console", ""}
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*(?P<info>.*)$")
_MARK = re.compile(r"^(?:test(?: server=(?P<port>\d+)| (?P<client>client))?|skip: (?P<reason>.+))$")


@dataclass
class Block:
    readme: str
    line: int
    lang: str
    info: str
    text: str

    @property
    def mark(self) -> re.Match[str] | None:
        return _MARK.match(self.info)

    @property
    def id(self) -> str:
        return f"{self.readme}:{self.line}"


def command_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a README that hold commands, in order."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence["lang"] in COMMAND_LANGS:
            text = "\n".join(lines[i + 1 : end]) + "\n"
            rel = str(path.relative_to(ROOT))
            blocks.append(Block(rel, i + 1, fence["lang"], fence["info"].strip(), text))
        i = end + 1
    return blocks


@dataclass
class Scenario:
    """What one test runs: a block, or a server block with its client block."""

    blocks: list[Block]
    port: int | None = None
    skip: str | None = None

    @property
    def id(self) -> str:
        return self.blocks[0].id


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for readme in READMES:
        blocks = command_blocks(readme)
        for i, block in enumerate(blocks):
            mark = block.mark
            if mark is None or mark["client"]:
                continue  # unmarked: reported by the marking test; clients go with their server
            if mark["reason"]:
                out.append(Scenario([block], skip=mark["reason"]))
            elif mark["port"]:
                client = blocks[i + 1] if i + 1 < len(blocks) else None
                assert client is not None and client.mark is not None and client.mark["client"], (
                    f"{block.id}: a server block is followed by its `test client` block"
                )
                out.append(Scenario([block, client], port=int(mark["port"])))
            else:
                out.append(Scenario([block]))
    return out


def test_every_command_block_is_marked() -> None:
    unmarked = [
        f"{b.id}: ```{b.lang} {b.info}".rstrip()
        for readme in READMES
        for b in command_blocks(readme)
        if b.mark is None
    ]
    assert not unmarked, "mark these (see tests/test_readme.py): " + "; ".join(unmarked)


def test_commands_installing_local_packages_name_them_all() -> None:
    """`pip install ./packages/dynamo-X` needs dynamo-core on the same line: it is not on PyPI."""
    wrong = []
    for readme in READMES:
        for number, line in enumerate(readme.read_text().splitlines(), 1):
            for command in re.findall(r"pip install [^`&|;\n]*", line):
                local = re.findall(r"\./packages/(dynamo-[\w-]+)", command)
                named = re.findall(r"(?<![\w./-])(dynamo-[a-z]+)(?:\[|\b)", command)
                if (local and "dynamo-core" not in local) or (named and not local):
                    wrong.append(f"{readme.relative_to(ROOT)}:{number}: {command.strip()}")
    assert not wrong, wrong


# -- running them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the work tree as a clone has it: tracked files and new unignored ones."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git work tree")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    target = tmp_path_factory.mktemp("clone")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("venv")
    venv.create(path, with_pip=True, symlinks=True)
    return path


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.fixture(scope="module")
def namespaces() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to stop every process a block starts")
    if subprocess.run([*UNSHARE, "true"], check=False).returncode != 0:
        pytest.skip("needs PID namespaces (root)")


@contextlib.contextmanager
def port_turn(port: int | None) -> Iterator[None]:
    """Hold this machine's lock for `port`; fail if something else listens there."""
    if port is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"dynamo-readme-port-{port}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                pytest.fail(f"port {port} is taken by another program ({exc})")
        yield


def by_readme() -> dict[str, list[Scenario]]:
    out: dict[str, list[Scenario]] = {}
    for scenario in scenarios():
        if scenario.skip is None:
            out.setdefault(scenario.blocks[0].readme, []).append(scenario)
    return out


@pytest.mark.parametrize("scenario", [s for s in scenarios() if s.skip], ids=lambda s: s.id)
def test_readme_block_not_run_here(scenario: Scenario) -> None:
    pytest.skip(f"{scenario.id}: {scenario.skip}")


@pytest.mark.slow
@pytest.mark.parametrize(("readme", "steps"), list(by_readme().items()))
def test_readme_runs_as_written(
    readme: str,
    steps: list[Scenario],
    checkout: Path,
    fresh_venv: Path,
    namespaces: None,
    tmp_path: Path,
) -> None:
    """The README's runnable blocks, in order (an install line serves the blocks after it)."""
    for n, scenario in enumerate(steps):
        run_scenario(scenario, checkout, fresh_venv, tmp_path / str(n))


def run_scenario(scenario: Scenario, checkout: Path, fresh_venv: Path, work: Path) -> None:
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PATH": f"{fresh_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(fresh_venv),
        "DYN_FILE_KV": str(work / "kv"),  # a fresh machine's discovery folder
        "NO_COLOR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    spec = work / "spec.json"
    spec.write_text(json.dumps({"scenario": _spec(scenario), "cwd": str(checkout)}))
    with port_turn(scenario.port):
        done = subprocess.run(
            [*UNSHARE, sys.executable, __file__, str(spec)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"{scenario.id} failed:\n{report[-6000:]}"
    for block in scenario.blocks:
        if block.mark and block.mark["client"]:
            check_client_output(block, (work / "client.out").read_text())


def _spec(scenario: Scenario) -> dict[str, object]:
    return {"blocks": [asdict(b) for b in scenario.blocks], "port": scenario.port}


def check_client_output(block: Block, out: str) -> None:
    """A completion a README shows answers like a model: a short answer, then stop (or the
    max_tokens it asked for)."""
    decoder = json.JSONDecoder()
    at = 0
    while (at := out.find("{", at)) != -1:
        try:
            reply, at = decoder.raw_decode(out, at)
        except ValueError:
            at += 1
            continue
        if isinstance(reply, dict) and "choices" in reply and "usage" in reply:
            assert reply["choices"][0]["finish_reason"] in ("stop", "length"), (block.id, reply)
            assert reply["usage"]["completion_tokens"] < 256, (block.id, reply)


# -- the driver: runs inside the namespaces -----------------------------------------------------


def _run_block(text: str, cwd: Path, out: Path) -> int:
    with out.open("w") as sink:
        return subprocess.run(
            ["bash", "-e", "-c", text], cwd=cwd, stdout=sink, stderr=sink
        ).returncode


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            return bool(json.loads(r.read()).get("data"))
    except (OSError, ValueError):
        return False


def _drive(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    work = spec_path.parent
    cwd = Path(spec["cwd"])
    blocks = [Block(**b) for b in spec["scenario"]["blocks"]]
    port = spec["scenario"]["port"]
    if port is None:
        rc = _run_block(blocks[0].text, cwd, work / "block.out")
        sys.stdout.write((work / "block.out").read_text())
        print(f"{blocks[0].id}: exit status {rc}")
        return rc
    server_out = (work / "server.out").open("w")
    server = subprocess.Popen(
        ["bash", "-e", "-c", blocks[0].text], cwd=cwd, stdout=server_out, stderr=server_out,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _ready(port):
        if server.poll() is not None or time.monotonic() > deadline:
            print((work / "server.out").read_text())
            print(f"{blocks[0].id}: not serving on port {port} (exit status {server.poll()})")
            return 1
        time.sleep(0.1)  # polling HTTP: the server's only outward sign of being ready
    t0 = time.monotonic()
    rc = _run_block(blocks[1].text, cwd, work / "client.out")
    print(f"{blocks[1].id}: exit status {rc} in {time.monotonic() - t0:.2f}s")
    os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the READMEs say
    try:
        server_rc = server.wait(60)
    except subprocess.TimeoutExpired:
        server_rc = -1
    log = (work / "server.out").read_text()
    print(log[-3000:])
    print((work / "client.out").read_text()[-2000:])
    if server_rc not in (0, 130, -signal.SIGINT) or "Traceback" in log:
        print(f"{blocks[0].id}: stopped with status {server_rc}")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(_drive(Path(sys.argv[1])))
