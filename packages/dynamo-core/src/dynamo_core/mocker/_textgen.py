"""Random text from a regular expression or an EBNF grammar: the mocker's constrained output.

Both front ends build one small tree (`Lit`, `Chars`, `Seq`, `Alt`, `Rep`, `Ref`, `Group`,
`Backref`) that `Generator` walks with a `random.Random`, so a request's seed decides the text:

- `parse_regex(pattern)` reads the pattern with Python's own parser (`re._parser`, the one SGLang
  also uses to size regex stop strings), so the dialect is exactly the `re` module's; the subset
  generated is what engines' regex constraints accept (xgrammar, outlines): literals, classes and
  categories, `.`, groups, alternation, greedy/lazy/possessive quantifiers, `^`/`$` at the ends,
  and back-references. Look-around, conditionals and word boundaries are refused
  (`InvalidRequestError`, which crosses the request plane as itself); callers check the result with `re.fullmatch` and draw again when an
  anchor or a flag made it miss.
- `parse_grammar(text)` reads GBNF, the EBNF dialect xgrammar (and so vLLM, SGLang and
  TensorRT-LLM) take: ``name ::= alternatives``, ``"literals"``, ``[classes]``, ``( groups )``,
  ``* + ? {m} {m,} {m,n}``, ``#`` comments; generation starts at ``root``.

Termination. Unbounded repetition adds at most `EXTRA_REPEATS` items past its minimum. For
recursive grammars every node knows the least derivation height it needs (a fixpoint over the
rules); once a derivation is `deep_after` levels deep the generator takes, at every choice, the
alternative with the least height and the least repetition, so any grammar that derives a finite
string at all yields one, and quickly. A grammar whose root derives nothing finite is refused.

Characters: `.` and negated classes draw from printable ASCII (never a newline), so the mocker's
text stays readable; positive classes draw from exactly their ranges (surrogates excluded).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from dynamo_core.errors import InvalidRequestError

__all__ = [
    "EXTRA_REPEATS",
    "Alt",
    "Backref",
    "Chars",
    "Generator",
    "Group",
    "Lit",
    "Node",
    "Ref",
    "Rep",
    "Seq",
    "parse_grammar",
    "parse_regex",
]

#: Items an unbounded repetition (`*`, `+`, `{m,}`) adds at most past its minimum.
EXTRA_REPEATS = 3
#: Printable ASCII: what `.` and negated classes draw from.
PRINTABLE = [(0x20, 0x7E)]
_SURROGATES = (0xD800, 0xDFFF)
_MAX_UNICODE = 0x10FFFF


# -- the tree ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Lit:
    text: str


@dataclass(slots=True)
class Chars:
    """One character from the union of inclusive code-point ranges."""

    ranges: list[tuple[int, int]]


@dataclass(slots=True)
class Seq:
    items: list[Node]


@dataclass(slots=True)
class Alt:
    options: list[Node]


@dataclass(slots=True)
class Rep:
    node: Node
    lo: int
    hi: int | None
    """None: unbounded."""


@dataclass(slots=True)
class Ref:
    name: str


@dataclass(slots=True)
class Group:
    """A capturing group (a back-reference repeats its text)."""

    index: int
    node: Node


@dataclass(slots=True)
class Backref:
    index: int


Node = Lit | Chars | Seq | Alt | Rep | Ref | Group | Backref


# -- character sets -----------------------------------------------------------------------------


def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def complement(
    ranges: list[tuple[int, int]], universe: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The characters of `universe` that are not in `ranges`."""
    out: list[tuple[int, int]] = []
    taken = _normalize(ranges)
    for ulo, uhi in universe:
        lo = ulo
        for tlo, thi in taken:
            if thi < lo or tlo > uhi:
                continue
            if tlo > lo:
                out.append((lo, tlo - 1))
            lo = max(lo, thi + 1)
        if lo <= uhi:
            out.append((lo, uhi))
    return out


def _pick_char(ranges: list[tuple[int, int]], rng: random.Random) -> str:
    sizes = [hi - lo + 1 for lo, hi in ranges]
    total = sum(sizes)
    for _ in range(8):
        k = rng.randrange(total)
        for (lo, _hi), size in zip(ranges, sizes, strict=True):
            if k < size:
                code = lo + k
                break
            k -= size
        if not _SURROGATES[0] <= code <= _SURROGATES[1]:
            return chr(code)
    return chr(ranges[0][0]) if not _SURROGATES[0] <= ranges[0][0] <= _SURROGATES[1] else "a"


