"""The shared argument parser: one declaration, four sources, an engine parser merged in."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import Field, SecretStr

from dynamo_core.args import (
    RUNTIME_ENV_ALLOWLIST,
    DynFlexibleArgumentParser,
    ParsedArgs,
    ParserFlags,
    parse_component_args,
)
from dynamo_core.errors import ConfigError
from dynamo_core.llm.parsers import ParserSpec
from dynamo_core.runtime.config import RuntimeConfig


class DemoConfig(RuntimeConfig):
    model_path: str | None = Field(default=None, description="Path or name of the model.")
    http_port: int = Field(default=8000, ge=0, description="Port of the HTTP server.")
    router_mode: Literal["round-robin", "random", "kv"] = Field(
        default="round-robin", description="How requests are spread over workers."
    )
    enable_kv_events: bool = Field(default=True, description="Publish KV cache events.")
    stop_tokens: list[int] = Field(default_factory=list, description="Extra stop token ids.")
    sampling_defaults: dict[str, Any] = Field(
        default_factory=dict, description="Default sampling parameters (JSON)."
    )


def fake_engine(parser: argparse.ArgumentParser) -> None:
    """Adds flags the way sglang's `ServerArgs.add_cli_args` does."""
    parser.add_argument("--model-path", "--model", required=True, help="The engine's model path.")
    parser.add_argument("--tp-size", type=int, default=1, help="Tensor parallelism (%(default)s).")
    group = parser.add_argument_group("Scheduling")
    group.add_argument("--schedule-policy", choices=["fcfs", "lpm"], default="fcfs")
    group.add_argument("--enable-mixed-chunk", action="store_true", help="Mix prefill and decode.")


def missing_engine(parser: argparse.ArgumentParser) -> None:
    import dynamo_test_engine_that_is_not_installed  # type: ignore[import-not-found]  # noqa: F401


def make_parser(**kwargs: Any) -> DynFlexibleArgumentParser[DemoConfig]:
    return DynFlexibleArgumentParser(DemoConfig, prog="demo", description="A demo.", **kwargs)


