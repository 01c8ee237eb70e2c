"""dynamo_core.llm.protocol: the wire request's structured-output constraint (`GuidedDecoding`):
validated once when decoded, carried through msgpack, built from OpenAI's `response_format` and
vLLM's `guided_*` extensions."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from dynamo_core.llm.protocol import GuidedDecoding, OutputOptions, PreprocessedRequest


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


# -- derivations: the frontend's legs of one request -----------------------------------------


def _request(**stop: Any) -> PreprocessedRequest:
    return PreprocessedRequest.from_wire(
        {
            "token_ids": [1, 2, 3],
            "stop_conditions": {"max_tokens": 10, "min_tokens": 4, **stop},
            "request_id": "r",
        }
    )


def test_prefill_leg_computes_the_prompt_and_one_token() -> None:
    req = _request()
    before = msgspec.msgpack.encode(req)
    leg = req.prefill_leg()
    assert leg.prefill_only and leg.stop_conditions.max_tokens == 1
    assert leg.token_ids == req.token_ids and leg.request_id == "r"
    assert leg.prefill_leg() is leg
    assert msgspec.msgpack.encode(req) == before  # the original is untouched


def test_with_transfer_carries_the_prefill_workers_parameters() -> None:
    req = _request()
    decode = req.with_transfer({"mocker": {"prompt_tokens": 3}})
    assert decode.disaggregated_params == {"mocker": {"prompt_tokens": 3}}
    assert req.disaggregated_params is None
    assert not decode.prefill_only and decode.stop_conditions.max_tokens == 10


@pytest.mark.parametrize(
    ("generated", "max_tokens", "min_tokens"),
    [([7], 9, 3), ([7, 8, 9, 10, 11], 5, 0), (list(range(20)), 1, 0), ([], 10, 4)],
)
def test_continuation_appends_what_was_generated(
    generated: list[int], max_tokens: int, min_tokens: int
) -> None:
    req = _request().with_transfer({"x": 1})
    before = msgspec.msgpack.encode(req)
    cont = req.continuation(generated)
    assert cont.token_ids == [1, 2, 3, *generated]
    assert cont.generated_tokens == len(generated)
    assert (cont.stop_conditions.max_tokens, cont.stop_conditions.min_tokens) == (
        max_tokens,
        min_tokens,
    )
    assert cont.disaggregated_params is None  # served whole by the next worker
    assert msgspec.msgpack.encode(req) == before
    # a continuation of a continuation counts from the original prompt
    again = cont.continuation([99])
    assert again.generated_tokens == len(generated) + 1
    assert again.token_ids[-1] == 99


def test_continuation_without_max_tokens_leaves_it_to_the_worker() -> None:
    req = PreprocessedRequest(token_ids=[1, 2])
    cont = req.continuation([5, 6])
    assert cont.stop_conditions.max_tokens is None  # the worker's context decides, as before
    assert cont.generated_tokens == 2


def test_a_struct_and_its_map_are_the_same_request_on_the_wire() -> None:
    """The frontend sends the struct (encoded once by the request plane); an older worker, or
    one on another plane, decodes the same request from the map."""
    req = _request(ignore_eos=True).prefill_leg()
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(req))
    assert wire == req.to_wire()
    assert PreprocessedRequest.from_wire(wire) == req


def test_prompt_logprobs_are_asked_of_the_worker_that_runs_the_prompt() -> None:
    """The prefill leg keeps `prompt_logprobs` (its worker runs the prompt); the decode leg and
    a migration continuation do not ask again (the first worker's first output had them)."""
    req = msgspec.structs.replace(
        _request(), output_options=OutputOptions(logprobs=1, prompt_logprobs=2)
    )
    before = msgspec.msgpack.encode(req)
    assert req.prefill_leg().output_options.prompt_logprobs == 2
    decode = req.with_transfer({"x": 1})
    assert decode.output_options == OutputOptions(logprobs=1)
    cont = req.continuation([7, 8])
    assert cont.output_options == OutputOptions(logprobs=1)
    assert cont.continuation([9]).output_options == OutputOptions(logprobs=1)
    assert msgspec.msgpack.encode(req) == before
    plain = _request()
    assert plain.with_transfer({}).output_options is plain.output_options  # nothing to drop
