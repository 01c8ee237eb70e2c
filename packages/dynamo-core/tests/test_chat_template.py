"""ChatTemplate.render against transformers' apply_chat_template(tokenize=False).

Templates: the tiny model's own (ChatML with tools) and test data under data/templates/ written in
the style of Llama-3.1-instruct, Qwen2.5 (ChatML with tools) and Mistral-instruct (which enforces
alternation with raise_exception), plus one exercising the jinja environment itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.errors import ConfigError, InvalidRequestError
from dynamo_core.llm.chat_template import FALLBACK_TEMPLATE, ChatTemplate
from dynamo_core.llm.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parents[3] / "examples" / "models" / "tiny"
TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, in °C.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
    },
]

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français 🙂"}
USER = {"role": "user", "content": "What's the weather in 北京?"}
ASSISTANT = {"role": "assistant", "content": "Sunny, 25 °C."}
TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}},
        }
    ],
}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 25}'}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And tomorrow?"}],
    "no_system_multi": [USER, ASSISTANT, {"role": "user", "content": "  spaces  "}],
    "tool_round_trip": [SYSTEM, USER, TOOL_CALL, TOOL_RESULT],
    "two_tool_results": [USER, TOOL_CALL, TOOL_RESULT, {**TOOL_RESULT, "content": "second"}],
    "not_alternating": [USER, {"role": "user", "content": "again"}],
    "content_parts": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "part one, "},
                {"type": "text", "text": "part two"},
            ],
        }
    ],
    "ends_with_assistant": [USER, ASSISTANT],
}

TEMPLATE_FILES = ["tiny", "llama3_instruct", "qwen2_tools", "mistral_instruct", "features"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY)


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TINY / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )


def _source(name: str, tok: Tokenizer) -> str:
    if name == "tiny":
        assert tok.chat_template is not None
        return tok.chat_template
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _hf_render(
    hf_tok: Any, source: str, messages: list[dict[str, Any]], **kwargs: Any
) -> str | Exception:
    hf_tok.chat_template = source
    try:
        out = hf_tok.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)
    except Exception as e:
        return e
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize("template", TEMPLATE_FILES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no_gen"])
def test_matches_transformers(
    tok: Tokenizer,
    hf_tok: Any,
    template: str,
    conversation: str,
    with_tools: bool,
    add_generation_prompt: bool,
) -> None:
    source = _source(template, tok)
    messages = CONVERSATIONS[conversation]
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if with_tools:
        kwargs["tools"] = TOOLS
    expected = _hf_render(hf_tok, source, messages, **kwargs)
    ours = ChatTemplate(source, special_tokens=tok.special_tokens)
    before = copy.deepcopy(messages)
    if isinstance(expected, Exception):
        with pytest.raises(InvalidRequestError) as info:
            ours.render(messages, **kwargs)
        if type(expected).__name__ == "TemplateError":
            assert info.value.message == str(expected)
    else:
        assert ours.render(messages, **kwargs) == expected
    assert messages == before, "render must not modify the caller's messages"


def test_some_comparisons_are_real_renders(tok: Tokenizer, hf_tok: Any) -> None:
    """Guard against the matrix above passing only because everything raises."""
    for name in TEMPLATE_FILES:
        out = _hf_render(
            hf_tok, _source(name, tok), CONVERSATIONS["multi_turn"], add_generation_prompt=True
        )
        assert isinstance(out, str) and "And tomorrow?" in out, name


def test_extra_variables_override(tok: Tokenizer, hf_tok: Any) -> None:
    source = _source("llama3_instruct", tok)
    messages = CONVERSATIONS["system_user"]
    expected = _hf_render(
        hf_tok, source, messages, add_generation_prompt=True, date_string="1 Jan 2030"
    )
    got = ChatTemplate(source, special_tokens=tok.special_tokens).render(
        messages, date_string="1 Jan 2030"
    )
    assert got == expected and "1 Jan 2030" in got


def test_tiny_template_renders_chatml(tok: Tokenizer) -> None:
    out = ChatTemplate.from_tokenizer(tok).render([SYSTEM, USER])
    assert out == (
        "<|begin_of_text|><|im_start|>system\nYou are terse. Réponds en français 🙂<|im_end|>\n"
        "<|im_start|>user\nWhat's the weather in 北京?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(out)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=False) == out


def test_raise_exception_becomes_invalid_request(tok: Tokenizer) -> None:
    template = ChatTemplate(_source("mistral_instruct", tok), special_tokens=tok.special_tokens)
    with pytest.raises(InvalidRequestError, match="conversation roles must alternate"):
        template.render(CONVERSATIONS["not_alternating"])
    with pytest.raises(InvalidRequestError, match="Unknown message role: robot"):
        ChatTemplate.from_tokenizer(tok).render([{"role": "robot", "content": "beep"}])


def test_other_render_errors_become_invalid_request(tok: Tokenizer) -> None:
    template = ChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(InvalidRequestError, match="chat template error"):
        template.render([USER])
    with pytest.raises(InvalidRequestError):
        ChatTemplate.from_tokenizer(tok).render([])


def test_sandbox_blocks_internals() -> None:
    template = ChatTemplate(
        "{{ messages.__class__.__mro__ }}{% set ns = namespace() %}{% set ns._x = 1 %}"
    )
    with pytest.raises(InvalidRequestError):
        template.render([USER])
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ ''.__class__.__base__.__subclasses__() }}").render([USER])


def test_syntax_error_is_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_compiled_once_per_source(tok: Tokenizer) -> None:
    a = ChatTemplate.from_tokenizer(tok)
    b = ChatTemplate.from_tokenizer(tok)
    assert a._template is b._template


def test_tool_use_template_chosen_with_tools(tok: Tokenizer) -> None:
    template = ChatTemplate("plain", tool_use_source="with tools: {{ tools | length }}")
    assert template.render([USER]) == "plain"
    assert template.render([USER], tools=TOOLS) == "with tools: 2"


def test_none_values_dropped_and_reasoning_aliased() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content is defined }}|{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}"
    )
    out = template.render([{"role": "assistant", "content": None, "reasoning": "hmm"}])
    assert out == "False|hmm|hmm;"


def test_fallback_without_template(tok: Tokenizer, tmp_path: Path) -> None:
    fallback = ChatTemplate.fallback(bos_token="<s>")
    assert fallback.is_fallback
    out = fallback.render([SYSTEM, {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert out == "<s>system: You are terse. Réponds en français 🙂\nuser: hi\nassistant:"
    assert (
        fallback.render([USER], add_generation_prompt=False)
        == "<s>user: What's the weather in 北京?\n"
    )
    bare = Tokenizer(tok.backend, config={})
    template = ChatTemplate.from_tokenizer(bare)
    assert template.is_fallback and template.source == FALLBACK_TEMPLATE
    assert template.render([USER]) == "user: What's the weather in 北京?\nassistant:"
