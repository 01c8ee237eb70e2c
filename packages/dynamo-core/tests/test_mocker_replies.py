"""What the mocker says when told (dynamo_core.mocker.script, replies, and the handler): reply
scripts and their errors, the chat layout read from real templates, the token round trip, and
constrained or scripted replies streamed by `MockerHandler` on a real tokenizer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dynamo_core.errors import ConfigError, InvalidRequestError
from dynamo_core.llm.chat_template import ChatTemplate
from dynamo_core.llm.detokenizer import IncrementalDetokenizer
from dynamo_core.llm.parsers import parse_output
from dynamo_core.llm.protocol import PreprocessedRequest
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.mocker.adapter import _unprintable_token_ids
from dynamo_core.mocker.engine import MockerEngine, MockerEngineArgs
from dynamo_core.mocker.handlers import MockerDecodeHandler, MockerHandler, MockerPrefillHandler
from dynamo_core.mocker.replies import Replies
from dynamo_core.mocker.script import ChatLayout, PromptView, ReplyScript
from dynamo_core.testing.conformance import collect, make_request

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"
TEMPLATES = Path(__file__).parent / "data" / "templates"

WEATHER_CALL = (
    "<think>The user wants the weather.</think>\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
SCRIPT = [
    {"when": {"user": "weather", "tools": True}, "reply": WEATHER_CALL},
    {"when": {"user": "weather", "tools": False}, "reply": "I cannot look that up."},
    {"when": {"user_regex": "(?i)^hello\\b"}, "reply": "Hello! ¿Qué tal? 你好 👋"},
    {"when": {"prompt": "SYSTEM-X", "user": "json"}, "reply": '{"answer": 42}'},
    {"when": {"prompt_regex": "<\\|im_start\\|>system"}, "reply": "You gave me a system prompt."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["metric", "imperial"]},
    },
    "required": ["city", "days", "units"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def template(tok: Tokenizer) -> ChatTemplate:
    return ChatTemplate.from_tokenizer(tok)


@pytest.fixture
async def engine(tok: Tokenizer) -> AsyncIterator[MockerEngine]:
    e = MockerEngine(
        MockerEngineArgs(speedup_ratio=10_000.0),
        vocab_size=tok.vocab_size,
        special_token_ids=_unprintable_token_ids(tok),
    )
    yield e
    await e.close()


def prompt_ids(
    tok: Tokenizer, template: ChatTemplate, messages: list[dict[str, Any]], **kw: Any
) -> list[int]:
    return tok.encode(template.render(messages, **kw), add_special_tokens=False)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def streamed_text(tok: Tokenizer, outs: list[dict[str, Any]], prompt: list[int]) -> str:
    """What the frontend shows: the ids detokenized as they stream after the prompt, special
    tokens skipped."""
    detok = IncrementalDetokenizer(tok, prompt_tail=prompt[-6:])
    return "".join(detok.push(out.get("token_ids", [])) for out in outs)


# -- the script file -------------------------------------------------------------------------


def test_rules_match_in_order_and_all_conditions_hold() -> None:
    script = ReplyScript.parse([*SCRIPT, {"reply": "catch-all"}])
    view = PromptView(text="<s>SYSTEM-X ... give me json", user="give me json", tools=False)
    assert script.reply(view) == '{"answer": 42}'
    assert script.reply(PromptView(text="", user="weather in Paris?", tools=True)) == WEATHER_CALL
    assert script.reply(PromptView(text="", user="weather?", tools=False)).startswith("I cannot")
    assert script.reply(PromptView(text="", user="HELLO there", tools=None)).startswith("Hello!")
    assert script.reply(PromptView(text="", user="say hellothere", tools=None)) == "catch-all"
    assert ReplyScript.parse({"rules": SCRIPT}).reply(PromptView("", "nothing", None)) is None


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"reply": "x"}, "expected a list of rules"),
        ([{"whn": {"user": "a"}, "reply": "x"}], "rule 0.whn: Extra inputs"),
        ([{"reply": "ok"}, {"when": {"users": "a"}, "reply": "x"}], "rule 1.when.users"),
        ([{"when": {"user_regex": "(unclosed"}, "reply": "x"}], "rule 0.when.user_regex"),
        ([{"when": {"tools": "maybe"}, "reply": "x"}], "rule 0.when.tools"),
        ([{"when": {}, "reply": ""}], "rule 0.reply: Value error, a reply must not be empty"),
        ([{"when": {"user": "a"}}], "rule 0.reply: Field required"),
    ],
)
def test_script_errors_name_the_rule(data: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        ReplyScript.parse(data, source="--reply-script s.yaml")


def test_loading_a_script_file(tmp_path: Path) -> None:
    path = tmp_path / "script.yaml"
    path.write_text("- when: {user: hi}\n  reply: |-\n    two\n    lines\n", encoding="utf-8")
    assert ReplyScript.load(path).rules[0].reply == "two\nlines"
    (tmp_path / "script.json").write_text(json.dumps(SCRIPT), encoding="utf-8")
    assert len(ReplyScript.load(tmp_path / "script.json").rules) == len(SCRIPT)
    path.write_text("- when: {user: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--reply-script .*: invalid YAML \(line 2\)"):
        ReplyScript.load(path)
    with pytest.raises(ConfigError, match="cannot read it"):
        ReplyScript.load(tmp_path / "missing.yaml")


# -- reading prompts ---------------------------------------------------------------------------


def test_chat_layout_of_the_tiny_model(tok: Tokenizer, template: ChatTemplate) -> None:
    replies = Replies.for_model(tok, ReplyScript.parse(SCRIPT))
    messages = [
        {"role": "system", "content": "SYSTEM-X"},
        user("first question"),
        {"role": "assistant", "content": "first answer"},
        user("What is the weather\nin Paris?"),
    ]
    view = replies.view(prompt_ids(tok, template, messages))
    assert view.user == "What is the weather\nin Paris?"
    assert view.tools is False and "SYSTEM-X" in view.text
    with_tools = replies.view(prompt_ids(tok, template, messages, tools=TOOLS))
    assert with_tools.user == "What is the weather\nin Paris?" and with_tools.tools is True
    # a completions prompt (no chat markup): the whole prompt is the user message
    raw = replies.view(tok.encode("weather report:", add_special_tokens=True))
    assert raw.user == "weather report:"


@pytest.mark.parametrize(
    ("name", "tools"),
    [("llama3_instruct", True), ("qwen2_tools", True), ("mistral_instruct", False)],
)
def test_chat_layout_of_other_families(name: str, tools: bool) -> None:
    template = ChatTemplate(
        (TEMPLATES / f"{name}.jinja").read_text(), bos_token="<s>", eos_token="</s>"
    )
    layout = ChatLayout.learn(template)
    assert layout is not None
    convo = [user("one"), {"role": "assistant", "content": "two"}, user("the last one")]
    assert layout.last_user(template.render(convo)) == "the last one"
    assert (layout.tools_marker is not None) is tools
    if tools:
        assert layout.has_tools(template.render(convo, tools=TOOLS))
        assert not layout.has_tools(template.render(convo))


def test_a_script_on_tools_needs_a_template_that_shows_them(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in TINY.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(model)
    by_user = Replies.for_model(tok, ReplyScript.parse([{"when": {"user": "a"}, "reply": "x"}]))
    assert by_user.layout is not None and by_user.layout.tools_marker is None
    with pytest.raises(ConfigError, match="match on 'prompt' instead"):
        Replies.for_model(tok, ReplyScript.parse([{"when": {"tools": True}, "reply": "x"}]))


# -- the token round trip -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        WEATHER_CALL,
        "Hello! ¿Qué tal? 你好 👋",
        '{"a": [1, 2.5, null], "b": "quote \\" and \\\\ back"}',
        "  leading and trailing spaces  \n\n",
        "tab\tand\r\ncrlf",
        "x",
    ],
)
def test_replies_show_exactly_their_text_after_the_prompt(
    text: str, tok: Tokenizer, sentencepiece: Tokenizer
) -> None:
    """As the frontend shows them: streamed one id at a time after the prompt's last ids
    (SentencePiece decoders treat a sequence's first token differently)."""
    for tokenizer in (tok, sentencepiece):
        prompt = tokenizer.encode("Question: say it", add_special_tokens=True)
        ids = Replies(tokenizer).encode(text, prompt)
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, prompt_tail=prompt)
        assert "".join(detok.push([i]) for i in ids) == text


