"""IncrementalDetokenizer and StopStringMatcher, property-style over random inputs (seeded)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dynamo_core.llm.detokenizer import (
    MAX_PENDING_TOKENS,
    IncrementalDetokenizer,
    StopStringMatcher,
)
from dynamo_core.llm.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny"
FFFD = "\ufffd"

SAMPLES = [
    "Hello café 中文 🙂 world 123!",
    "naïve 日本語 こんにちは 👨‍👩‍👧 Привет, мир",
    "   spaced   out   \n\n tabs\tand 👍🏽🎉 ∑ x² ≤ π",
    '<tool_call>\n{"name": "search", "arguments": {"q": "北京"}}\n</tool_call>',
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


def _byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One id per UTF-8 byte: every multi-byte character split across tokens."""
    byte_map = _bytes_to_unicode()
    ids = []
    for b in text.encode("utf-8"):
        token_id = tok.token_to_id(byte_map[b])
        assert token_id is not None
        ids.append(token_id)
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE base alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, **kwargs: object) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)  # type: ignore[arg-type]
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        out.append(detok.push(ids[i : i + n]))
        i += n
    out.append(detok.flush())
    assert detok.num_tokens == len(ids)
    return out


def _check(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool = True) -> None:
    chunks = _stream(tok, ids, rng, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks) == full
    if FFFD not in full:
        assert not any(FFFD in c for c in chunks)


@pytest.mark.parametrize("text", SAMPLES)
def test_real_text_bpe_tokens(tok: Tokenizer, text: str) -> None:
    rng = random.Random(1)
    _check(tok, tok.encode(text), rng)


@pytest.mark.parametrize("text", SAMPLES)
def test_multibyte_split_into_byte_tokens(tok: Tokenizer, text: str) -> None:
    rng = random.Random(2)
    ids = _byte_token_ids(tok, text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    out = [detok.push([i]) for i in ids]
    assert "".join(out) + detok.flush() == text
    assert not any(FFFD in c for c in out)
    _check(tok, ids, rng)


def test_random_mixes_of_bpe_byte_and_special_tokens(tok: Tokenizer) -> None:
    rng = random.Random(3)
    specials = sorted(tok.special_token_ids)
    for _ in range(300):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 8)):
            text = rng.choice(SAMPLES)
            start = rng.randrange(len(text))
            piece = text[start : start + rng.randrange(1, 12)]
            ids += _byte_token_ids(tok, piece) if rng.random() < 0.4 else tok.encode(piece)
            if rng.random() < 0.3:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        _check(tok, ids, rng, skip=True)
        _check(tok, ids, rng, skip=False)


def test_random_ids_any_garbage(tok: Tokenizer) -> None:
    """Uniformly random ids (invalid byte sequences included): concatenation is still exact."""
    rng = random.Random(4)
    for _ in range(500):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(_stream(tok, ids, rng)) == tok.decode(ids)


def test_holds_back_partial_character(tok: Tokenizer) -> None:
    ids = _byte_token_ids(tok, "a中")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:1]) == "a"
    assert detok.push(ids[1:2]) == ""
    assert detok.push(ids[2:3]) == ""
    assert detok.push(ids[3:]) == "中"
    assert detok.flush() == ""


def test_flush_emits_unfinished_character(tok: Tokenizer) -> None:
    ids = _byte_token_ids(tok, "中")[:2]
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids) == ""
    assert detok.flush() == tok.decode(ids) == FFFD


def test_long_invalid_tail_is_emitted_eventually(tok: Tokenizer) -> None:
    lead = _byte_token_ids(tok, "中")[0]  # a lead byte never completed
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push([lead]) for _ in range(MAX_PENDING_TOKENS + 2))
    assert out  # not held for ever
    assert out + detok.flush() == tok.decode([lead] * (MAX_PENDING_TOKENS + 2))


def test_prompt_tail_gives_context(tok: Tokenizer) -> None:
    prompt = tok.encode("The cat sees")
    gen = tok.encode(" the house 中文")
    detok = IncrementalDetokenizer(tok, prompt_tail=prompt[-4:])
    out = "".join(detok.push([i]) for i in gen) + detok.flush()
    assert out == " the house 中文"
    assert detok.num_tokens == len(gen)


def test_long_stream_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode("The cat sees the house 中文 🙂. " * 200)
    detok = IncrementalDetokenizer(tok)
    out = [detok.push([i]) for i in ids]
    assert "".join(out) + detok.flush() == tok.decode(ids)
    assert len(detok._ids) < 300


# -- StopStringMatcher ---------------------------------------------------------------------------


def _feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_split_across_chunks() -> None:
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d> ignored") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_false_partial_match_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("OP") == ("", True)
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed(" S") == (" ", False)
    assert m.flush() == "S"


def test_multiple_stops_earliest_wins() -> None:
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hel") == ("he", False)  # "l" could start "lo w"
    assert m.feed("lo world") == ("l", True)
    m = StopStringMatcher(["bb", "abc"])
    assert _feed_all(m, ["xa", "b", "c"]) == ("x", True)


def test_stop_at_very_start() -> None:
    assert StopStringMatcher(["<|"]).feed("<|im_end|>") == ("", True)
    m = StopStringMatcher(["\n\n"])
    assert m.feed("\n") == ("", False)
    assert m.feed("\nrest") == ("", True)


def test_no_stops_and_empty_stops_pass_through() -> None:
    m = StopStringMatcher(["", ""])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_overlapping_prefixes() -> None:
    m = StopStringMatcher(["aab"])
    assert _feed_all(m, ["a", "a", "a", "b", "c"]) == ("a", True)


def test_random_streams_match_reference() -> None:
    rng = random.Random(5)
    alphabet = "ab中🙂 \n"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
            for _ in range(rng.randrange(1, 4))
        ]
        chunks, i = [], 0
        while i < len(text):
            n = rng.randrange(1, 5)
            chunks.append(text[i : i + n])
            i += n
        assert _feed_all(StopStringMatcher(stops), chunks) == _reference(text, stops), (
            text,
            stops,
            chunks,
        )