def parse(argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> ParsedArgs[DemoConfig]:
    return make_parser(**kw).parse(argv, environ=env or {})


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- the same flags through every source ------------------------------------------------------

EXPECTED = {
    "namespace": "demo",
    "discovery_backend": "mem",
    "http_port": 9000,
    "router_mode": "kv",
    "enable_kv_events": False,
    "stop_tokens": [1, 2],
    "sampling_defaults": {"temperature": 0.5},
}


def _picked(parsed: ParsedArgs[DemoConfig]) -> dict[str, Any]:
    return {k: getattr(parsed.config, k) for k in EXPECTED}


def test_same_flags_give_the_same_config_through_cli_env_file_and_graph(tmp_path: Path) -> None:
    cli = parse(
        [
            "--namespace", "demo", "--discovery-backend", "mem", "--http-port", "9000",
            "--router-mode", "kv", "--no-enable-kv-events", "--stop-tokens", "1,2",
            "--sampling-defaults", '{"temperature": 0.5}',
        ]
    )  # fmt: skip
    env = parse(
        [],
        {
            "DYN_NAMESPACE": "demo",
            "DYN_DISCOVERY_BACKEND": "mem",
            "DYN_HTTP_PORT": "9000",
            "DYN_ROUTER_MODE": "kv",
            "DYN_ENABLE_KV_EVENTS": "false",
            "DYN_STOP_TOKENS": "1,2",
            "DYN_SAMPLING_DEFAULTS": '{"temperature": 0.5}',
        },
    )
    flat = write(
        tmp_path,
        "config.yaml",
        "namespace: demo\ndiscovery-backend: mem\nhttp_port: 9000\nrouter-mode: kv\n"
        "enable-kv-events: false\nstop-tokens: [1, 2]\nsampling-defaults: {temperature: 0.5}\n",
    )
    graph = write(
        tmp_path,
        "graph.yaml",
        "namespace: demo\ncomponents:\n"
        "  frontend:\n    module: dynamo_core.frontend\n    args: {http-port: 1}\n"
        "  backend:\n    module: demo\n    args:\n      discovery-backend: mem\n"
        "      http-port: 9000\n      router-mode: kv\n      enable-kv-events: false\n"
        "      stop-tokens: [1, 2]\n      sampling-defaults: {temperature: 0.5}\n",
    )
    from_file = parse(["--config", flat])
    from_graph = parse(["--config", graph, "--component", "backend"])

    for parsed in (cli, env, from_file, from_graph):
        assert _picked(parsed) == EXPECTED
    assert cli.sources["http_port"] == "cli"
    assert env.sources["http_port"] == "env"
    assert from_file.sources["http_port"] == "file"
    # a graph's namespace is DYN_NAMESPACE for its components, as dynamo serve sets it
    assert from_graph.sources["namespace"] == "env"
    assert from_graph.origins["namespace"] == f"env DYN_NAMESPACE (from {graph})"
    assert from_graph.env_overlay == {"DYN_NAMESPACE": "demo"}
    assert from_graph.sources["http_port"] == "file"
    assert from_graph.component == "backend"
    assert cli.sources["model_path"] == "default"


def test_underscored_flags_are_accepted() -> None:
    parsed = parse(["--http_port", "81", "--router_mode=random", "--no_enable_kv_events"])
    assert (parsed.config.http_port, parsed.config.router_mode) == (81, "random")
    assert parsed.config.enable_kv_events is False


def test_lists_take_nargs_commas_json_and_yaml(tmp_path: Path) -> None:
    assert parse(["--stop-tokens", "1,2", "3"]).config.stop_tokens == [1, 2, 3]
    assert parse([], {"DYN_STOP_TOKENS": "[4, 5]"}).config.stop_tokens == [4, 5]
    path = write(tmp_path, "c.yaml", "stop-tokens:\n  - 6\n  - 7\n")
    assert parse(["--config", path]).config.stop_tokens == [6, 7]


def test_bool_flag_has_a_negative_form_and_reads_env_words() -> None:
    assert parse(["--no-enable-kv-events"]).config.enable_kv_events is False
    assert parse(["--enable-kv-events"], {"DYN_ENABLE_KV_EVENTS": "0"}).config.enable_kv_events
    assert parse([], {"DYN_ENABLE_KV_EVENTS": "off"}).config.enable_kv_events is False


def test_env_var_override_names_are_used() -> None:
    parsed = parse([], {"ETCD_ENDPOINTS": "http://etcd:2379"})
    assert parsed.config.etcd_endpoints == "http://etcd:2379"
    assert parsed.sources["etcd_endpoints"] == "env"


# -- precedence: defaults < file < env < CLI --------------------------------------------------


def test_file_beats_default(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "http-port: 7000\n")
    parsed = parse(["--config", path])
    assert parsed.config.http_port == 7000
    assert parsed.sources["http_port"] == "file"


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "http-port: 7000\n")
    parsed = parse(["--config", path], {"DYN_HTTP_PORT": "7100"})
    assert parsed.config.http_port == 7100
    assert parsed.sources["http_port"] == "env"


def test_cli_beats_env() -> None:
    parsed = parse(["--http-port", "7200"], {"DYN_HTTP_PORT": "7100"})
    assert parsed.config.http_port == 7200
    assert parsed.sources["http_port"] == "cli"


def test_each_field_keeps_its_own_source(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "http-port: 7000\nrouter-mode: kv\nnamespace: a\n")
    parsed = parse(
        ["--config", path, "--namespace", "b"], {"DYN_ROUTER_MODE": "random", "DYN_NAMESPACE": "c"}
    )
    assert (parsed.config.http_port, parsed.config.router_mode, parsed.config.namespace) == (
        7000,
        "random",
        "b",
    )
    assert parsed.sources["http_port"] == "file"
    assert parsed.sources["router_mode"] == "env"
    assert parsed.sources["namespace"] == "cli"
    assert parsed.sources["event_plane"] == "default"