# -- generation -----------------------------------------------------------------------------------


@dataclass
class Generator:
    """Draws strings from a tree (and, for grammars, its rules)."""

    rules: dict[str, Node] = field(default_factory=dict)
    deep_after: int = 8
    """Derivation depth past which every choice takes the shortest way out."""
    max_pieces: int = 256
    """Output pieces (literals, characters) past which every choice takes the shortest way out:
    repetition inside recursion would otherwise grow the text exponentially with depth."""
    _heights: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _rule_heights: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rules:
            self._rule_heights = self._fixpoint()

    def generate(self, node: Node, rng: random.Random) -> str:
        if self.rules and math.isinf(self._height(node)):
            raise InvalidRequestError("the grammar derives no finite text from its root rule")
        out: list[str] = []
        self._emit(node, rng, out, {}, 0)
        return "".join(out)

    def _emit(
        self, node: Node, rng: random.Random, out: list[str], groups: dict[int, str], depth: int
    ) -> None:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, Chars):
            out.append(_pick_char(node.ranges, rng))
        elif isinstance(node, Seq):
            for item in node.items:
                self._emit(item, rng, out, groups, depth)
        elif isinstance(node, Alt):
            self._emit(self._choose(node, rng, out, depth), rng, out, groups, depth)
        elif isinstance(node, Rep):
            for _ in range(self._count(node, rng, out, depth)):
                self._emit(node.node, rng, out, groups, depth)
        elif isinstance(node, Ref):
            rule = self.rules.get(node.name)
            if rule is None:
                raise InvalidRequestError(
                    f"the grammar uses rule {node.name!r} but never defines it"
                )
            self._emit(rule, rng, out, groups, depth + 1)
        elif isinstance(node, Group):
            start = len(out)
            self._emit(node.node, rng, out, groups, depth)
            groups[node.index] = "".join(out[start:])
        else:
            out.append(groups.get(node.index, ""))

    def _shortest(self, out: list[str], depth: int) -> bool:
        return bool(self.rules) and (depth >= self.deep_after or len(out) >= self.max_pieces)

    def _choose(self, node: Alt, rng: random.Random, out: list[str], depth: int) -> Node:
        if self._shortest(out, depth):
            return min(node.options, key=self._height)
        return rng.choice(node.options)

    def _count(self, node: Rep, rng: random.Random, out: list[str], depth: int) -> int:
        if self._shortest(out, depth):
            return node.lo
        hi = node.lo + EXTRA_REPEATS if node.hi is None else node.hi
        return rng.randint(node.lo, max(node.lo, hi))

    # least derivation heights (grammars only)

    def _height(self, node: Node) -> float:
        key = id(node)
        cached = self._heights.get(key)
        if cached is None:
            cached = self._measure(node, self._rule_heights)
            self._heights[key] = cached
        return cached

    def _measure(self, node: Node, rules: dict[str, float]) -> float:
        if isinstance(node, Lit | Chars | Backref):
            return 0.0
        if isinstance(node, Seq):
            return max((self._measure(i, rules) for i in node.items), default=0.0)
        if isinstance(node, Alt):
            return min(self._measure(o, rules) for o in node.options)
        if isinstance(node, Rep):
            return 0.0 if node.lo == 0 else self._measure(node.node, rules)
        if isinstance(node, Group):
            return self._measure(node.node, rules)
        return 1.0 + rules.get(node.name, math.inf)

    def _fixpoint(self) -> dict[str, float]:
        heights = dict.fromkeys(self.rules, math.inf)
        changed = True
        while changed:
            changed = False
            for name, body in self.rules.items():
                h = self._measure(body, heights)
                if h < heights[name]:
                    heights[name] = h
                    changed = True
        return heights


# -- regular expressions ----------------------------------------------------------------------------


def _sre() -> Any:
    import re._parser as parser  # Python's regex parser (3.11+), as SGLang uses it

    return parser


_CATEGORIES: dict[str, list[tuple[int, int]]] = {
    "CATEGORY_DIGIT": [(0x30, 0x39)],
    "CATEGORY_SPACE": [(0x20, 0x20)],
    "CATEGORY_WORD": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}
# what a category matches in full, to take its complement within printable ASCII
_CATEGORY_FULL: dict[str, list[tuple[int, int]]] = {
    "DIGIT": [(0x30, 0x39)],
    "SPACE": [(0x09, 0x0D), (0x20, 0x20)],
    "WORD": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}


