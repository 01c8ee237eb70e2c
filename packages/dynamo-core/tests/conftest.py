"""dynamo-core's own fixtures. The shared ones (namespace, kv_dir, proc_env, the etcd and NATS
servers, runtime_config, runtime, tiny_model, uvloop) come from dynamo-core's pytest plugin,
`dynamo_core.testing.plugin`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, settings

from dynamo_core.llm.tokenizer import Tokenizer

HERE = Path(__file__).parent

pytest_plugins = ["pytester"]  # test_testing_plugin runs pytest on small suites

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
