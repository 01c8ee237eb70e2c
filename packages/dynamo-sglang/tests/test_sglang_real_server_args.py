"""Our merged parser against the real `sglang.srt.server_args.ServerArgs` (opt-in: the
`sglang_args` nox session installs the real `sglang` wheel without its CUDA stack and sets
DYNAMO_SGLANG_REAL=1): every SGLang flag is accepted with the value SGLang's own parser gives
it, every default is SGLang's, and `ServerArgs.from_cli_args` builds the same `ServerArgs`."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_sglang import decode, embedding, worker
from dynamo_sglang.args import resolve_embedding, server_args_from

pytestmark = pytest.mark.skipif(
    not os.environ.get("DYNAMO_SGLANG_REAL"),
    reason="needs the real sglang package: nox -s sglang_args",
)

#: SGLang flags that Dynamo's parser keeps for itself (`--config` takes a Dynamo config file).
RESERVED = {"--config", "-h", "--help"}
CANDIDATES = ["1", "2", "0.5", "{}", "x", "auto"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def reference() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    return parser


def ref_parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    with quiet():
        try:
            return parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit, ValueError, TypeError):
            return None


def flag_samples(action: argparse.Action) -> list[list[str]]:
    """Token lists that exercise one flag (values the reference parser accepts)."""
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if action.nargs == 0:
        return [[flag]]
    values = [str(c) for c in action.choices] if action.choices else CANDIDATES
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [[flag, *([v] * count)] for v in values]


def test_every_sglang_flag_is_accepted_with_sglang_values() -> None:
    ref = reference()
    ours = worker.build_parser()
    our_flags = set(ours._build().parser._option_string_actions)
    ref_flags = {o for a in ref._actions for o in a.option_strings}
    assert ref_flags - RESERVED <= our_flags, sorted(ref_flags - RESERVED - our_flags)
    checked = 0
    for action in ref._actions:
        if not action.option_strings or set(action.option_strings) <= RESERVED:
            continue
        for opt in action.option_strings:  # every spelling, with the first accepted value
            if opt in RESERVED:
                continue
            for tokens in flag_samples(action):
                tokens = [opt, *tokens[1:]]
                expected = ref_parse(ref, ["--model-path", "m", *tokens])
                if expected is None:
                    continue
                with quiet():
                    got = ours.parse(["--model-path", "m", *tokens], environ={})
                assert got.engine_args is not None
                assert getattr(got.engine_args, action.dest) == getattr(expected, action.dest), (
                    tokens
                )
                checked += 1
                break
    assert checked > 300, checked  # SGLang 0.5.23 has ~530 flag spellings


def test_defaults_are_sglang_defaults() -> None:
    expected = ref_parse(reference(), ["--model-path", "m"])
    assert expected is not None
    got = worker.build_parser().parse(["--model-path", "m"], environ={})
    assert got.engine_args is not None
    ours = vars(got.engine_args)
    for dest, value in vars(expected).items():
        if dest == "config":
            continue
        assert dest in ours, dest
        assert ours[dest] == value, dest


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    assert repr(a) == repr(b)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--page-size", "16", "--tp-size", "2", "--mem-fraction-static", "0.8"],
        [
            "--disaggregation-mode",
            "decode",
            "--disaggregation-bootstrap-port",
            "9000",
            "--kv-events-config",
            '{"publisher": "zmq", "topic": "kv"}',
            "--skip-tokenizer-init",
            "--context-length",
            "4096",
        ],
    ],
)
def test_from_cli_args_round_trips(argv: list[str]) -> None:
    from sglang.srt.server_args import ServerArgs

    expected = ref_parse(reference(), ["--model-path", "m", *argv])
    assert expected is not None
    got = worker.build_parser().parse(["--model-path", "m", *argv], environ={})
    with quiet():
        _same(server_args_from(got), ServerArgs.from_cli_args(expected))


def test_graph_file_means_the_same_as_flags(tmp_path: Path) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        "namespace: ns\ncomponents:\n  decode:\n    module: dynamo_sglang.decode\n    args:\n"
        "      model-path: m\n      page-size: 16\n      tp-size: 2\n"
        "      skip-tokenizer-init: true\n"
    )
    from_file = decode.build_parser().parse(
        ["--config", str(graph), "--component", "decode"], environ={}
    )
    from_flags = decode.build_parser().parse(
        ["--model-path", "m", "--page-size", "16", "--tp-size", "2", "--skip-tokenizer-init"],
        environ={},
    )
    with quiet():
        _same(server_args_from(from_file), server_args_from(from_flags))


def test_help_lists_sglang_flags() -> None:
    text = worker.build_parser().format_help()
    assert "--disaggregation-bootstrap-port" in text and "--migration-limit" in text


def test_the_embedding_role_is_sglangs_is_embedding() -> None:
    from sglang.srt.server_args import ServerArgs

    parsed = embedding.build_parser().parse(["--model-path", "m"], environ={})
    resolve_embedding(parsed)
    expected = ref_parse(reference(), ["--model-path", "m", "--is-embedding"])
    assert expected is not None
    with quiet():
        built = server_args_from(parsed)
        _same(built, ServerArgs.from_cli_args(expected))
    assert built.is_embedding is True
