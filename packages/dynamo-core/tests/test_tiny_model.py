"""The tiny offline model in examples/models/tiny: present, consistent, and reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "models" / "tiny"
SCRIPT = REPO / "examples" / "models" / "make_tiny.py"
FILES = ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"]


def _json(name: str) -> dict:
    return json.loads((TINY / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", FILES)
def test_file_exists(name: str) -> None:
    assert (TINY / name).is_file()


def test_tokenizer_is_small_and_loads() -> None:
    assert (TINY / "tokenizer.json").stat().st_size < 1_000_000
    tok = tokenizers.Tokenizer.from_file(str(TINY / "tokenizer.json"))
    assert 2000 <= tok.get_vocab_size() <= 4000


def test_vocab_and_special_ids_match_config() -> None:
    tok = tokenizers.Tokenizer.from_file(str(TINY / "tokenizer.json"))
    config, gen = _json("config.json"), _json("generation_config.json")
    assert config["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert config["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|end_of_text|>")
    assert im_end in gen["eos_token_id"] and eot in gen["eos_token_id"]
    assert set(gen["eos_token_id"]) == set(config["eos_token_id"])


def test_llama_shape() -> None:
    config = _json("config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["head_dim"] >= 32
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["torch_dtype"] == "float32"


def test_tokenizer_config() -> None:
    cfg = _json("tokenizer_config.json")
    assert cfg["bos_token"] == "<|begin_of_text|>"
    assert cfg["eos_token"] == "<|end_of_text|>"
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in cfg["chat_template"]


def test_weights_are_ignored_by_git() -> None:
    assert "*.safetensors" in (TINY / ".gitignore").read_text().splitlines()


def _run_script(out: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        check=True,
        capture_output=True,
    )


def test_script_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    _run_script(tmp_path / "a")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (TINY / name).read_bytes(), name


def test_weights_have_llama_names_and_shapes(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    _run_script(tmp_path, "--weights")
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    h, v = config["hidden_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    assert tensors["model.embed_tokens.weight"].shape == (v, h)
    assert tensors["lm_head.weight"].shape == (v, h)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (kv, h)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (h, config["intermediate_size"])
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"]
    assert all(t.dtype.name == "float32" for t in tensors.values())


def test_transformers_loads_tokenizer_and_config() -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    config = AutoConfig.from_pretrained(str(TINY))
    assert len(tok) == config.vocab_size
    assert config.head_dim == 32
    text = "Hello café 中文 🙂!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