def _category(name: str, *, full: bool = False) -> list[tuple[int, int]]:
    """What a category generates (or, `full`, every character it matches: to negate it)."""
    negated = name.startswith("CATEGORY_NOT_")
    base = _CATEGORY_FULL.get(name.removeprefix("CATEGORY_NOT_" if negated else "CATEGORY_"))
    if base is None:
        raise InvalidRequestError(f"the mocker cannot generate the regex category {name}")
    if negated:
        return complement(base, PRINTABLE)
    return base if full else _CATEGORIES[name]


def _class(items: list[tuple[Any, Any]]) -> Chars:
    ranges: list[tuple[int, int]] = []
    negate = False
    for op, av in items:  # NEGATE, when present, comes first
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            ranges.append((av, av))
        elif name == "RANGE":
            ranges.append((av[0], av[1]))
        elif name == "CATEGORY":
            ranges.extend(_category(str(av), full=negate))
        else:
            raise InvalidRequestError(f"the mocker cannot generate the regex class item {name}")
    chosen = complement(ranges, PRINTABLE) if negate else _normalize(ranges)
    if not chosen:
        raise InvalidRequestError("a regex class matches no printable character")
    return Chars(chosen)


_REFUSED = {
    "ASSERT": "look-ahead/look-behind",
    "ASSERT_NOT": "negative look-around",
    "GROUPREF_EXISTS": "conditional groups",
}
_ANCHORS_AT_ENDS = {"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"}


def _convert(items: Any) -> Node:
    parser = _sre()
    nodes: list[Node] = []
    for op, av in items:
        name = str(op)
        if name == "LITERAL":
            if nodes and isinstance(nodes[-1], Lit):
                nodes[-1] = Lit(nodes[-1].text + chr(av))
            else:
                nodes.append(Lit(chr(av)))
        elif name == "NOT_LITERAL":
            nodes.append(Chars(complement([(av, av)], PRINTABLE)))
        elif name == "ANY":
            nodes.append(Chars(list(PRINTABLE)))
        elif name == "IN":
            nodes.append(_class(av))
        elif name == "BRANCH":
            nodes.append(Alt([_convert(branch) for branch in av[1]]))
        elif name == "SUBPATTERN":
            group, _add, _del, sub = av
            inner = _convert(sub)
            nodes.append(inner if group is None else Group(group, inner))
        elif name == "ATOMIC_GROUP":
            nodes.append(_convert(av))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            nodes.append(Rep(_convert(sub), lo, None if hi == parser.MAXREPEAT else hi))
        elif name == "GROUPREF":
            nodes.append(Backref(av))
        elif name == "AT":
            if str(av) not in _ANCHORS_AT_ENDS:
                raise InvalidRequestError(
                    f"the mocker cannot generate text for the regex assertion {av}"
                )
            # ^ and $: the output is the whole match anyway; callers check with re.fullmatch
        elif name in _REFUSED:
            raise InvalidRequestError(f"the mocker cannot generate regex {_REFUSED[name]}")
        else:
            raise InvalidRequestError(f"the mocker cannot generate the regex construct {name}")
    return nodes[0] if len(nodes) == 1 else Seq(nodes)


def parse_regex(pattern: str) -> Node:
    """The generation tree of a Python-syntax regular expression."""
    import re

    try:
        parsed = _sre().parse(pattern)
    except re.error as exc:
        raise InvalidRequestError(f"invalid regex {pattern!r}: {exc}") from None
    return _convert(parsed)


# -- GBNF grammars ------------------------------------------------------------------------------------


