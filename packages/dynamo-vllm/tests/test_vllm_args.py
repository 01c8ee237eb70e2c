"""Dynamo's flags and vLLM's in one parser (against the fake `vllm`'s `AsyncEngineArgs`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from dynamo_core.errors import ConfigError
from dynamo_vllm import worker
from dynamo_vllm.args import engine_args

pytestmark = pytest.mark.usefixtures("fake_vllm")


def test_help_lists_dynamo_and_vllm_flags() -> None:
    text = worker.build_parser().format_help()
    for flag in ("--namespace", "--migration-limit", "--kv-events-port", "--component-name",
                 "--model", "--max-model-len", "--enforce-eager", "--kv-transfer-config",
                 "--block-size", "--tensor-parallel-size"):  # fmt: skip
        assert flag in text, flag
    assert "ModelConfig" in text and "CacheConfig" in text  # vLLM's groups, kept


def test_typed_config_and_vllm_engine_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    parsed = worker.build_parser().parse(
        ["--model", "/models/x", "--max-model-len", "256", "--enforce-eager",
         "--block-size", "32", "--migration-limit", "2", "--kv-transfer-config",
         '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}', "--disable-log-requests"],
        environ={"DYN_NAMESPACE": "ns1"},
    )  # fmt: skip
    config = parsed.config
    assert (config.model, config.migration_limit, config.namespace) == ("/models/x", 2, "ns1")
    args = engine_args(parsed)
    assert isinstance(args, AsyncEngineArgs)
    assert (args.model, args.max_model_len, args.enforce_eager, args.block_size) == (
        "/models/x",
        256,
        True,
        32,
    )
    assert args.kv_transfer_config.kv_connector == "NixlConnector"
    assert args.tensor_parallel_size == 1  # vLLM's own default


def test_model_defaults_to_vllms_default() -> None:
    parsed = worker.build_parser().parse([])
    assert parsed.config.model == "Qwen/Qwen3-0.6B"


def test_errors_name_the_flag_with_a_suggestion() -> None:
    parser = worker.build_parser()
    assert parser.check(["--max-model-length", "4"]) == [
        "unknown flag '--max-model-length' on command line (did you mean '--max-model-len'?)"
    ]
    with pytest.raises(ConfigError, match="--dtype"):
        parser.parse(["--dtype", "float8"])


def test_graph_file_args_are_vllm_flags(tmp_path: Path) -> None:
    parsed = worker.build_parser().parse(
        ["--config", str(REPO / "examples/graphs/vllm-cpu.yaml"), "--component", "backend"]
    )
    args = engine_args(parsed)
    assert parsed.config.namespace == "vllm-cpu"
    assert (args.dtype, args.enforce_eager) == ("bfloat16", True)
    assert parsed.config.model == args.model


def test_yaml_and_cli_mean_the_same(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("model: /m\nmax-model-len: 128\nenforce-eager: true\nkv-events: false\n")
    from_file = worker.build_parser().parse(["--config", str(file)])
    from_cli = worker.build_parser().parse(
        ["--model", "/m", "--max-model-len", "128", "--enforce-eager", "--no-kv-events"]
    )
    assert from_file.config == from_cli.config
    assert vars(from_file.engine_args) == vars(from_cli.engine_args)