def test_text_the_vocabulary_cannot_spell_is_refused() -> None:
    import tokenizers

    spec = {
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"},
        "pre_tokenizer": {"type": "Whitespace"},
        "decoder": None,
        "added_tokens": [],
    }
    word = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(InvalidRequestError, match="cannot spell its reply"):
        Replies(word).encode("b", [1])


# -- the handler ------------------------------------------------------------------------------------


def guided_request(
    tok: Tokenizer, template: ChatTemplate, *, seed: int = 7, max_tokens: int = 512, **extra: Any
) -> dict[str, Any]:
    req = make_request(
        prompt_ids(tok, template, [user("Plan my trip as JSON.")]),
        max_tokens=max_tokens,
        ignore_eos=False,
        eos_token_ids=tok.eos_token_ids,
        seed=seed,
        guided_decoding={"json": SCHEMA},
    )
    req.update(extra)
    return req


async def test_a_json_schema_answer_validates_and_ends_with_eos(
    tok: Tokenizer, template: ChatTemplate, engine: MockerEngine
) -> None:
    handler = MockerHandler(engine, replies=Replies.for_model(tok))
    texts = []
    for seed in range(5):
        req = guided_request(tok, template, seed=seed)
        outs = await collect(handler, req)
        assert outs[-1]["finish_reason"] == "eos"
        ids = [t for o in outs for t in o.get("token_ids", [])]
        assert ids[-1] == tok.eos_token_ids[0]
        text = streamed_text(tok, outs, req["token_ids"])
        jsonschema.validate(json.loads(text), SCHEMA)
        assert outs[-1]["usage"]["completion_tokens"] == len(ids)
        texts.append(text)
    again = await collect(handler, guided_request(tok, template, seed=0))
    assert streamed_text(tok, again, req["token_ids"]) == texts[0]  # the same seed, the same answer
    assert len(set(texts)) > 1
    assert engine.num_requests == 0 and engine.stats()["requests_finished"] == 6


