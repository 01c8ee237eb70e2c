"""Flags: Dynamo's plus SGLang's (the fake's subset of SGLang 0.5.23's), roles, no SGLang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dynamo_core.errors import ConfigError
from dynamo_sglang import decode, embedding, prefill, worker
from dynamo_sglang.args import resolve_embedding, resolve_mode, server_args_from
from sglang_testing import TINY


def test_help_without_sglang(no_sglang: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        decode.build_parser().parse(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--component-name" in out and "--migration-limit" in out
    assert "pip install 'dynamo-sglang[sglang]'" in out


def test_main_without_sglang_exits_with_one_line(tmp_path: Path) -> None:
    # a clean interpreter: whatever this environment has, hide sglang
    code = (
        "import sys; sys.modules['sglang'] = None; "
        "from dynamo_sglang.decode import main; main(['--model-path', 'x'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == 'error: SGLang is not installed: pip install "sglang>=0.4.9"\n'
    help_code = (
        "import sys; sys.modules['sglang'] = None; "
        "from dynamo_sglang.decode import main; main(['--help'])"
    )
    shown = subprocess.run([sys.executable, "-c", help_code], capture_output=True, text=True)
    assert shown.returncode == 0 and "dynamo-sglang[sglang]" in shown.stdout


def test_merged_parser(fake_sglang: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    parser = worker.build_parser()
    parsed = parser.parse(
        ["--model-path", str(TINY), "--page-size", "16", "--tp-size", "2", "--migration-limit", "2"]
    )
    assert parsed.config.model_path == str(TINY)  # SGLang's flag fills Dynamo's field
    assert parsed.config.migration_limit == 2
    assert parsed.engine_args is not None
    assert parsed.engine_args.page_size == 16 and parsed.engine_args.tp_size == 2
    server_args = server_args_from(parsed)
    assert isinstance(server_args, fake_sglang.ServerArgs)
    assert (server_args.model_path, server_args.page_size, server_args.tp_size) == (
        str(TINY),
        16,
        2,
    )
    assert server_args.disaggregation_bootstrap_port == 8998  # SGLang's default, untouched
    with pytest.raises(SystemExit):
        parser.parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--disaggregation-mode" in out and "--migration-limit" in out


def test_sglang_flag_errors(fake_sglang: ModuleType) -> None:
    parser = worker.build_parser()
    with pytest.raises(ConfigError, match="--model-path"):
        parser.parse([])
    with pytest.raises(ConfigError, match="page-size"):
        parser.parse(["--model-path", "m", "--page-sise", "4"])
    with pytest.raises(ConfigError, match="disaggregation-mode"):
        parser.parse(["--model-path", "m", "--disaggregation-mode", "both"])


def test_graph_file_keys(fake_sglang: ModuleType, tmp_path: Path) -> None:
    graph = tmp_path / "g.yaml"
    graph.write_text(
        "namespace: ns1\ncomponents:\n  decode:\n    module: dynamo_sglang.decode\n"
        "    args: {model-path: m, page-size: 32, migration-limit: 1}\n"
    )
    parsed = decode.build_parser().parse(["--config", str(graph), "--component", "decode"])
    assert parsed.config.namespace == "ns1"
    assert parsed.engine_args is not None and parsed.engine_args.page_size == 32


@pytest.mark.parametrize(
    ("module", "argv", "mode"),
    [
        (worker, [], "null"),
        (worker, ["--disaggregation-mode", "prefill"], "prefill"),
        (worker, ["--disaggregation-mode", "decode"], "decode"),
        (prefill, [], "prefill"),
        (prefill, ["--disaggregation-mode", "prefill"], "prefill"),
        (decode, [], "decode"),
    ],
)
def test_modes(fake_sglang: ModuleType, module: ModuleType, argv: list[str], mode: str) -> None:
    parsed = module.build_parser().parse(["--model-path", "m", *argv])
    role = {"worker": None, "prefill": "prefill", "decode": "decode"}[
        module.__name__.split(".")[-1]
    ]
    assert resolve_mode(parsed, role) == mode
    assert server_args_from(parsed).disaggregation_mode == mode
    assert parsed.config.resolved_component(mode) == ("prefill" if mode == "prefill" else "backend")


def test_role_contradicting_mode_is_an_error(fake_sglang: ModuleType) -> None:
    parsed = decode.build_parser().parse(["--model-path", "m", "--disaggregation-mode", "prefill"])
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_mode(parsed, "decode")


def test_the_embedding_role_turns_is_embedding_on(fake_sglang: ModuleType) -> None:
    parsed = embedding.build_parser().parse(["--model-path", "m"])
    assert parsed.engine_args is not None and not parsed.engine_args.is_embedding  # SGLang's
    assert resolve_embedding(parsed) == "null"
    server_args = server_args_from(parsed)
    assert server_args.is_embedding and server_args.disaggregation_mode == "null"
    given = embedding.build_parser().parse(["--model-path", "m", "--is-embedding"])
    assert resolve_embedding(given) == "null" and server_args_from(given).is_embedding
    for mode in ("prefill", "decode"):
        split = embedding.build_parser().parse(["--model-path", "m", "--disaggregation-mode", mode])
        with pytest.raises(ConfigError, match=f"--disaggregation-mode {mode}: an embedding"):
            resolve_embedding(split)


@pytest.mark.parametrize(
    ("module", "role"), [(worker, None), (prefill, "prefill"), (decode, "decode")]
)
def test_generating_roles_refuse_is_embedding(
    fake_sglang: ModuleType, module: ModuleType, role: Any
) -> None:
    parsed = module.build_parser().parse(["--model-path", "m", "--is-embedding"])
    with pytest.raises(ConfigError, match=r"python -m dynamo_sglang\.embedding"):
        resolve_mode(parsed, role)
