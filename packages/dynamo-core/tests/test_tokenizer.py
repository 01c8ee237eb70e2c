"""dynamo_core.llm.tokenizer on the tiny model, checked against transformers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from dynamo_core.llm import tokenizer as tokenizer_module
from dynamo_core.llm.tokenizer import ASYNC_ENCODE_THRESHOLD, Tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny"

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "café naïve résumé — déjà vu…",
    "中文 和 日本語 こんにちは",
    "emoji 🙂🚀👍🏽 👨‍👩‍👧 done",
    "numbers 12345 3.14159 -7",
    "line one\nline two\ttabbed\r\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_eos(tok: Tokenizer) -> None:
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|end_of_text|>"
    eot, im_end = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == [eot, im_end]
    assert tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert {eot, im_end, tok.bos_token_id, tok.token_to_id("<|im_start|>")} <= tok.special_token_ids
    assert tok.special_tokens["bos_token"] == "<|begin_of_text|>"


def test_sizes_and_template(tok: Tokenizer) -> None:
    config = json.loads((TINY / "config.json").read_text())
    assert tok.vocab_size == config["vocab_size"]
    assert tok.model_max_length == 2048
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.backend.get_vocab_size() == tok.vocab_size


def test_add_special_tokens_prepends_bos(tok: Tokenizer) -> None:
    ids = tok.encode("hi", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode("hi")


def test_decode_skips_special_tokens(tok: Tokenizer) -> None:
    ids = [tok.bos_token_id, *tok.encode("hi"), *tok.eos_token_ids]
    assert tok.decode(ids) == "hi"
    assert (
        tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hi<|end_of_text|><|im_end|>"
    )


def test_special_token_text_is_encoded_as_one_token(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


async def test_encode_async_inline_for_short_text(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []

    async def fake_to_thread(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise AssertionError("short texts must not go to a thread")

    monkeypatch.setattr(tokenizer_module.asyncio, "to_thread", fake_to_thread)
    assert await tok.encode_async("short text") == tok.encode("short text")
    assert calls == []


async def test_encode_async_threads_long_text(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[bool] = []
    real = asyncio.to_thread

    async def spy(*args: object, **kwargs: object) -> object:
        used.append(True)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tokenizer_module.asyncio, "to_thread", spy)
    text = "The cat sees the house. 中文 🙂 " * (ASYNC_ENCODE_THRESHOLD // 10)
    assert len(text) > ASYNC_ENCODE_THRESHOLD
    ids = await tok.encode_async(text, add_special_tokens=True)
    assert used == [True]
    assert ids == tok.encode(text, add_special_tokens=True)


def _copy_tiny(dst: Path) -> Path:
    shutil.copytree(TINY, dst)
    return dst


def test_chat_template_file_wins(tmp_path: Path) -> None:
    root = _copy_tiny(tmp_path / "m")
    (root / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert Tokenizer.from_dir(root).chat_template == "{{ messages[0].content }}"


def test_named_chat_templates(tmp_path: Path) -> None:
    root = _copy_tiny(tmp_path / "m")
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "default", "template": "D"},
        {"name": "tool_use", "template": "T"},
    ]
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(root)
    assert tok.chat_template == "D"
    assert tok.chat_templates == {"default": "D", "tool_use": "T"}


def test_without_generation_config_and_template(tmp_path: Path) -> None:
    root = _copy_tiny(tmp_path / "m")
    (root / "generation_config.json").unlink()
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["model_max_length"] = int(1e30)
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(root)
    assert tok.eos_token_ids == [tok.token_to_id("<|end_of_text|>")]
    assert tok.chat_template is None
    assert tok.model_max_length is None


def test_added_token_dicts_in_config(tmp_path: Path) -> None:
    root = _copy_tiny(tmp_path / "m")
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True}
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(root)
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)


def test_matches_transformers(tok: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TINY))
    for text in TEXTS:
        for special in (False, True):
            assert tok.encode(text, add_special_tokens=special) == hf.encode(
                text, add_special_tokens=special
            )
        ids = [tok.bos_token_id, *tok.encode(text), tok.eos_token_ids[-1]]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert sorted(tok.eos_token_ids) == sorted(
        {hf.eos_token_id, *hf.convert_tokens_to_ids(["<|im_end|>"])}
    )


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_into_the_text(tok: Tokenizer, text: str) -> None:
    """Each token's own bytes, characters cut across tokens included."""
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    for i in ids:
        if "\ufffd" not in tok.token_string(i):
            assert tok.token_bytes(i) == tok.token_string(i).encode()


