"""The `dynamo` command: instant `--help`, subcommands imported only when chosen, and
`dynamo serve` failing before anything starts (exit 2, one line per problem)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_serve import cli, serve

HERE = Path(__file__).parent


def run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    out = run(
        "import sys, io, contextlib\n"
        "from dynamo_serve import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): rc = cli.main(['--help'])\n"
        "heavy = [m for m in ('circus', 'zmq', 'tornado', 'pydantic', 'yaml', 'dynamo_serve.serve') if m in sys.modules]\n"
        "print(rc, heavy, 'serve' in buf.getvalue())\n"
    )
    assert out.strip() == "0 [] True"


def test_serve_help_and_dry_run_do_not_import_circus(tmp_path: Path) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text("components: {backend: {module: serve_fakes.worker, args: {model-path: m}}}")
    out = run(
        "import sys, io, contextlib\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from dynamo_serve import cli\n"
        "buf = io.StringIO()\n"
        f"with contextlib.redirect_stdout(buf): rc = cli.main(['serve', {str(graph)!r}, '--dry-run'])\n"
        "print(rc, 'circus' in sys.modules, 'zmq' in sys.modules)\n"
    )
    assert out.strip() == "0 False False"


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy-everything"]) == 2
    assert "unknown command 'deploy-everything'" in capsys.readouterr().err


def test_split_overrides() -> None:
    rest, overrides = serve.split_overrides(
        ["g.yaml", "--backend.replicas", "3", "--dry-run", "--frontend.http-port=9", "--x.flag"]
    )
    assert rest == ["g.yaml", "--dry-run"]
    assert overrides == ["--backend.replicas", "3", "--frontend.http-port=9", "--x.flag"]


def graph_file(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(
        "namespace: ns\n"
        "components:\n"
        "  frontend: {module: serve_fakes.front, args: {http-port: 8000}}\n"
        "  backend: {module: serve_fakes.worker, args: {model-path: m}}\n"
    )
    return path


def test_misspelt_arg_fails_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    rc = serve.main(
        [str(graph_file(tmp_path)), "--backend.modle-path", "x", "--log-dir", str(logs)]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"dynamo serve: error: {tmp_path}/g.yaml, component 'backend' (serve_fakes.worker): "
        "unknown flag '--modle-path' (did you mean '--model-path'?)"
    ]
    assert not logs.exists()  # nothing was started, not even the log folder


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--backend.replicas", "-2"], "--backend.replicas: expected an integer >= 0"),
        (["--only", "frontend,bakend"], "no component 'bakend' (did you mean 'backend'?)"),
        (["--backnd.seed", "1"], "no component 'backnd' (did you mean 'backend'?)"),
        (["--gpus", "0", "--backend.resources", "x"], "unknown flag '--resources'"),
    ],
)
def test_other_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert serve.main([str(graph_file(tmp_path)), *argv]) == 2
    assert expected in capsys.readouterr().err


def test_unknown_module_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("components: {backend: {module: dynamo_vllm_missing.worker}}")
    assert serve.main([str(path)]) == 2
    assert "component 'backend': module 'dynamo_vllm_missing.worker' is not installed" in (
        capsys.readouterr().err
    )
    assert serve.main([str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml not found" in capsys.readouterr().err


def test_dry_run_prints_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = serve.main(
        [
            str(graph_file(tmp_path)),
            "--dry-run",
            "--namespace",
            "other",
            "--request-plane",
            "tcp",
            "--file-kv",
            "kv",
            "--only",
            "backend",
            "--backend.replicas",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    commands = [ln for ln in out.splitlines() if "-m serve_fakes" in ln]
    assert len(commands) == 2
    assert all("DYN_NAMESPACE=other" in c and "DYN_REQUEST_PLANE=tcp" in c for c in commands)
    assert "DYN_FILE_KV=/" in commands[0]  # made absolute: the command may run elsewhere
    assert "# not run here (--only): frontend" in out