def test_graph_namespace_applies_below_the_component_args(tmp_path: Path) -> None:
    graph = (
        "namespace: top\ncomponents:\n  a: {module: x}\n  b: {module: x, args: {namespace: own}}\n"
    )
    path = write(tmp_path, "g.yaml", graph)
    assert parse(["--config", path, "--component", "a"]).config.namespace == "top"
    assert parse(["--config", path, "--component", "b"]).config.namespace == "own"


# -- errors: key, source and the closest valid name --------------------------------------------


def test_misspelt_key_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "modle-path: /m\n")
    errors = make_parser().check(["--config", path], environ={})
    assert errors == [f"unknown key 'modle-path' in {path} (did you mean 'model-path'?)"]


def test_misspelt_key_in_a_graph_section(tmp_path: Path) -> None:
    path = write(
        tmp_path, "g.yaml", "components:\n  backend:\n    module: m\n    args: {htp-port: 1}\n"
    )
    [error] = make_parser().check(["--config", path, "--component", "backend"], environ={})
    assert "unknown key 'htp-port'" in error
    assert f"in {path} (components.backend.args)" in error
    assert "did you mean 'http-port'?" in error
    # a graph dynamo serve would refuse is refused here too, with serve's message
    bad = write(tmp_path, "bad.yaml", "components:\n  backend:\n    args: {http-port: 1}\n")
    [error] = make_parser().check(["--config", bad, "--component", "backend"], environ={})
    assert error == f"{bad}: components.backend.module: Field required"


def test_misspelt_env_var() -> None:
    errors = make_parser().check([], environ={"DYN_HTTP_PROT": "1"})
    assert errors == [
        "unknown environment variable 'DYN_HTTP_PROT' (did you mean 'DYN_HTTP_PORT', "
        "i.e. '--http-port'?)"
    ]


def test_unrelated_and_runtime_only_env_vars_are_ignored() -> None:
    assert "DYN_LOG" in RUNTIME_ENV_ALLOWLIST
    env = {"DYN_LOG": "debug", "DYN_SOME_OTHER_COMPONENT_SETTING": "1", "HOME": "/root"}
    assert make_parser().check([], environ=env) == []
    # a parser can extend the allowlist for variables it knows are someone else's
    near_miss = {"DYN_HTTP_PORTS": "1"}
    assert make_parser().check([], environ=near_miss)
    assert make_parser(env_allowlist=["DYN_HTTP_PORTS"]).check([], environ=near_miss) == []


def test_misspelt_flag_on_the_command_line() -> None:
    errors = make_parser().check(["--htp-port", "1"], environ={})
    assert errors == ["unknown flag '--htp-port' on command line (did you mean '--http-port'?)"]


def test_wrong_type_names_the_winning_source(tmp_path: Path) -> None:
    [error] = make_parser().check([], environ={"DYN_HTTP_PORT": "abc"})
    assert error.startswith("invalid value 'abc' for 'http-port' in env DYN_HTTP_PORT: ")
    path = write(tmp_path, "c.yaml", "http-port: [1]\n")
    [error] = make_parser().check(["--config", path], environ={})
    assert f"for 'http-port' in {path}" in error
    [error] = make_parser().check(["--http-port", "-5"], environ={})
    assert "for 'http-port' on command line" in error


def test_choices_are_rejected_with_the_valid_list() -> None:
    errors = make_parser().check(["--router-mode", "fastest"], environ={})
    assert errors == [
        "invalid value 'fastest' for 'router-mode' on command line: "
        "choose from 'round-robin', 'random', 'kv'"
    ]
    [error] = make_parser().check([], environ={"DYN_DISCOVERY_BACKEND": "zk"})
    assert "in env DYN_DISCOVERY_BACKEND" in error
    assert "'file', 'etcd', 'mem'" in error


