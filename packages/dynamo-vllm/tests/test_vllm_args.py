"""Dynamo's flags and vLLM's in one parser (against the fake `vllm`'s `AsyncEngineArgs`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, TINY
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
    assert (args.max_model_len, args.block_size, args.enforce_eager) == (2048, 32, True)
    assert parsed.config.model == args.model == "examples/models/tiny"


def test_yaml_and_cli_mean_the_same(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("model: /m\nmax-model-len: 128\nenforce-eager: true\nkv-events: false\n")
    from_file = worker.build_parser().parse(["--config", str(file)])
    from_cli = worker.build_parser().parse(
        ["--model", "/m", "--max-model-len", "128", "--enforce-eager", "--no-kv-events"]
    )
    assert from_file.config == from_cli.config
    assert vars(from_file.engine_args) == vars(from_cli.engine_args)


def test_preflight_checks_max_model_len_against_the_models_config() -> None:
    parser = worker.build_parser()
    assert parser.check(["--model", str(TINY), "--max-model-len", "4096"]) == [
        "--max-model-len 4096 is more than the model allows: 2048 (max_position_embeddings "
        f"in {TINY / 'config.json'}); use --max-model-len 2048 or less"
    ]
    assert parser.check(["--model", str(TINY), "--max-model-len", "2048"]) == []
    assert parser.check(["--model", str(TINY)]) == []
    with pytest.raises(ConfigError, match="--max-model-len 4096 is more than"):
        parser.parse(["--model", str(TINY), "--max-model-len", "4096"])


def test_preflight_refuses_a_hub_name_that_is_not_cached_while_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = worker.build_parser()
    assert parser.check(["--model", "nobody/no-such-model"]) == []  # online: vLLM will see
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (error,) = parser.check(["--model", "nobody/no-such-model"])
    assert error.startswith("--model nobody/no-such-model: no such folder, and not in the")


def test_a_start_failure_is_its_root_cause_in_one_line() -> None:
    import pydantic

    from dynamo_core.errors import EngineError
    from dynamo_vllm.engine import start_error

    class ModelConfig(pydantic.BaseModel):
        max_model_len: int

        @pydantic.model_validator(mode="after")
        def fits(self) -> ModelConfig:  # vLLM's own words (0.32)
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the "
                "derived max_model_len (max_position_embeddings=2048.0 or model_max_length=None "
                "in model's config.json). To allow overriding this maximum, set the env var "
                "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )

    def failure(**values: object) -> BaseException:
        try:
            ModelConfig.model_validate(values)
        except pydantic.ValidationError as exc:
            return exc
        raise AssertionError("no error")

    error = start_error(failure(max_model_len=4096), "/m")
    assert isinstance(error, ConfigError)  # exit status 78: dynamo serve does not restart it
    assert str(error) == (
        "vLLM cannot start: ModelConfig: User-specified max_model_len (4096) is greater than "
        "the derived max_model_len (max_position_embeddings=2048.0 or model_max_length=None in "
        "model's config.json)"
    )
    error = start_error(failure(max_model_len="x"), "/m")
    assert str(error).startswith("vLLM cannot start: ModelConfig: max_model_len: Input should")

    class LocalEntryNotFoundError(Exception):  # huggingface_hub's, by name
        pass

    try:
        try:
            raise LocalEntryNotFoundError("not in the cache")
        except LocalEntryNotFoundError as exc:
            raise OSError("We couldn't connect to 'https://huggingface.co'") from exc
    except OSError as exc:
        error = start_error(exc, "Qwen/Qwen3-0.6B")
    assert isinstance(error, ConfigError) and "--model Qwen/Qwen3-0.6B is not a folder" in str(
        error
    )

    error = start_error(RuntimeError("simulated OOM\nstack"), "/m")
    assert type(error) is EngineError and str(error) == (
        "vLLM failed to start: RuntimeError: simulated OOM"
    )


def test_worker_with_a_bad_max_model_len_is_one_line(fake_env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_vllm.worker",
            "--model",
            str(TINY),
            "--max-model-len",
            "4096",
        ],
        env={**os.environ, **fake_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m dynamo_vllm.worker: error: --max-model-len 4096 is more than the model "
        f"allows: 2048 (max_position_embeddings in {TINY / 'config.json'}); use "
        "--max-model-len 2048 or less"
    ]
