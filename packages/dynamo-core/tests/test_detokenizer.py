"""IncrementalDetokenizer and StopStringMatcher, property-style over random inputs (seeded),
against the reference vLLM detokenizes with (`tokenizers`' DecodeStream, stepped per token)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.llm.detokenizer import IncrementalDetokenizer, LogprobTokens, StopStringMatcher
from dynamo_core.llm.tokenizer import Tokenizer

try:  # tokenizers >= 0.21: what vLLM detokenizes with, the reference here
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    pytest.skip("needs tokenizers' DecodeStream (0.21+)", allow_module_level=True)

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


def _vllm_text(tok: Any, ids: list[int], skip: bool = True, prompt: list[int] | None = None) -> str:
    """What vLLM's detokenizer returns: `tokenizers`' DecodeStream stepped once per id,
    restarted from the current id when it reports an invalid prefix; held text is dropped."""
    stream = DecodeStream(ids=prompt, skip_special_tokens=skip) if prompt else None
    stream = stream or DecodeStream(skip_special_tokens=skip)
    backend = getattr(tok, "backend", tok)
    out = []
    for token_id in ids:
        try:
            text = stream.step(backend, token_id)
        except Exception as exc:
            assert str(exc).startswith("Invalid prefix"), exc
            stream = DecodeStream(skip_special_tokens=skip)
            text = stream.step(backend, token_id)
        out.append(text or "")
    return "".join(out)


def _stream(tok: Any, ids: list[int], rng: random.Random, **kwargs: Any) -> list[str]:
    """Push `ids` in random batches (an engine output may carry several tokens)."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        out.append(detok.push(ids[i : i + n]))
        i += n
    assert detok.num_tokens == len(ids)
    return out


def _check(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool = True) -> None:
    chunks = _stream(tok, ids, rng, skip_special_tokens=skip)
    assert "".join(chunks) == _vllm_text(tok, ids, skip)
    if FFFD not in tok.decode(ids, skip_special_tokens=skip):
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
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
    assert "".join(out) == text
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
    """Random ids, mostly single bytes (invalid sequences, cut characters): vLLM's text."""
    rng = random.Random(4)
    byte_ids = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1]
    for _ in range(1000):
        n = rng.randrange(1, 40)
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
            for _ in range(n)
        ]
        assert "".join(_stream(tok, ids, rng)) == _vllm_text(tok, ids), ids


def test_holds_back_partial_character(tok: Tokenizer) -> None:
    ids = _byte_token_ids(tok, "a中")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:1]) == "a"
    assert detok.push(ids[1:2]) == ""
    assert detok.push(ids[2:3]) == ""
    assert detok.held == 2
    assert detok.push(ids[3:]) == "中"
    assert detok.held == 0


def test_unfinished_character_at_the_end_is_dropped(tok: Tokenizer) -> None:
    """vLLM drops what its stream still holds at the end: no U+FFFD."""
    ids = _byte_token_ids(tok, "ok 中")[:-1]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push([i]) for i in ids) == "ok " == _vllm_text(tok, ids)
    assert detok.held == 2


def test_whole_character_sharing_a_token_with_a_cut_one_is_dropped(tok: Tokenizer) -> None:
    """A token such as " \\xf0\\x9f" (a space, then half an emoji) holds its space back too;
    when the stream ends there, vLLM shows neither."""
    mixed = [
        i
        for i in range(tok.vocab_size)
        if tok.decode([i]).endswith(FFFD) and tok.decode([i]).rstrip(FFFD)
    ]
    assert mixed, "the tiny vocabulary has such tokens"
    for token_id in mixed:
        ids = [*tok.encode("Hi"), token_id]
        detok = IncrementalDetokenizer(tok)
        assert detok.push(ids) == "Hi" == _vllm_text(tok, ids)


def test_several_ids_at_once_are_stepped_one_by_one(tok: Tokenizer) -> None:
    """One engine output with a whole character then a cut one: the whole one is emitted now
    (vLLM, stepping per token, emitted it before it saw the cut one)."""
    ids = _byte_token_ids(tok, "a中")
    detok = IncrementalDetokenizer(tok)
    assert detok.push([*ids[:1], *ids[1:3]]) == "a"
    assert detok.push(ids[3:]) == "中"


def test_long_invalid_tail_is_held_like_vllm(tok: Tokenizer) -> None:
    lead = _byte_token_ids(tok, "中")[0]  # a lead byte never completed
    detok = IncrementalDetokenizer(tok)
    ids = [lead] * 40
    assert "".join(detok.push([i]) for i in ids) == "" == _vllm_text(tok, ids)
    assert detok.held == 40
    # text that ends on a whole character releases the lot, U+FFFD for the invalid bytes
    tail = tok.encode(" ok")
    assert detok.push(tail) == tok.decode([*ids, *tail]) == FFFD * 40 + " ok"


def test_prompt_tail_gives_context(tok: Tokenizer) -> None:
    prompt = tok.encode("The cat sees")
    gen = tok.encode(" the house 中文")
    detok = IncrementalDetokenizer(tok, prompt_tail=prompt[-4:])
    out = "".join(detok.push([i]) for i in gen)
    assert out == " the house 中文" == _vllm_text(tok, gen, prompt=prompt)
    assert detok.num_tokens == len(gen)