async def test_max_tokens_cuts_a_constrained_answer_with_length(
    tok: Tokenizer, template: ChatTemplate, engine: MockerEngine
) -> None:
    handler = MockerHandler(engine, replies=Replies.for_model(tok))
    full = await collect(handler, guided_request(tok, template))
    ids = [t for o in full for t in o.get("token_ids", [])]
    cut = await collect(handler, guided_request(tok, template, max_tokens=len(ids) // 2))
    assert cut[-1]["finish_reason"] == "length"
    assert [t for o in cut for t in o.get("token_ids", [])] == ids[: len(ids) // 2]


async def test_scripted_replies_win_and_parse_as_the_family_writes_them(
    tok: Tokenizer, template: ChatTemplate, engine: MockerEngine
) -> None:
    handler = MockerHandler(engine, replies=Replies.for_model(tok, ReplyScript.parse(SCRIPT)))
    ids = prompt_ids(tok, template, [user("weather in Paris?")], tools=TOOLS)
    outs = await collect(
        handler,
        make_request(
            ids,
            max_tokens=200,
            ignore_eos=False,
            eos_token_ids=tok.eos_token_ids,
            guided_decoding={"json": SCHEMA},
        ),
    )
    text = streamed_text(tok, outs, ids)
    assert text == WEATHER_CALL and outs[-1]["finish_reason"] == "eos"
    parsed = parse_output(text, tool_call_parser="hermes", reasoning_parser="qwen3")
    assert parsed.reasoning == "The user wants the weather."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # without tools, the next rule; no rule: the constraint, then random tokens
    no_tools = prompt_ids(tok, template, [user("weather in Paris?")])
    outs = await collect(handler, make_request(no_tools, max_tokens=50))
    assert streamed_text(tok, outs, no_tools) == "I cannot look that up."
    assert outs[-1]["finish_reason"] == "stop"  # ignore_eos: no eos token, the reply's end
    other = prompt_ids(tok, template, [user("Plan my trip as JSON.")])
    constrained = await collect(
        handler, make_request(other, max_tokens=300, guided_decoding={"json": SCHEMA})
    )
    jsonschema.validate(json.loads(streamed_text(tok, constrained, other)), SCHEMA)
    free = await collect(handler, make_request(other, max_tokens=9))
    assert len([t for o in free for t in o["token_ids"]]) == 9
    assert free[-1]["finish_reason"] == "length"


async def test_disaggregated_constrained_answer_matches_aggregated(
    tok: Tokenizer, template: ChatTemplate
) -> None:
    engines = [
        MockerEngine(MockerEngineArgs(speedup_ratio=10_000.0), vocab_size=tok.vocab_size)
        for _ in range(3)
    ]
    replies = Replies.for_model(tok)
    try:
        req = guided_request(tok, template)
        prefill = await collect(
            MockerPrefillHandler(engines[0], replies=replies),
            {**req, "stop_conditions": {**req["stop_conditions"], "max_tokens": 1}},
        )
        params = prefill[-1]["disaggregated_params"]
        decode = await collect(
            MockerDecodeHandler(engines[1], replies=replies),
            {**req, "disaggregated_params": params},
        )
        agg = await collect(MockerHandler(engines[2], replies=replies), req)
        prompt = req["token_ids"]
        assert streamed_text(tok, decode, prompt) == streamed_text(tok, agg, prompt)
        assert prefill[-1]["token_ids"] == agg[0]["token_ids"][:1]
    finally:
        for e in engines:
            await e.close()


async def test_constraints_the_mocker_cannot_honour_fail_the_request_only(
    tok: Tokenizer, template: ChatTemplate, engine: MockerEngine
) -> None:
    handler = MockerHandler(engine, replies=Replies.for_model(tok))
    bad = guided_request(tok, template, guided_decoding={"regex": "a(?=b)"})
    with pytest.raises(InvalidRequestError, match="look-ahead"):
        await collect(handler, bad)
    assert engine.num_requests == 0
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        await collect(MockerHandler(engine), guided_request(tok, template))
    outs = await collect(handler, guided_request(tok, template))
    assert outs[-1]["finish_reason"] == "eos"  # the handler keeps serving


def test_request_seed_and_prompt_decide_the_text(tok: Tokenizer) -> None:
    replies = Replies(tok, seed=3)

    def text(**kw: Any) -> str | None:
        req = PreprocessedRequest.from_wire(
            make_request([5, 6, 7], guided_decoding={"json_object": True}, **kw)
        )
        return replies.text(req)

    assert text(seed=1) == text(seed=1) != text(seed=2)
    unseeded = PreprocessedRequest.from_wire(
        {"token_ids": [5, 6, 7], "guided_decoding": {"json_object": True}}
    )
    assert replies.text(unseeded) == Replies(tok, seed=3).text(unseeded)
    assert replies.text(unseeded) != Replies(tok, seed=4).text(unseeded)
