from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import uvloop
from hypothesis import HealthCheck, settings

from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig
from dynamo_core.testing.servers import EtcdServer, NatsServer, require_binary

HERE = Path(__file__).parent

# Fuzzing (the HTTP edge, request-plane frames) is part of CI: the same examples on every run
# (derandomized, no example database), bounded in count, no per-example deadline (a loaded CI
# machine is slow, not wrong).
settings.register_profile(
    "dynamo",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("dynamo")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    """Every async test runs on uvloop, as the components do."""
    return {"uvloop": uvloop.new_event_loop}


#: Word pieces of `sentencepiece` (after <unk>, <s>, </s> and the 256 byte pieces <0x00>..).
SENTENCEPIECE_WORDS = ["▁", "▁Hello", "▁world", "a", "▁a", "b", "中", "▁中", "é", "ok", "▁▁x"]


@pytest.fixture(scope="session")
def sentencepiece() -> Tokenizer:
    """A Llama-2 / Mistral-shaped tokenizer: "▁" marks a space, a byte the vocabulary lacks is
    "<0xE4>" (byte fallback), the decoder drops the first leading space of a sequence."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {p: 259 + i for i, p in enumerate(SENTENCEPIECE_WORDS)}
    spec = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                          "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }  # fmt: skip
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def kv_dir(tmp_path: Path) -> Path:
    d = tmp_path / "kv"
    d.mkdir()
    return d


@pytest.fixture
def proc_env(kv_dir: Path) -> dict[str, str]:
    """Environment for child processes: file discovery in this test's own folder."""
    return {"DYN_FILE_KV": str(kv_dir), "DYN_DISCOVERY_BACKEND": "file", "DYN_REQUEST_PLANE": "tcp"}


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    require_binary("etcd")
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    require_binary("nats-server")
    with NatsServer() as server:
        yield server


@pytest.fixture(params=["mem+inproc", "file+tcp", "etcd+tcp", "etcd+nats"])
def runtime_config(request: pytest.FixtureRequest, kv_dir: Path, namespace: str) -> RuntimeConfig:
    """The same behaviour tests run on every combination of backends."""
    if request.param == "mem+inproc":
        return RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=2)
    if request.param == "file+tcp":
        return RuntimeConfig(file_kv=kv_dir, namespace=namespace, graceful_shutdown_timeout=2)
    etcd: EtcdServer = request.getfixturevalue("etcd_server")
    settings: dict[str, Any] = {
        "discovery_backend": "etcd",
        "etcd_endpoints": etcd.url,
        "namespace": namespace,
        "graceful_shutdown_timeout": 2,
        "lease_ttl": 2,
        "tcp_host": "127.0.0.1",
    }
    if request.param == "etcd+nats":
        nats: NatsServer = request.getfixturevalue("nats_server")
        settings.update(request_plane="nats", event_plane="nats", nats_server=nats.url)
    return RuntimeConfig(**settings)


@pytest.fixture
async def runtime(runtime_config: RuntimeConfig) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime.create(runtime_config)
    yield rt
    await rt.shutdown()
