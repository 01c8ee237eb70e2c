"""The mocker's structured output (dynamo_core.mocker.guided, _textgen): property tests that
what it generates always satisfies the constraint (JSON schemas checked with `jsonschema`,
regexes with `re.fullmatch`), determinism per seed, variety across seeds, clear refusals."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.protocol import GuidedDecoding
from dynamo_core.mocker.guided import generate_text, grammar_text, json_value, regex_text

PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FORMATS = ["date-time", "date", "time", "email", "uuid", "uri", "hostname", "ipv4", "ipv6"]


def validate(value: Any, schema: Any) -> None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)


# -- JSON schemas: a strategy over the supported subset --------------------------------------

names = st.sampled_from(["id", "name", "tags", "x", "y", "nested", "a_b", "Z9"])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8),
)
PATTERNS = [r"^[A-Z]{2}\d{3}$", r"[a-f0-9]{8}", r"^(GET|POST|PUT)$", r"\w+@\w+\.org", "^x*y?$"]


@st.composite
def bounds(draw: st.DrawFn, lo: int, hi: int) -> tuple[int | None, int | None]:
    a, b = sorted((draw(st.integers(lo, hi)), draw(st.integers(lo, hi))))
    return (a if draw(st.booleans()) else None), (b if draw(st.booleans()) else None)


@st.composite
def string_schema(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["plain", "pattern", "format"]))
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(PATTERNS))}
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(FORMATS))}
    lo, hi = draw(bounds(0, 30))
    schema: dict[str, Any] = {"type": "string"}
    if lo is not None:
        schema["minLength"] = lo
    if hi is not None:
        schema["maxLength"] = hi
    return schema


@st.composite
def number_schema(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["integer", "number"]))
    schema: dict[str, Any] = {"type": kind}
    lo, hi = draw(bounds(-500, 500))
    if lo is not None and hi is not None and draw(st.booleans()) and lo < hi - 1:
        schema["exclusiveMinimum"], schema["exclusiveMaximum"] = lo, hi
    else:
        if lo is not None:
            schema["minimum"] = lo
        if hi is not None:
            schema["maximum"] = hi
    if draw(st.booleans()):
        step = draw(st.sampled_from([1, 2, 5, 7, 0.5, 0.25] if kind == "number" else [1, 2, 3, 7]))
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if low is None or high is None or high - low > 2 * step + 2:
            schema["multipleOf"] = step
    return schema


leaves = st.one_of(
    string_schema(),
    number_schema(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(scalars, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
    scalars.map(lambda v: {"const": v}),
    st.just({}),
)


def composites(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def obj(draw: st.DrawFn) -> dict[str, Any]:
        props = draw(st.dictionaries(names, children, max_size=4))
        schema: dict[str, Any] = {"type": "object", "properties": props}
        schema["required"] = [p for p in props if draw(st.booleans())]
        extra = draw(st.sampled_from([None, False, True, {"type": "integer"}]))
        if extra is not None:
            schema["additionalProperties"] = extra
        if extra is not False and draw(st.booleans()):
            schema["minProperties"] = draw(st.integers(0, 5))
        return schema

    @st.composite
    def arr(draw: st.DrawFn) -> dict[str, Any]:
        lo, hi = draw(bounds(0, 4))
        schema: dict[str, Any] = {"type": "array", "items": draw(children)}
        if lo is not None:
            schema["minItems"] = lo
        if hi is not None:
            schema["maxItems"] = hi
        if draw(st.booleans()):  # unique items over a large domain
            schema["items"] = {"type": "integer", "minimum": 0, "maximum": 10**6}
            schema["uniqueItems"] = True
        return schema

    @st.composite
    def tuple_(draw: st.DrawFn) -> dict[str, Any]:
        items = draw(st.lists(children, min_size=1, max_size=3))
        return {"type": "array", "prefixItems": items, "items": False}

    @st.composite
    def union(draw: st.DrawFn) -> dict[str, Any]:
        # branches of distinct types: oneOf then holds whichever branch is generated
        kinds = draw(
            st.lists(
                st.sampled_from(["null", "boolean", "string", "object"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        branches: list[dict[str, Any]] = [{"type": k} for k in kinds]
        for branch in branches:
            if branch["type"] == "object":
                branch["properties"] = draw(st.dictionaries(names, children, max_size=3))
        return {draw(st.sampled_from(["anyOf", "oneOf"])): branches}

    @st.composite
    def merged(draw: st.DrawFn) -> dict[str, Any]:
        a = draw(names)
        b = draw(names.filter(lambda n: n != a))
        return {
            "allOf": [
                {"type": "object", "properties": {a: draw(children)}, "required": [a]},
                {"properties": {b: draw(children)}, "required": [b]},
            ]
        }

    return st.one_of(obj(), arr(), tuple_(), union(), merged())


nested = st.recursive(leaves, composites, max_leaves=12)
# a definition referenced from the root (refs resolve against the root document)
referenced = nested.map(
    lambda inner: {
        "$defs": {"Inner": inner},
        "type": "object",
        "properties": {"inner": {"$ref": "#/$defs/Inner"}, "again": {"$ref": "#/$defs/Inner"}},
        "required": ["inner"],
    }
)
schemas = st.one_of(nested, referenced)


@PROPERTY
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_generated_json_validates_against_its_schema(schema: dict[str, Any], seed: int) -> None:
    text = generate_text(GuidedDecoding(json=schema), random.Random(seed))
    value = json.loads(text)
    validate(value, schema)
    assert text == generate_text(GuidedDecoding(json=schema), random.Random(seed))


RECURSIVE = {
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer", "minimum": 0},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 3},
                "parent": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
            },
            "required": ["value", "children", "parent"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/Node",
}

# what pydantic writes for a model (`beta.chat.completions.parse(response_format=Model)`), in
# OpenAI's strict mode: every property required, additionalProperties false, Optional as anyOf
PYDANTIC_LIKE = {
    "$defs": {
        "Step": {
            "properties": {
                "explanation": {"title": "Explanation", "type": "string"},
                "output": {"title": "Output", "type": "string"},
            },
            "required": ["explanation", "output"],
            "title": "Step",
            "type": "object",
            "additionalProperties": False,
        },
        "Kind": {"enum": ["math", "logic"], "title": "Kind", "type": "string"},
    },
    "properties": {
        "steps": {"items": {"$ref": "#/$defs/Step"}, "title": "Steps", "type": "array"},
        "final_answer": {"title": "Final Answer", "type": "string"},
        "kind": {"$ref": "#/$defs/Kind"},
        "confidence": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
        "version": {"const": 2},
        "created": {"type": "string", "format": "date-time"},
    },
    "required": ["steps", "final_answer", "kind", "confidence", "version", "created"],
    "title": "MathReasoning",
    "type": "object",
    "additionalProperties": False,
}


@pytest.mark.parametrize("schema", [RECURSIVE, PYDANTIC_LIKE], ids=["recursive", "pydantic"])
def test_real_world_schemas_validate_and_vary_with_the_seed(schema: dict[str, Any]) -> None:
    texts = {generate_text(GuidedDecoding(json=schema), random.Random(s)) for s in range(40)}
    for text in texts:
        validate(json.loads(text), schema)
    assert len(texts) > 30, "other seeds should give other documents"


def test_json_object_is_an_object_with_keys() -> None:
    for seed in range(50):
        value = json.loads(generate_text(GuidedDecoding(json_object=True), random.Random(seed)))
        assert isinstance(value, dict) and value


def test_draft4_exclusive_bounds_and_integer_multiples() -> None:
    schema = {
        "type": "integer",
        "minimum": 3,
        "exclusiveMinimum": True,
        "maximum": 9,
        "exclusiveMaximum": True,
        "multipleOf": 2,
    }
    values = {json_value(schema, random.Random(s)) for s in range(60)}
    assert values == {4, 6, 8}
    jsonschema.Draft4Validator(schema).validate(4)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"not": {"type": "string"}}, "'not'"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"$ref": "https://example.com/schema.json"}, "local \\$refs"),
        ({"$ref": "#/$defs/Missing"}, "points nowhere"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength is above"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "bounds leave no value"),
        ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 3},
         "unique items"),
        ({"$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
                          "required": ["a"]}}, "$ref": "#/$defs/A"}, "no finite instance"),
        ({"type": "strange"}, "unknown JSON schema type"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "do not intersect"),
    ],
)  # fmt: skip
def test_what_the_mocker_cannot_generate_is_refused(schema: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):  # a 400 for the client
        json_value(schema, random.Random(0))


# -- regular expressions ---------------------------------------------------------------------------

literal_chars = st.sampled_from([*list("abcXYZ019 -_,:@"), r"\.", r"\(", r"\)", r"\*", r"\+"])
atoms = st.one_of(
    literal_chars,
    st.sampled_from(
        [
            r"\d",
            r"\w",
            r"\s",
            r"\D",
            r"\W",
            r"\S",
            ".",
            "[a-z]",
            "[A-F0-9]",
            "[^abc]",
            "[^\\d\\s]",
            "[\\w.-]",
            "[é-ü]",
            "[\u4e00-\u4e0f]",
        ]
    ),
)


def regex_composites(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    quant = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?"])
    return st.one_of(
        st.lists(children, min_size=2, max_size=4).map("".join),
        st.lists(children, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        st.tuples(children, quant).map(lambda t: f"(?:{t[0]}){t[1]}"),
        children.map(lambda x: f"({x})"),
    )


regexes = st.recursive(atoms, regex_composites, max_leaves=10)


@PROPERTY
@given(pattern=regexes, seed=st.integers(0, 2**32))
def test_generated_text_fully_matches_the_regex(pattern: str, seed: int) -> None:
    text = generate_text(GuidedDecoding(regex=pattern), random.Random(seed))
    assert re.fullmatch(pattern, text), (pattern, text)
    assert text == regex_text(pattern, random.Random(seed))


@pytest.mark.parametrize(
    "pattern",
    [
        r"\d{3}-\d{4}",
        r"(?i)hello (world|there)",
        r"^[A-Z][a-z]+, [A-Z]{2} \d{5}$",
        r"(a|b)\1c",
        r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?",
        r"(?:true|false|null)",
        r"",
    ],
)
def test_regexes_engines_take(pattern: str) -> None:
    texts = {regex_text(pattern, random.Random(s)) for s in range(30)}
    assert all(re.fullmatch(pattern, t) for t in texts)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        (r"foo(?=bar)", "look-ahead"),
        (r"(?<!x)y", "look"),
        (r"\bword\b", "assertion"),
        (r"(a)?(?(1)b|c)", "conditional"),
        (r"a$b", "no text matching"),
        (r"(unclosed", "invalid regex"),
    ],
)
def test_regexes_the_mocker_cannot_generate_are_refused(pattern: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        regex_text(pattern, random.Random(0))


# -- choices and grammars -----------------------------------------------------------------------


def test_choice_picks_each_string_by_seed() -> None:
    choices = ["red", "green", "blue sky", "a|b"]
    picks = {generate_text(GuidedDecoding(choice=choices), random.Random(s)) for s in range(60)}
    assert picks == set(choices)


JSON_GRAMMAR = r"""
# a JSON subset, recursive
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ( member ("," member)* )? "}"
member ::= string ":" value
array  ::= "[" ( value ("," value)* )? "]"
string ::= "\"" [a-zA-Z0-9 _-]{0,8} "\""
number ::= "-"? [1-9] [0-9]{0,3}
"""


def test_grammar_sentences_parse_and_vary() -> None:
    texts = {grammar_text(JSON_GRAMMAR, random.Random(s)) for s in range(200)}
    for text in texts:
        json.loads(text)
    assert len(texts) > 50
    assert any(t.startswith("{") and len(t) > 10 for t in texts)


def test_recursive_grammars_end() -> None:
    balanced = 'root ::= item+\nitem ::= "(" item* ")" | "x"'
    for s in range(100):
        text = grammar_text(balanced, random.Random(s))
        depth = 0
        for c in text:
            depth += {"(": 1, ")": -1}.get(c, 0)
            assert depth >= 0
        assert depth == 0 and re.fullmatch(r"[()x]+", text)


def test_grammar_features_match_their_regex() -> None:
    grammar = r'root ::= [A-Z] digit{2,3} ("-" | "_")? tail' + "\n" + r"digit ::= [0-9]" + "\n"
    grammar += r'tail ::= [^a-z\n]* "\x41\u00e9"'
    for s in range(100):
        assert re.fullmatch(
            r"[A-Z][0-9]{2,3}[-_]?[ -`{-~]*Aé", grammar_text(grammar, random.Random(s))
        )


@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        ('start ::= "a"', "no 'root' rule"),
        ('root ::= other "a"', "never defines it"),
        ("root ::= root", "derives no finite text"),
        ('root ::= "a" (= "b")', "look-ahead"),
        ('root ::= "a"\nroot ::= "b"', "defined twice"),
        ("root ::= [z-a]", "matches no printable character"),
        ('root "a"', "expected 'name ::= ...'"),
    ],
)
def test_grammars_the_mocker_cannot_use_are_refused(grammar: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        grammar_text(grammar, random.Random(0))
