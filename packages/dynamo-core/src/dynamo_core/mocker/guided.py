"""Text that satisfies a structured-output constraint: how the mocker honours `GuidedDecoding`.

`generate_text(guided, rng)` returns what a constrained engine could answer: a JSON document
valid against the schema (`json`), any JSON object (`json_object`), a full match of the regex
(`regex`), one of the strings (`choice`), or a sentence of the grammar (`grammar`). Everything is
a pure function of the constraint and the `random.Random` it is given: the mocker seeds it from
the request (its seed and prompt), so a request always gets the same answer and another seed
another one. What the mocker cannot generate raises `InvalidRequestError` (the client gets a 400
saying which keyword or construct), never text that would not satisfy the constraint.

JSON Schema support (what structured-output users send: pydantic models, OpenAI strict schemas,
hand-written ones):

- `type` (one or a list), `enum`, `const`, `$ref` to ``#``, ``#/$defs/...``,
  ``#/definitions/...`` (JSON pointers; recursion is fine), `anyOf`, `oneOf` (one branch is
  generated, as xgrammar treats it: branches that overlap are the schema's business), `allOf`
  (merged: properties, required, bounds, types, enums);
- objects: `properties`, `required`, `additionalProperties` (false, true or a schema; extra keys
  only when `minProperties` asks for them), `unevaluatedProperties: false`, `patternProperties`
  (a property whose name matches also satisfies that schema), `minProperties`/`maxProperties`;
- arrays: `items`, `prefixItems` (and the older list form of `items` with `additionalItems`),
  `minItems`/`maxItems`, `uniqueItems`;
- strings: `minLength`/`maxLength`, `pattern` (by the regex generator; a pattern is searched,
  so its text may sit inside a longer string), `format` (date-time, date, time, email, uuid, uri,
  hostname, ipv4, ipv6, duration; other formats are free text, as engines treat them);
- numbers and integers: `minimum`/`maximum`, `exclusiveMinimum`/`exclusiveMaximum` (numbers, or
  draft 4 booleans), `multipleOf`; `boolean`, `null`; annotations (`title`, `description`,
  `default`, `examples`, ...) are ignored.

Refused: `not`, `if`/`then`/`else`, `dependentRequired`, `dependentSchemas`, `dependencies`,
`propertyNames`, `contains`, `unevaluatedItems`, `$dynamicRef`, remote `$ref`s.

Sizes stay small (a few optional properties, up to three extra array items, short strings), and
past a depth or size budget only what is required is generated, so recursive schemas end. The JSON
text is `json.dumps` with its default separators (``", "`` and ``": "``) and no ASCII escaping.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from typing import Any

from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.protocol import GuidedDecoding
from dynamo_core.mocker._textgen import Generator, Node, Ref, parse_grammar, parse_regex

__all__ = [
    "generate_text",
    "grammar_text",
    "json_value",
    "regex_text",
]

#: Draws before the regex generator gives up on a pattern whose anchors or flags it missed.
REGEX_ATTEMPTS = 32
#: Schema depth past which only required parts are generated; and the hard limit.
_DEEP = 4
_TOO_DEEP = 48
#: Values generated past which only required parts are generated.
_BIG = 200

_WORDS = (
    "alpha bravo cedar delta ember fjord grove harbor iris juniper kestrel lumen meadow north "
    "opal prism quartz river sierra tundra umber violet willow xenon yarrow zephyr"
).split()

_UNSUPPORTED = {
    "not": "'not'",
    "if": "'if'/'then'/'else'",
    "then": "'if'/'then'/'else'",
    "else": "'if'/'then'/'else'",
    "dependentRequired": "'dependentRequired'",
    "dependentSchemas": "'dependentSchemas'",
    "dependencies": "'dependencies'",
    "propertyNames": "'propertyNames'",
    "contains": "'contains'",
    "unevaluatedItems": "'unevaluatedItems'",
    "$dynamicRef": "'$dynamicRef'",
    "$recursiveRef": "'$recursiveRef'",
}
_LOWER_BOUNDS = ("minimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "maxLength", "maxItems", "maxProperties")
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


class _TooDeep(Exception):
    """A branch that does not end within the depth limit (another branch may)."""


# -- entry points ---------------------------------------------------------------------------------


def generate_text(guided: GuidedDecoding, rng: random.Random) -> str:
    """The text a constrained engine could answer for `guided`, drawn with `rng`."""
    kind = guided.kind
    if kind == "json":
        assert guided.json is not None
        return _dump(json_value(guided.json, rng))
    if kind == "json_object":
        return _dump(json_value({"type": "object", "minProperties": 1}, rng))
    if kind == "regex":
        assert guided.regex is not None
        return regex_text(guided.regex, rng)
    if kind == "choice":
        assert guided.choice is not None
        return rng.choice(guided.choice)
    assert guided.grammar is not None
    return grammar_text(guided.grammar, rng)


def regex_text(pattern: str, rng: random.Random, *, search: bool = False) -> str:
    """A string the whole of which matches `pattern` (`search`: one that contains a match,
    JSON Schema's rule for `pattern`)."""
    node, compiled = _regex(pattern)
    check = compiled.search if search else compiled.fullmatch
    gen = _REGEX_GENERATOR
    for _ in range(REGEX_ATTEMPTS):
        text = gen.generate(node, rng)
        if check(text):
            return text
    raise InvalidRequestError(
        f"the mocker found no text matching the regex {pattern!r} (anchors or flags inside it?)"
    )


def grammar_text(grammar: str, rng: random.Random) -> str:
    """A sentence of a GBNF grammar, derived from its ``root`` rule."""
    return _grammar(grammar).generate(Ref("root"), rng)


def json_value(schema: Any, rng: random.Random) -> Any:
    """A JSON value (Python objects) valid against `schema`."""
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("a JSON schema must be an object (or a boolean)")
    gen = _SchemaGen(schema, rng)
    try:
        return gen.value(schema, 0)
    except _TooDeep:
        raise InvalidRequestError(
            "the JSON schema has no finite instance within the mocker's depth limit"
        ) from None
    except RecursionError:
        raise InvalidRequestError("the JSON schema's references do not end") from None


# -- caches ---------------------------------------------------------------------------------------

_REGEX_GENERATOR = Generator()


@lru_cache(maxsize=256)
def _regex(pattern: str) -> tuple[Node, re.Pattern[str]]:
    node = parse_regex(pattern)
    return node, re.compile(pattern)


@lru_cache(maxsize=64)
def _grammar(grammar: str) -> Generator:
    return Generator(parse_grammar(grammar))


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- JSON Schema ------------------------------------------------------------------------------------


def _pointer(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        raise InvalidRequestError(f"the mocker resolves only local $refs, not {ref!r}")
    node = root
    for raw in filter(None, ref[1:].split("/")):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise InvalidRequestError(f"the JSON schema's $ref {ref!r} points nowhere")
    return node


def _types(schema: dict[str, Any]) -> list[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in _TYPES:
            raise InvalidRequestError(f"unknown JSON schema type {k!r}")
    return kinds


def _intersect_types(a: list[str], b: list[str]) -> list[str]:
    out = [t for t in a if t in b]
    if "integer" in a and "number" in b and "integer" not in out:
        out.append("integer")
    if "number" in a and "integer" in b and "integer" not in out:
        out.append("integer")
    return out


class _SchemaGen:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.count = 0

    # schemas

    def resolve(self, schema: Any, hops: int = 0) -> Any:
        """`schema` with its `$ref` (and `allOf`) folded in."""
        if not isinstance(schema, dict):
            return schema
        if "$ref" in schema:
            if hops > 64:
                raise InvalidRequestError("the JSON schema's $refs form a loop")
            target = self.resolve(_pointer(self.root, schema["$ref"]), hops + 1)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = self.merge(target, rest) if _constraining(rest) else target
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged = self.merge(merged, self.resolve(part, hops + 1))
            schema = merged
        return schema

    def merge(self, a: Any, b: Any) -> Any:
        """One schema that both `a` and `b` accept (for `allOf`)."""
        if a is True or a == {}:
            return b
        if b is True or b == {}:
            return a
        if a is False or b is False:
            return False
        a, b = self.resolve(a), self.resolve(b)
        out = dict(a)
        for key, value in b.items():
            if key not in out or out[key] == value:
                out[key] = value
            elif key == "properties":
                props = dict(out[key])
                for name, sub in value.items():
                    props[name] = {"allOf": [props[name], sub]} if name in props else sub
                out[key] = props
            elif key == "required":
                out[key] = list(dict.fromkeys([*out[key], *value]))
            elif key == "type":
                kinds = _intersect_types(_types(out) or [], _types(b) or [])
                if not kinds:
                    raise InvalidRequestError("allOf asks for types that do not intersect")
                out[key] = kinds
            elif key in _LOWER_BOUNDS or (
                key == "exclusiveMinimum" and not isinstance(value, bool)
            ):
                out[key] = max(out[key], value)
            elif key in _UPPER_BOUNDS or (
                key == "exclusiveMaximum" and not isinstance(value, bool)
            ):
                out[key] = min(out[key], value)
            elif key == "enum":
                out[key] = [v for v in out[key] if v in value]
            elif key in ("additionalProperties", "items", "unevaluatedProperties"):
                out[key] = False if False in (out[key], value) else {"allOf": [out[key], value]}
            elif key in ("title", "description", "default", "examples", "$comment", "$schema"):
                pass
            else:
                raise InvalidRequestError(f"the mocker cannot merge allOf parts on {key!r}")
        return out

    # values

    def value(self, schema: Any, depth: int) -> Any:
        if depth > _TOO_DEEP:
            raise _TooDeep
        self.count += 1
        if schema is True:
            return self.anything(depth)
        if schema is False:
            raise InvalidRequestError("the JSON schema 'false' accepts nothing")
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"not a JSON schema: {schema!r}")
        schema = self.resolve(schema)
        if schema is False:
            raise InvalidRequestError("the JSON schema's allOf accepts nothing")
        for key in schema:
            if key in _UNSUPPORTED:
                raise InvalidRequestError(
                    f"the mocker cannot generate JSON for the schema keyword {_UNSUPPORTED[key]}"
                )
        if "anyOf" in schema or "oneOf" in schema:
            return self.branch(schema, depth)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.enum(schema)
        kinds = _types(schema) or _implied_types(schema)
        if kinds is None:
            return self.anything(depth)
        kind = self.pick_type(kinds, depth)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return self.number(schema, integer=kind == "integer")
        if kind == "boolean":
            return self.rng.random() < 0.5
        return None

    def shallow(self, depth: int) -> bool:
        return depth >= _DEEP or self.count >= _BIG

    def pick_type(self, kinds: list[str], depth: int) -> str:
        if self.shallow(depth):
            for simple in ("null", "boolean", "integer", "number", "string"):
                if simple in kinds:
                    return simple
        return self.rng.choice(kinds)

    def branch(self, schema: dict[str, Any], depth: int) -> Any:
        key = "anyOf" if "anyOf" in schema else "oneOf"
        rest = {k: v for k, v in schema.items() if k != key}
        options = list(schema[key])
        if not options:
            raise InvalidRequestError(f"{key} with no schemas accepts nothing")
        self.rng.shuffle(options)
        if self.shallow(depth):  # the branches that need the least first
            options.sort(key=lambda o: not _is_leaf(self.resolve(o)))
        last: Exception | None = None
        for option in options:
            try:
                return self.value(
                    self.merge(rest, option) if _constraining(rest) else option, depth + 1
                )
            except _TooDeep as exc:
                last = exc
        assert last is not None
        raise last

    def enum(self, schema: dict[str, Any]) -> Any:
        values = list(schema["enum"])
        kinds = _types(schema)
        if kinds is not None:
            values = [
                v
                for v in values
                if _json_type(v) in kinds or (_json_type(v) == "integer" and "number" in kinds)
            ]
        if not values:
            raise InvalidRequestError("the schema's enum has no value of its type")
        return self.rng.choice(values)

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        rng = self.rng
        props: dict[str, Any] = schema.get("properties") or {}
        required = list(dict.fromkeys(schema.get("required") or ()))
        extra = schema.get("additionalProperties", schema.get("unevaluatedProperties", True))
        patterns: dict[str, Any] = schema.get("patternProperties") or {}
        lo = schema.get("minProperties", 0)
        hi = schema.get("maxProperties")
        if hi is not None and len(required) > hi:
            raise InvalidRequestError("the schema requires more properties than maxProperties")
        optional = [p for p in props if p not in required]
        shallow = self.shallow(depth)
        chosen = [p for p in optional if not shallow and rng.random() < 0.5]
        room = math.inf if hi is None else hi - len(required)
        missing = [p for p in optional if p not in chosen]
        rng.shuffle(missing)
        while len(required) + len(chosen) < lo and missing:
            chosen.append(missing.pop())
        chosen = chosen[: int(min(room, len(chosen)))]
        keys = [p for p in props if p in required or p in chosen]
        keys += [r for r in required if r not in props]
        if len(keys) < lo:
            if extra is False:
                raise InvalidRequestError(
                    "the schema asks for more properties (minProperties) than it allows"
                )
            keys += self.extra_keys(lo - len(keys), set(keys) | set(props), patterns)
        out: dict[str, Any] = {}
        for key in keys:
            parts = [props[key]] if key in props else []
            parts += [s for pat, s in patterns.items() if re.search(pat, key)]
            if not parts:
                parts = [True if extra is False or extra is None else extra]
            sub: Any = parts[0]
            for part in parts[1:]:
                sub = self.merge(sub, part)
            out[key] = self.value(sub, depth + 1)
        return out

    def extra_keys(self, n: int, taken: set[str], patterns: dict[str, Any]) -> list[str]:
        keys: list[str] = []
        i = 0
        while len(keys) < n:
            key = f"{self.rng.choice(_WORDS)}_{i}"
            i += 1
            if key not in taken and not any(re.search(p, key) for p in patterns):
                keys.append(key)
                taken.add(key)
        return keys

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # the draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = list(prefix or ())
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        top = (max(lo, len(prefix)) + 3) if hi is None else hi
        if hi is not None and lo > hi:
            raise InvalidRequestError("the schema's minItems is above its maxItems")
        n = lo if self.shallow(depth) else self.rng.randint(lo, max(lo, top))
        unique = bool(schema.get("uniqueItems"))
        out: list[Any] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            i = len(out)
            sub = prefix[i] if i < len(prefix) else items
            value = self.value(sub, depth + 1)
            if unique:
                key = json.dumps(value, sort_keys=True)
                if key in seen:
                    tries += 1
                    if tries > 32:
                        if len(out) >= lo:
                            break
                        raise InvalidRequestError("the mocker could not draw enough unique items")
                    continue
                seen.add(key)
            out.append(value)
        return out

    def string(self, schema: dict[str, Any]) -> str:
        lo = schema.get("minLength", 0)
        hi = schema.get("maxLength")
        if hi is not None and lo > hi:
            raise InvalidRequestError("the schema's minLength is above its maxLength")
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        for _ in range(REGEX_ATTEMPTS):
            if pattern is not None:
                text = regex_text(pattern, self.rng, search=True)
            elif isinstance(fmt, str) and fmt in _FORMATS:
                text = _FORMATS[fmt](self.rng)
            else:
                return self.words(lo, hi)
            if len(text) < lo and pattern is not None and not _anchored(pattern):
                text += self.words(lo - len(text), lo - len(text))
            if lo <= len(text) and (hi is None or len(text) <= hi):
                return text
        raise InvalidRequestError(
            "the mocker found no string that meets the schema's pattern/format and length"
        )

    def words(self, lo: int, hi: int | None) -> str:
        rng = self.rng
        top = hi if hi is not None else max(lo, 24)
        n = rng.randint(lo, max(lo, min(top, lo + 24)))
        text = ""
        while len(text) < n:
            text += (" " if text else "") + rng.choice(_WORDS)
        return text[:n]

    def number(self, schema: dict[str, Any], *, integer: bool) -> int | float:
        lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum", max)
        hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum", min)
        step = schema.get("multipleOf")
        if integer:
            ilo = None if lo is None else math.floor(lo) + 1 if lo_open else math.ceil(lo)
            ihi = None if hi is None else math.ceil(hi) - 1 if hi_open else math.floor(hi)
            return self.integer(ilo, ihi, step)
        return self.real(lo, lo_open, hi, hi_open, step)

    def integer(self, lo: int | None, hi: int | None, step: Any) -> int:
        if lo is None:
            lo = 0 if hi is None or hi >= 0 else hi - 100
        if hi is None:
            hi = lo + 100
        if lo > hi:
            raise InvalidRequestError("the schema's integer bounds leave no value")
        if step is None:
            return self.rng.randint(lo, hi)
        # an integer k * step within [lo, hi] (step may be a fraction: k then a multiple of it)
        frac = Fraction(str(step))
        unit = frac.numerator  # the smallest integer multiple of step, when step = p/q
        kmin, kmax = -(-lo // unit), hi // unit
        if kmin > kmax:
            raise InvalidRequestError("no integer multiple of multipleOf fits the bounds")
        return self.rng.randint(kmin, kmax) * unit

    def real(
        self, lo: float | None, lo_open: bool, hi: float | None, hi_open: bool, step: Any
    ) -> float | int:
        rng = self.rng
        if lo is None:
            lo = 0.0 if hi is None or hi > 0 else hi - 100.0
            lo_open = False
        if hi is None:
            hi = lo + 100.0
            hi_open = False
        if lo > hi or (lo == hi and (lo_open or hi_open)):
            raise InvalidRequestError("the schema's number bounds leave no value")

        def inside(v: float) -> bool:
            above = v > lo if lo_open else v >= lo
            below = v < hi if hi_open else v <= hi
            return above and below

        if step is not None:
            frac = Fraction(str(step))
            kmin, kmax = math.ceil(Fraction(str(lo)) / frac), math.floor(Fraction(str(hi)) / frac)
            picks = {kmin, kmin + 1, kmax - 1, kmax, rng.randint(kmin, max(kmin, kmax))}
            candidates = sorted(k for k in picks if kmin <= k <= kmax)
            rng.shuffle(candidates)
            for k in [*candidates, 0]:
                v = float(frac * k)
                # the float a JSON reader gets must divide exactly, as validators check it
                if inside(v) and (v / float(step)).is_integer():
                    return int(v) if v.is_integer() else v
            raise InvalidRequestError("no multiple of multipleOf fits the number bounds")
        for _ in range(16):
            v = round(rng.uniform(lo, hi), 2)
            if inside(v):
                return v
        mid = (lo + hi) / 2
        if inside(mid):
            return mid
        raise InvalidRequestError("the schema's number bounds leave no value")

    def anything(self, depth: int) -> Any:
        rng = self.rng
        kinds = ["string", "integer", "number", "boolean", "null"]
        if not self.shallow(depth):
            kinds += ["object", "array"]
        kind = rng.choice(kinds)
        if kind == "object":
            n = rng.randint(0, 3)
            return {k: self.anything(depth + 1) for k in self.extra_keys(n, set(), {})}
        if kind == "array":
            return [self.anything(depth + 1) for _ in range(rng.randint(0, 3))]
        return self.value({"type": kind}, depth)


def _constraining(schema: dict[str, Any]) -> bool:
    """Whether a schema's keywords say anything beyond annotations."""
    return any(
        k
        not in (
            "title",
            "description",
            "default",
            "examples",
            "$comment",
            "$schema",
            "$id",
            "$defs",
            "definitions",
            "deprecated",
            "readOnly",
            "writeOnly",
            "discriminator",
        )
        for k in schema
    )


def _implied_types(schema: dict[str, Any]) -> list[str] | None:
    keys = set(schema)
    if keys & {
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
    }:
        return ["object"]
    if keys & {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems"}:
        return ["array"]
    if keys & {"minLength", "maxLength", "pattern", "format"}:
        return ["string"]
    if keys & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}:
        return ["number"]
    return None


def _is_leaf(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    kinds = _types(schema) or []
    return (
        "null" in kinds
        or "const" in schema
        or "enum" in schema
        or bool(kinds and not {"object", "array"} & set(kinds))
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bound(
    schema: dict[str, Any], inclusive: str, exclusive: str, tighter: Any
) -> tuple[float | None, bool]:
    """A numeric bound and whether it is exclusive (draft 2020 numbers, draft 4 booleans)."""
    value = schema.get(inclusive)
    ex = schema.get(exclusive)
    if isinstance(ex, bool):
        return value, ex and value is not None
    if ex is None:
        return value, False
    if value is None or tighter(value, ex) == ex:
        return ex, True  # the exclusive bound is the tighter one (or the same number)
    return value, False


def _anchored(pattern: str) -> bool:
    return pattern.startswith("^") or pattern.endswith("$")


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1990, 2035):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[rng.randrange(4)]}{h[17:20]}-{h[20:]}"


_FORMATS: dict[str, Callable[[random.Random], str]] = {
    "date-time": lambda rng: f"{_date(rng)}T{_time(rng)}",
    "date": _date,
    "time": _time,
    "email": lambda rng: f"{rng.choice(_WORDS)}@example.com",
    "uuid": _uuid,
    "uri": lambda rng: f"https://example.com/{rng.choice(_WORDS)}",
    "hostname": lambda rng: f"{rng.choice(_WORDS)}.example.com",
    "ipv4": lambda rng: ".".join(str(rng.randint(1, 254)) for _ in range(4)),
    "ipv6": lambda rng: f"2001:db8::{rng.randint(1, 0xFFFF):x}",
    "duration": lambda rng: f"P{rng.randint(1, 30)}D",
}