class _GrammarReader:
    """A recursive-descent reader of GBNF (xgrammar's EBNF)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.group_count = 0

    def fail(self, message: str) -> InvalidRequestError:
        line = self.text.count("\n", 0, self.pos) + 1
        return InvalidRequestError(f"invalid grammar (line {line}): {message}")

    def skip(self) -> None:
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c in " \t\r\n":
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos : self.pos + 1]

    def name(self) -> str | None:
        self.skip()
        start = self.pos
        text = self.text
        while self.pos < len(text) and (text[self.pos].isalnum() or text[self.pos] in "_-"):
            self.pos += 1
        return text[start : self.pos] or None

    def at_rule_start(self) -> bool:
        """Whether a new rule (``name ::=``) starts here."""
        save = self.pos
        name = self.name()
        self.skip()
        starts = name is not None and self.text.startswith("::=", self.pos)
        self.pos = save
        return starts

    def rules(self) -> dict[str, Node]:
        rules: dict[str, Node] = {}
        while self.peek():
            name = self.name()
            self.skip()
            if name is None or not self.text.startswith("::=", self.pos):
                raise self.fail("expected 'name ::= ...'")
            self.pos += 3
            if name in rules:
                raise self.fail(f"rule {name!r} is defined twice")
            rules[name] = self.alternatives()
        if "root" not in rules:
            raise InvalidRequestError("invalid grammar: it has no 'root' rule")
        return rules

    def alternatives(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(options)

    def sequence(self) -> Node:
        items: list[Node] = []
        while True:
            c = self.peek()
            if not c or c in "|)" or ((c.isalpha() or c == "_") and self.at_rule_start()):
                break
            items.append(self.postfix(self.atom()))
        return items[0] if len(items) == 1 else Seq(items)

    def atom(self) -> Node:
        c = self.peek()
        if c == '"':
            return Lit(self.quoted())
        if c == "[":
            return self.char_class()
        if c == "(":
            self.pos += 1
            if self.peek() == "=":
                raise self.fail("look-ahead assertions are not supported")
            inner = self.alternatives()
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.pos += 1
            return inner
        name = self.name()
        if name is None:
            raise self.fail(f"unexpected {c!r}")
        return Ref(name)

    def postfix(self, node: Node) -> Node:
        while True:
            c = self.text[self.pos : self.pos + 1]  # no whitespace before a suffix
            if c == "*":
                node, self.pos = Rep(node, 0, None), self.pos + 1
            elif c == "+":
                node, self.pos = Rep(node, 1, None), self.pos + 1
            elif c == "?":
                node, self.pos = Rep(node, 0, 1), self.pos + 1
            elif c == "{":
                end = self.text.find("}", self.pos)
                if end < 0:
                    raise self.fail("unclosed '{'")
                body = self.text[self.pos + 1 : end].replace(" ", "")
                lo_text, comma, hi_text = body.partition(",")
                try:
                    lo = int(lo_text)
                    hi = (None if not hi_text else int(hi_text)) if comma else lo
                except ValueError:
                    raise self.fail(f"bad repetition {{{body}}}") from None
                node, self.pos = Rep(node, lo, hi), end + 1
            else:
                return node

    def escape(self) -> str:
        """One escaped character after a backslash."""
        text = self.text
        c = text[self.pos : self.pos + 1]
        self.pos += 1
        simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "[": "[", "]": "]"}
        if c in simple:
            return simple[c]
        digits = {"x": 2, "u": 4, "U": 8}.get(c)
        if digits:
            code = text[self.pos : self.pos + digits]
            self.pos += digits
            try:
                return chr(int(code, 16))
            except ValueError:
                raise self.fail(f"bad escape \\{c}{code}") from None
        if c in "-^/":
            return c
        raise self.fail(f"unknown escape \\{c}")

    def char(self) -> str:
        c = self.text[self.pos : self.pos + 1]
        if not c:
            raise self.fail("unexpected end of grammar")
        self.pos += 1
        return self.escape() if c == "\\" else c

    def quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.text[self.pos : self.pos + 1] != '"':
            out.append(self.char())
        self.pos += 1
        return "".join(out)

    def char_class(self) -> Chars:
        self.pos += 1
        negate = self.text[self.pos : self.pos + 1] == "^"
        if negate:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        while self.text[self.pos : self.pos + 1] != "]":
            lo = ord(self.char())
            hi = lo
            if (
                self.text[self.pos : self.pos + 1] == "-"
                and self.text[self.pos + 1 : self.pos + 2] != "]"
            ):
                self.pos += 1
                hi = ord(self.char())
            ranges.append((lo, hi))
        self.pos += 1
        chosen = complement(ranges, PRINTABLE) if negate else _normalize(ranges)
        if not chosen:
            raise self.fail("a character class matches no printable character")
        return Chars(chosen)


def _refs(node: Node) -> set[str]:
    if isinstance(node, Ref):
        return {node.name}
    if isinstance(node, Seq):
        return set().union(*(_refs(i) for i in node.items))
    if isinstance(node, Alt):
        return set().union(*(_refs(o) for o in node.options))
    if isinstance(node, Rep | Group):
        return _refs(node.node)
    return set()


def parse_grammar(text: str) -> dict[str, Node]:
    """The rules of a GBNF grammar (generation starts at ``root``)."""
    rules = _GrammarReader(text).rules()
    for name, body in rules.items():
        missing = sorted(_refs(body) - set(rules))
        if missing:
            raise InvalidRequestError(
                f"invalid grammar: rule {name!r} uses rule {missing[0]!r} but never defines it"
            )
    return rules