def test_main_exits_2_with_one_line_and_library_raises(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_component_args(DemoConfig, ["--htp-port", "1"], prog="demo")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == "demo: error: unknown flag '--htp-port' on command line (did you mean '--http-port'?)\n"
    )

    with pytest.raises(ConfigError, match="did you mean '--http-port'"):
        parse(["--htp-port", "1"])


def test_check_returns_errors_without_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser()
    assert parser.check(["--http-port", "1"], environ={}) == []
    assert len(parser.check(["--bogus", "--router-mode", "x"], environ={})) == 2
    assert parser.check(["--help"], environ={}) == []
    assert capsys.readouterr() == ("", "")


def test_graph_file_needs_a_known_component(tmp_path: Path) -> None:
    path = write(
        tmp_path, "g.yaml", "components:\n  backend: {module: x}\n  frontend: {module: y}\n"
    )
    [error] = make_parser().check(["--config", path], environ={})
    assert "--component" in error and "backend, frontend" in error
    [error] = make_parser().check(["--config", path, "--component", "bakend"], environ={})
    assert error == f"no component 'bakend' in {path} (did you mean 'backend'?)"


def test_bad_config_files(tmp_path: Path) -> None:
    [error] = make_parser().check(["--config", str(tmp_path / "nope.yaml")], environ={})
    assert error.startswith("cannot read config file")
    path = write(tmp_path, "bad.yaml", "a: [1\n")
    [error] = make_parser().check(["--config", path], environ={})
    assert error.startswith(f"invalid YAML in {path}")
    path = write(tmp_path, "list.yaml", "- 1\n")
    assert make_parser().check(["--config", path], environ={})
    path = write(tmp_path, "cfg.yaml", "config: other.yaml\n")
    [error] = make_parser().check(["--config", path], environ={})
    assert "only valid on the command line" in error


# -- --help and --print-config ----------------------------------------------------------------


def test_help_lists_dynamo_and_engine_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser(engine_args=fake_engine, engine_name="fake")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse(["--help"], environ={})
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == parser.format_help()
    out = " ".join(out.split())  # the help is wrapped to the terminal's width
    for expected in (
        "A demo.",
        "Runtime:",
        "--discovery-backend {file,etcd,mem}",
        "demo:",
        "--http-port HTTP_PORT",
        "Port of the HTTP server.",
        "default: 8000",
        "env DYN_HTTP_PORT",
        "--enable-kv-events, --no-enable-kv-events",
        "fake engine arguments:",
        "--model-path MODEL_PATH, --model MODEL_PATH",
        "Tensor parallelism (1)",
        "fake engine: Scheduling:",
        "--schedule-policy {fcfs,lpm}",
        "--print-config",
    ):
        assert expected in out, expected
    # the engine owns --model-path: listed once, in its group
    assert out.count("--model-path") == 1


def test_help_works_when_other_args_are_wrong() -> None:
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse(["--bogus", "-h"], environ={})
    assert exit_info.value.code == 0


def test_print_config_shows_values_and_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "c.yaml", "http-port: 7000\n")
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse(
            ["--config", path, "--router-mode", "kv", "--print-config"],
            environ={"DYN_NAMESPACE": "prod", "DYN_AUTH_TOKEN": "s3cret"},
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split(":")[0]: line for line in out}
    # a source too long for 100 columns goes on the line above its value
    assert out[out.index("http-port: 7000") - 1] == f"# http-port: file {path}"
    assert lines["router-mode"].endswith("# cli")
    assert lines["namespace"].endswith("# env DYN_NAMESPACE")
    assert '"prod"' in lines["namespace"]
    assert lines["event-plane"].endswith("# default")
    assert "s3cret" not in lines["auth-token"]
    assert "***" in lines["auth-token"]


