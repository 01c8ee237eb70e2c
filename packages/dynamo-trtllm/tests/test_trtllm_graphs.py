"""The example graphs pass `dynamo serve --dry-run` (when dynamo-serve is installed), and
`dynamo-run out=trtllm` finds this engine through its entry point (when this package is)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_core.testing.procs import card_of_module, registered_card
from trtllm_testing import REPO, TINY, with_fake_path

GRAPHS = REPO / "examples" / "graphs"


def dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_serve", "serve", *args, "--gpus", "0,1", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.skipif(importlib.util.find_spec("dynamo_serve") is None, reason="needs dynamo-serve")
@pytest.mark.parametrize(
    ("graph", "modules"),
    [
        (
            "trtllm.yaml",
            ["dynamo_trtllm.worker --model-path Qwen/Qwen3-8B --tensor-parallel-size 2"],
        ),
        ("trtllm-disagg.yaml", ["dynamo_trtllm.prefill", "dynamo_trtllm.decode"]),
    ],
)
def test_example_graphs_dry_run(graph: str, modules: list[str]) -> None:
    done = dry_run(str(GRAPHS / graph))
    assert done.returncode == 0, done.stderr
    for module in modules:
        assert f"-m {module}" in done.stdout
    bad = dry_run(
        str(GRAPHS / graph),
        "--frontend.http-port",
        "8001",
        *(
            ["--backend.tensor-paralel-size", "2"]
            if graph == "trtllm.yaml"
            else ["--decode.max-batch", "2"]
        ),
    )
    assert bad.returncode == 2 and "did you mean" in bad.stderr


def test_dynamo_run_finds_the_engine(tmp_path: Path) -> None:
    from dynamo_core.engines import available_engines

    if "trtllm" not in available_engines():
        pytest.skip("dynamo-trtllm is not installed (its entry point is not registered)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "hello", "max_tokens": 5}) + "\n")
    out = tmp_path / "out.jsonl"
    flags = ["--model-path", str(TINY), "--max-seq-len", "256", "--kv-block-size", "32",
             "--served-model-name", "tiny-trt"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env.update(with_fake_path({}))
    done = subprocess.run(
        [sys.executable, "-m", "dynamo_core.run", f"in=batch:{prompts}", "out=trtllm",
         "--output", str(out), *flags],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = out.read_text().splitlines()
    result = json.loads(line)
    assert result["tokens_out"] == 5 and result["finish_reason"] == "length", result
    assert result["response"]
    # the role module's own worker(): the card `python -m dynamo_trtllm.worker` registers
    card = registered_card(done.stderr)
    assert card == (
        "model tiny-trt registered on dynamo.backend.generate: context length 256, KV block size 32"
    )
    assert card_of_module("dynamo_trtllm.worker", flags, env) == card
