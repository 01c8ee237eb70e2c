"""Flags, `--extra-engine-args` (merge, precedence, unknown keys), and the worker without the
engine installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.errors import ConfigError
from dynamo_trtllm.args import TrtllmConfig, build_parser, llm_kwargs
from trtllm_testing import TINY, with_fake_path, without_fake_path

ROLES = ["worker", "prefill", "decode"]


def parse(argv: list[str], env: dict[str, str] | None = None, role: str = "worker") -> Any:
    return build_parser(role).parse(["--model-path", str(TINY), *argv], environ=env or {})  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_module(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_flags_and_defaults() -> None:
    config = parse(["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]).config
    assert isinstance(config, TrtllmConfig)
    assert config.world_size == 4 and config.kv_block_size == 32 and config.backend == "pytorch"
    assert config.resolved_component("prefill") == "prefill"
    assert config.resolved_component("decode") == "backend"
    help_text = build_parser().format_help()
    for flag in (
        "--model-path",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--max-batch-size",
        "--max-num-tokens",
        "--max-seq-len",
        "--kv-cache-free-gpu-memory-fraction",
        "--backend",
        "--extra-engine-args",
        "--served-model-name",
        "--mpi-launcher",
    ):
        assert flag in help_text
    with pytest.raises(ConfigError, match="tensor-parallel-size"):
        parse(["--tensor-parallel-size", "0"])
    with pytest.raises(ConfigError, match="did you mean '--max-batch-size'"):
        parse(["--max-batch-sise", "4"])


def test_flags_only(tmp_path: Path) -> None:
    kwargs, file_keys = llm_kwargs(parse(["--max-batch-size", "16"]))
    assert file_keys == set()
    assert kwargs == {
        "model": str(TINY),
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "backend": "pytorch",
        "max_batch_size": 16,
        "enable_iter_perf_stats": True,
        "kv_cache_config": {"enable_block_reuse": True, "event_buffer_max_size": 1024},
    }
    bare, _ = llm_kwargs(parse(["--no-publish-events-and-metrics"]))
    assert "kv_cache_config" not in bare and "enable_iter_perf_stats" not in bare


def test_extra_engine_args_merge_and_precedence(tmp_path: Path) -> None:
    extra = write(
        tmp_path / "engine.yaml",
        "max_batch_size: 8\n"
        "tensor_parallel_size: 4\n"
        "enable_chunked_prefill: true\n"
        "kv_cache_config: {dtype: fp8, free_gpu_memory_fraction: 0.5, event_buffer_max_size: 0}\n",
    )
    # flags left at their defaults lose to the file; maps merge key by key
    kwargs, file_keys = llm_kwargs(parse(["--extra-engine-args", str(extra)]))
    assert file_keys == {
        "max_batch_size",
        "tensor_parallel_size",
        "enable_chunked_prefill",
        "kv_cache_config",
    }
    assert kwargs["max_batch_size"] == 8 and kwargs["tensor_parallel_size"] == 4
    assert kwargs["enable_chunked_prefill"] is True
    assert kwargs["kv_cache_config"] == {
        "enable_block_reuse": True,
        "event_buffer_max_size": 0,
        "dtype": "fp8",
        "free_gpu_memory_fraction": 0.5,
    }
    # flags given explicitly (command line, environment, --config) win over the file
    parsed = parse(
        [
            "--extra-engine-args",
            str(extra),
            "--kv-cache-free-gpu-memory-fraction",
            "0.8",
            "--tensor-parallel-size",
            "2",
        ],
        env={"DYN_MAX_BATCH_SIZE": "32"},
    )
    kwargs, _ = llm_kwargs(parsed)
    assert kwargs["max_batch_size"] == 32 and kwargs["tensor_parallel_size"] == 2
    assert kwargs["kv_cache_config"]["free_gpu_memory_fraction"] == 0.8
    assert kwargs["kv_cache_config"]["dtype"] == "fp8"
    config_file = write(tmp_path / "flags.yaml", "max-batch-size: 4\n")
    kwargs, _ = llm_kwargs(parse(["--config", str(config_file), "--extra-engine-args", str(extra)]))
    assert kwargs["max_batch_size"] == 4


def test_role_defaults_yield_to_the_file(tmp_path: Path) -> None:
    kwargs, _ = llm_kwargs(parse([], role="prefill"), "prefill")
    assert kwargs["cache_transceiver_config"] == {"backend": "DEFAULT"}
    assert kwargs["disable_overlap_scheduler"] is True
    kwargs, _ = llm_kwargs(parse([], role="decode"), "decode")
    assert kwargs["cache_transceiver_config"] == {"backend": "DEFAULT"}
    assert "disable_overlap_scheduler" not in kwargs
    extra = write(
        tmp_path / "e.yaml",
        "cache_transceiver_config: {backend: UCX}\ndisable_overlap_scheduler: false\n",
    )
    parsed = parse(["--extra-engine-args", str(extra)], role="prefill")
    kwargs, _ = llm_kwargs(parsed, "prefill")
    assert kwargs["cache_transceiver_config"] == {"backend": "UCX"}
    assert kwargs["disable_overlap_scheduler"] is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: [1\n", "invalid YAML"),
        ("- a\n- b\n", "must hold a map"),
    ],
)
def test_bad_extra_engine_args_file(tmp_path: Path, text: str, message: str) -> None:
    extra = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message):
        llm_kwargs(parse(["--extra-engine-args", str(extra)]))
    with pytest.raises(ConfigError, match="cannot read"):
        llm_kwargs(parse(["--extra-engine-args", str(tmp_path / "missing.yaml")]))


async def test_engine_gets_the_merged_arguments(tmp_path: Path, fake_trtllm: Any) -> None:
    from dynamo_trtllm.engine import context_length, kv_block_size, start_llm

    extra = write(
        tmp_path / "e.yaml",
        "enable_chunked_prefill: true\nkv_cache_config: {tokens_per_block: 16}\n",
    )
    parsed = parse(
        ["--extra-engine-args", str(extra), "--max-seq-len", "512", "--kv-block-size", "16"]
    )
    llm = await start_llm(parsed.config, "worker", parsed)
    assert isinstance(llm.args.kv_cache_config, fake_trtllm.KvCacheConfig)
    assert llm.args.kv_cache_config.tokens_per_block == 16
    assert llm.args.kv_cache_config.event_buffer_max_size == 1024
    assert llm.args.enable_chunked_prefill and llm.args.enable_iter_perf_stats
    assert context_length(llm, parsed.config) == 512
    assert kv_block_size(llm, parsed.config) == 16


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_batchsize: 4\n", "'max_batchsize'"),
        ("kv_cache_config: {free_gpu_mem: 0.5}\n", "'kv_cache_config.free_gpu_mem'"),
    ],
)
async def test_unknown_keys_are_named_with_the_file(
    tmp_path: Path, fake_trtllm: Any, text: str, key: str
) -> None:
    from dynamo_trtllm.engine import start_llm

    extra = write(tmp_path / "engine.yaml", text)
    parsed = parse(["--extra-engine-args", str(extra)])
    with pytest.raises(ConfigError) as info:
        await start_llm(parsed.config, "worker", parsed)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"unknown key {key} in {extra}: tensorrt_llm.LLM does not accept it")


def test_worker_exits_on_unknown_key_with_one_line(tmp_path: Path) -> None:
    extra = write(tmp_path / "engine.yaml", "enable_chunked_prefil: true\n")
    done = run_module(
        "dynamo_trtllm.worker",
        "--model-path",
        str(TINY),
        "--extra-engine-args",
        str(extra),
        env=with_fake_path({"DYN_FILE_KV": str(tmp_path / "kv")}),
    )
    assert done.returncode == 78  # a configuration error: dynamo serve does not restart it
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: unknown key 'enable_chunked_prefil' in {extra}: tensorrt_llm.LLM does not "
        "accept it (ValidationError: 1 validation error for TorchLlmArgs)"
    ]


@pytest.mark.parametrize("role", ROLES)
def test_without_the_engine(role: str) -> None:
    module = f"dynamo_trtllm.{role}"
    helped = run_module(module, "--help", env=without_fake_path())
    assert helped.returncode == 0, helped.stderr
    assert "--extra-engine-args" in helped.stdout and "--tensor-parallel-size" in helped.stdout
    ran = run_module(module, "--model-path", str(TINY), env=without_fake_path())
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert ran.stderr.splitlines() == [
        'error: TensorRT-LLM is not installed: pip install "tensorrt-llm>=1.0" '
        "--extra-index-url https://pypi.nvidia.com"
    ]
    bad = run_module(module, "--modle-path", "x", env=without_fake_path())
    assert bad.returncode == 2 and "did you mean '--model-path'" in bad.stderr


def test_importing_never_imports_the_engine() -> None:
    code = (
        "import sys, dynamo_trtllm, dynamo_trtllm.worker, dynamo_trtllm.prefill, "
        "dynamo_trtllm.decode, dynamo_trtllm.handlers, dynamo_trtllm.publisher;"
        "dynamo_trtllm.worker.build_parser().format_help();"
        "assert 'tensorrt_llm' not in sys.modules, 'engine imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **with_fake_path({})},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
