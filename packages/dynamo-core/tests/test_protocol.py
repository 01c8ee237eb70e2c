"""dynamo_core.llm.protocol: the wire request's structured-output constraint (`GuidedDecoding`):
validated once when decoded, carried through msgpack, built from OpenAI's `response_format` and
vLLM's `guided_*` extensions."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from dynamo_core.llm.protocol import GuidedDecoding, PreprocessedRequest


def test_guided_decoding_travels_with_the_request() -> None:
    req = PreprocessedRequest(token_ids=[1], guided_decoding=GuidedDecoding(choice=["a", "b"]))
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(req.to_wire()))
    assert wire["guided_decoding"] == {"choice": ["a", "b"]}
    assert PreprocessedRequest.from_wire(wire).guided_decoding == GuidedDecoding(choice=["a", "b"])
    assert "guided_decoding" not in PreprocessedRequest(token_ids=[1]).to_wire()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, "exactly one of .* \\(found: none\\)"),
        ({"regex": "a", "json_object": True}, "found: json_object, regex"),
        ({"choice": []}, "at least one string"),
        ({"grammar": "  "}, "grammar must not be empty"),
        ({"structural_tag": "x"}, "unknown field `structural_tag`"),
        ({"json": [1]}, "Expected `object | null`"),
    ],
)
def test_malformed_constraints_are_refused_when_decoded(data: dict[str, Any], says: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=says):
        PreprocessedRequest.from_wire({"token_ids": [1], "guided_decoding": data})


def test_kinds_and_choice_regex() -> None:
    g = GuidedDecoding(choice=["a.b", "x|y", "(z)", "back\\slash", "new\nline", "[q]{2}"])
    assert g.kind == "choice"
    pattern = g.choice_regex()
    assert all(re.fullmatch(pattern, c) for c in g.choice or ())
    assert not re.fullmatch(pattern, "aXb")
    assert GuidedDecoding(regex="").kind == "regex"  # vLLM takes an empty regex: only ""


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, GuidedDecoding(json_object=True)),
        (
            {"type": "json_schema", "json_schema": {"name": "m", "schema": {"type": "object"},
                                                    "strict": True}},
            GuidedDecoding(json={"type": "object"}),
        ),
        ({"type": "json_schema", "json_schema": {"name": "m"}}, GuidedDecoding(json_object=True)),
    ],
)  # fmt: skip
def test_from_response_format(response_format: Any, expected: GuidedDecoding | None) -> None:
    assert GuidedDecoding.from_response_format(response_format) == expected


@pytest.mark.parametrize(
    ("response_format", "says"),
    [
        ("json", "must be an object"),
        ({"type": "yaml"}, "must be one of"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema must be an object"),
    ],
)
def test_from_response_format_refuses_bad_shapes(response_format: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        GuidedDecoding.from_response_format(response_format)


def test_from_guided_fields() -> None:
    assert GuidedDecoding.from_guided_fields() is None
    assert GuidedDecoding.from_guided_fields(guided_json='{"type": "integer"}') == GuidedDecoding(
        json={"type": "integer"}
    )
    assert GuidedDecoding.from_guided_fields(guided_choice=["a"]) == GuidedDecoding(choice=["a"])
    with pytest.raises(ValueError, match="found: regex, choice"):
        GuidedDecoding.from_guided_fields(guided_regex="a", guided_choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecoding.from_guided_fields(guided_json="{oops")