def test_print_config_shows_engine_flags_that_differ_and_all_on_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = make_parser(engine_args=fake_engine, engine_name="fake")

    def printed(*flags: str) -> list[str]:
        with pytest.raises(SystemExit):
            parser.parse(["--model", "/m", "--tp-size", "1", "--schedule-policy", "lpm", *flags])
        out = capsys.readouterr().out
        assert yaml.safe_load(out)  # still a config file
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 100
        return lines

    lines = printed("--print-config")
    tail = lines[lines.index("# fake engine: Scheduling") :]
    assert [ln.split("#")[0].strip() for ln in tail[1:-1]] == ['schedule-policy: "lpm"']
    assert tail[-1] == (
        "# fake engine: every other flag at fake's defaults (2 not shown; "
        "--print-config=all lists them)"
    )  # tp-size 1 is its default, whatever its source; model-path is Dynamo's model-path above
    assert lines.index("# fake engine: Scheduling") > max(
        i for i, ln in enumerate(lines) if ln.startswith("namespace:")
    )  # Dynamo's flags first
    every = printed("--print-config=all")
    assert any(ln.startswith("tp-size: 1 ") and ln.endswith("# cli") for ln in every)
    assert any(ln.startswith("enable-mixed-chunk: false") for ln in every)


def test_print_config_folds_long_values_under_100_columns() -> None:
    from dynamo_core.args import _format_rows

    lines = _format_rows(
        [("short", 1, "default"), ("big-map", {f"key{i}": "v" * 8 for i in range(12)}, "cli")]
    )
    assert lines[0] == "short: 1  # default"
    assert lines[1] == "# big-map: cli" and lines[2] == "big-map: {"
    assert max(len(ln) for ln in lines) <= 100
    assert yaml.safe_load("\n".join(lines))["big-map"]["key11"] == "v" * 8


def test_secret_field_is_a_secret() -> None:
    parsed = parse([], {"DYN_AUTH_TOKEN": "s3cret"})
    assert isinstance(parsed.config.auth_token, SecretStr)
    assert parsed.config.auth_token.get_secret_value() == "s3cret"


# -- the engine parser --------------------------------------------------------------------------


def test_engine_owns_shared_flags_and_fills_the_dynamo_field() -> None:
    parsed = parse(["--model", "/m", "--tp-size", "2"], engine_args=fake_engine, engine_name="fake")
    assert isinstance(parsed.engine_args, argparse.Namespace)
    assert parsed.engine_args.model_path == "/m"
    assert parsed.engine_args.tp_size == 2
    assert parsed.engine_args.schedule_policy == "fcfs"
    assert parsed.engine_args.enable_mixed_chunk is False
    assert parsed.config.model_path == "/m"
    assert parsed.sources["model_path"] == "cli"
    assert parsed.engine_sources == {
        "model_path": "cli",
        "tp_size": "cli",
        "schedule_policy": "default",
        "enable_mixed_chunk": "default",
    }
    assert parsed.passthrough == []


def test_engine_flags_in_files_and_shared_env(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "tp_size: 4\nenable-mixed-chunk: true\nschedule-policy: lpm\n")
    parsed = parse(
        ["--config", path], {"DYN_MODEL_PATH": "/env"}, engine_args=fake_engine, engine_name="fake"
    )
    assert parsed.engine_args is not None
    assert (parsed.engine_args.tp_size, parsed.engine_args.enable_mixed_chunk) == (4, True)
    assert parsed.engine_args.schedule_policy == "lpm"
    assert parsed.engine_args.model_path == parsed.config.model_path == "/env"
    assert parsed.sources["model_path"] == "env"
    assert parsed.engine_sources["tp_size"] == "file"
    # CLI beats the file for engine flags too
    parsed = parse(
        ["--config", path, "--tp-size", "8", "--model-path", "/cli"],
        {"DYN_MODEL_PATH": "/env"},
        engine_args=fake_engine,
    )
    assert parsed.engine_args is not None
    assert (parsed.engine_args.tp_size, parsed.config.model_path) == (8, "/cli")