def test_token_strings_and_bytes_of_special_and_cut_tokens(tok: Tokenizer) -> None:
    eos = tok.token_to_id("<|im_end|>")
    assert eos is not None
    assert tok.token_string(eos) == "<|im_end|>" and tok.token_bytes(eos) == b"<|im_end|>"
    lead = tok.encode("中")
    cut = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == "中".encode()[:1])
    assert tok.token_string(cut) == "\ufffd"  # what decode gives, as in vLLM
    assert tok.token_bytes(cut) == b"\xe4"
    assert b"".join(tok.token_bytes(i) for i in lead) == "中".encode()


def test_sentencepiece_pieces(sentencepiece: Tokenizer) -> None:
    """Metaspace + byte fallback (Llama-2, Mistral): "▁" is a space, "<0xE4>" a byte, and the
    string of a word token keeps its leading space (decode alone drops it)."""
    tok = sentencepiece

    def of(piece: str) -> tuple[str, bytes]:
        token_id = tok.token_to_id(piece)
        assert token_id is not None
        return tok.token_string(token_id), tok.token_bytes(token_id)

    assert tok.decode([tok.token_to_id("▁Hello") or 0]) == "Hello"
    assert of("▁Hello") == (" Hello", b" Hello")
    assert of("▁▁x") == ("  x", b"  x")
    assert of("ok") == ("ok", b"ok")
    assert of("<0xE4>") == ("\ufffd", b"\xe4")
    assert of("<s>") == ("<s>", b"<s>")


@pytest.mark.parametrize("special", [False, True])
def test_encode_within_matches_encode_below_the_limit(tok: Tokenizer, special: bool) -> None:
    for text in [*TEXTS, "The cat sees the house. 中文 🙂 " * 3000, "x" * 30_000]:
        full = tok.encode(text, add_special_tokens=special)
        encoded = tok.encode_within(text, len(full) + 1, add_special_tokens=special)
        assert encoded.complete and encoded.ids == full
        assert tok.encode_released(text, special) == full


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog. " * 100_000,  # 4.5 MB of words
        "word\n" * 500_000,
        "x" * 3_000_000,  # one pre-token: no whitespace to cut at
        "中文日本語" * 400_000,
    ],
)
def test_encode_within_stops_early_past_the_limit(tok: Tokenizer, text: str) -> None:
    limit = 2048
    seen: list[int] = []
    real = tok.encode_released

    def counting(t: str, add_special_tokens: bool = False) -> list[int]:
        seen.append(len(t))
        return real(t, add_special_tokens)

    tok.encode_released = counting  # type: ignore[method-assign]
    try:
        encoded = tok.encode_within(text, limit)
    finally:
        del tok.encode_released
    assert not encoded.complete and len(encoded.ids) > limit
    # the work is bounded by the limit, not by the text (a few prefixes, each small)
    assert sum(seen) < 64 * limit < len(text) // 10
    # the prefix's tokens are the first tokens of the whole text
    assert tok.encode(text[: 100 * limit])[: limit // 2] == encoded.ids[: limit // 2]


def test_encode_within_exact_at_the_boundary(tok: Tokenizer) -> None:
    text = "alpha beta gamma delta " * 2000
    n = len(tok.encode(text))
    assert tok.encode_within(text, n).ids == tok.encode(text)
    over = tok.encode_within(text, n - 1)  # all of it, or a prefix already over the limit
    assert len(over.ids) == n if over.complete else len(over.ids) > n - 1