def test_prompt_tail_ending_inside_a_character(tok: Tokenizer) -> None:
    prompt = [*tok.encode("x"), *_byte_token_ids(tok, "中")[:2]]
    gen = tok.encode(" ok")
    detok = IncrementalDetokenizer(tok, prompt_tail=prompt)
    assert "".join(detok.push([i]) for i in gen) == " ok"


def test_long_stream_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode("The cat sees the house 中文 🙂. " * 200)
    detok = IncrementalDetokenizer(tok)
    out = [detok.push([i]) for i in ids]
    assert "".join(out) == tok.decode(ids)
    assert len(detok._ids) < 300


# -- a SentencePiece-style tokenizer: Metaspace, byte fallback (conftest) ----------------------


def test_sentencepiece_byte_fallback_matches_vllm(sentencepiece: Tokenizer) -> None:
    """Byte tokens that form no character make the window's decode disagree with what was
    emitted: DecodeStream then restarts, and so does the detokenizer."""
    tok = sentencepiece
    rng = random.Random(6)
    assert tok.decode([3 + 0xE4, 3 + 0xB8, 3 + 0xAD]) == "中"
    for _ in range(1500):
        ids = [
            rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 25))
        ]
        for skip in (True, False):
            got = "".join(_stream(tok, ids, rng, skip_special_tokens=skip))
            assert got == _vllm_text(tok, ids, skip), ids


def test_sentencepiece_first_token_keeps_its_space_after_the_prompt(
    sentencepiece: Tokenizer,
) -> None:
    tok = sentencepiece
    hello, world = tok.token_to_id("▁Hello"), tok.token_to_id("▁world")
    assert hello is not None and world is not None
    assert tok.decode([world]) == "world"  # alone, the decoder drops the space
    detok = IncrementalDetokenizer(tok, prompt_tail=[hello])
    assert detok.push([world]) == " world" == _vllm_text(tok, [world], prompt=[hello])


# -- LogprobTokens ------------------------------------------------------------------------------


def test_logprob_strings_give_a_cut_character_to_the_token_that_completes_it(
    tok: Tokenizer,
) -> None:
    """vLLM's rule: "" for a token holding part of a character, the character (and what the
    earlier parts held, such as a space) on the token that completes it; real bytes apiece."""
    mixed = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b" \xf0\x9f")
    rest = [i for i in _byte_token_ids(tok, "🙂")[2:]]
    texts = LogprobTokens(tok)
    shown = []
    for token_id in [*tok.encode("a"), mixed, *rest, *tok.encode("b")]:
        shown.append(texts.entry(token_id))
        texts.advance(token_id)
    assert shown == [("a", b"a"), ("", b" \xf0\x9f"), ("", b"\x99"), (" 🙂", b"\x82"), ("b", b"b")]
    # no context completes a lone continuation byte: ""
    assert LogprobTokens(tok).entry(rest[0]) == ("", b"\x99")


# -- StopStringMatcher ---------------------------------------------------------------------------


def _feed_all(
    matcher: StopStringMatcher, chunks: list[str], unchecked: int = 0
) -> tuple[str, bool]:
    """Feed `chunks`, the first `unchecked` of them with check=False (within min_tokens)."""
    out = []
    for i, chunk in enumerate(chunks):
        text, stopped = matcher.feed(chunk, i >= unchecked)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def _reference(text: str, stops: list[str], floor: int = 0) -> tuple[str, bool]:
    """vLLM's rule: the stop string that completes first (after `floor`) wins, then the
    earlier one in the list; the text is cut where it starts."""
    best: tuple[int, int, int] | None = None
    for order, stop in enumerate(s for s in dict.fromkeys(stops) if s):
        at = text.find(stop, max(0, floor - len(stop) + 1))
        if at != -1 and (best is None or (at + len(stop), order) < best[:2]):
            best = (at + len(stop), order, at)
    return (text[: best[2]], True) if best else (text, False)


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


def test_the_stop_that_completes_first_wins() -> None:
    """One chunk with two stop strings: the one that ends first, not the one that starts
    first (what stepping token by token finds); at the same end, the earlier in the list."""
    assert StopStringMatcher(["abcd", "bc"]).feed("xabcd") == ("xa", True)
    assert StopStringMatcher(["b", "ab"]).feed("xab") == ("xa", True)
    assert StopStringMatcher(["ab", "b"]).feed("xab") == ("x", True)


def test_min_tokens_text_may_start_a_stop_but_not_end_one() -> None:
    m = StopStringMatcher(["ab", "c"])
    assert m.feed("cxa", check=False) == ("cx", False)  # "c" is within min_tokens
    assert m.feed("b") == ("", True)  # "ab" started there and ends after: a stop
    m = StopStringMatcher(["ab", "b"])
    assert m.feed("xab", check=False) == ("xab", False)  # both ended within min_tokens
    assert m.feed("zb") == ("z", True)


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
        unchecked = rng.choice([0, 0, 1, 2])
        floor = len("".join(chunks[:unchecked]))
        assert _feed_all(StopStringMatcher(stops), chunks, unchecked) == _reference(
            text, stops, floor
        ), (text, stops, chunks, unchecked)