def test_engine_errors_name_the_flag_and_source(tmp_path: Path) -> None:
    parser = make_parser(engine_args=fake_engine, engine_name="fake")
    [error] = parser.check([], environ={})
    assert error.startswith("missing required flag '--model-path'")
    [error] = parser.check(["--model", "m", "--tp-size", "x"], environ={})
    assert "--tp-size" in error and "invalid int value: 'x'" in error and "command line" in error
    path = write(tmp_path, "c.yaml", "model-path: m\nschedule-policy: random\n")
    [error] = parser.check(["--config", path], environ={})
    assert "schedule-policy" in error and path in error and "'fcfs', 'lpm'" in error
    [error] = parser.check(["--model", "m", "--tp-sise", "2"], environ={})
    assert error == "unknown flag '--tp-sise' on command line (did you mean '--tp-size'?)"


def test_engine_parser_is_built_lazily() -> None:
    calls: list[argparse.ArgumentParser] = []
    parser = make_parser(engine_args=calls.append, engine_name="fake")
    assert calls == []
    parser.format_help()
    assert len(calls) == 1


def test_missing_engine_keeps_help_and_passes_unknown_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = make_parser(
        engine_args=missing_engine, engine_name="fake", engine_extra="dynamo-fake[fake]"
    )
    help_text = " ".join(parser.format_help().split())
    assert "--http-port" in help_text
    assert "pip install 'dynamo-fake[fake]'" in help_text

    path = write(tmp_path, "c.yaml", "tp-size: 2\n")
    parsed = parser.parse(
        ["--config", path, "--model-path", "/m", "--tp-size", "4", "--trust-remote-code"],
        environ={},
    )
    assert parsed.engine_args is None
    assert parsed.config.model_path == "/m"
    assert parsed.passthrough == ["--tp-size=2", "--tp-size", "4", "--trust-remote-code"]

    default_extra = " ".join(
        make_parser(engine_args=missing_engine, engine_name="sglang").format_help().split()
    )
    assert "pip install 'dynamo-sglang[sglang]'" in default_extra


def test_without_an_engine_unknown_flags_are_errors() -> None:
    assert make_parser().check(["--tp-size", "2"], environ={}) == [
        "unknown flag '--tp-size' on command line"
    ]
    assert make_parser().check(["stray"], environ={}) == [
        "unexpected argument 'stray' on command line"
    ]


def test_reserved_field_names_are_rejected() -> None:
    class Bad(RuntimeConfig):
        config: str = Field(default="x", description="clashes")

    with pytest.raises(ConfigError, match="--config"):
        DynFlexibleArgumentParser(Bad)


class WorkerDemo(RuntimeConfig, ParserFlags):
    model_path: str | None = Field(default=None, description="Path or name of the model.")


def test_parser_flags_are_declared_once_checked_and_canonical() -> None:
    parser = DynFlexibleArgumentParser(WorkerDemo, prog="worker")
    config = parser.parse(
        ["--dyn-tool-call-parser", "qwen25"], environ={"DYN_REASONING_PARSER": "Deepseek-R1"}
    ).config
    assert config.parser_spec() == ParserSpec("hermes", "deepseek_r1")
    assert parser.parse([], environ={}).config.parser_spec() == ParserSpec()
    [error] = parser.check(["--dyn-tool-call-parser", "hermse"], environ={})
    assert "unknown tool-call parser 'hermse' (did you mean 'hermes'?)" in error
    [error] = parser.check(
        ["--dyn-tool-call-parser", "hermes", "--dyn-reasoning-parser", "gpt_oss"], environ={}
    )
    assert "do not fit together" in error
    # 'none' is kept as written: on the frontend it turns a card's parser off
    none = parser.parse(["--dyn-tool-call-parser", "none"], environ={}).config
    assert none.dyn_tool_call_parser == "none" and none.parser_spec() == ParserSpec()


def test_every_worker_config_has_the_parser_flags() -> None:
    from dynamo_core.frontend.main import FrontendConfig
    from dynamo_core.mocker.main import MockerConfig

    for config in (MockerConfig, FrontendConfig):
        assert issubclass(config, ParserFlags)
