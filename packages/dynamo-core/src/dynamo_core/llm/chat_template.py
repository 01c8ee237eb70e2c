"""Chat templates: turn a list of OpenAI-style messages into the prompt text a model expects.

`ChatTemplate.render` gives the same string as transformers'
``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` (tests compare both on several
real-world template styles), without importing transformers. To get there it copies what
transformers sets up (``transformers.utils.chat_template_utils``):

- a jinja2 ``ImmutableSandboxedEnvironment`` (templates come from model repositories: untrusted
  code) with ``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension;
- globals ``raise_exception(msg)``, ``strftime_now(fmt)``, and the hardened ``dict``/``namespace``;
- a ``tojson`` filter that does not HTML-escape and takes ``ensure_ascii`` (default False),
  ``indent``, ``separators`` and ``sort_keys``, as ``json.dumps`` does;
- a no-op ``{% generation %}`` block (transformers uses it to find assistant tokens);
- variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
  named special tokens (``bos_token``, ``eos_token``, ...), then any extra keyword arguments
  (``enable_thinking=False``...), which override the special tokens;
- message keys whose value is None are dropped (OpenAI clients send ``"content": null`` next to
  ``tool_calls``; many templates would print "None"), and reasoning is aliased under
  ``reasoning_content`` and ``thinking``, as transformers 5 does;
- with ``tools``, a ``tool_use`` template is used when the model ships one next to ``default``.

The rendered text already holds the model's special tokens (bos included when the template writes
it), so it must be tokenized with ``add_special_tokens=False``.

Errors. A template that calls ``raise_exception("...")`` (Mistral's "roles must alternate",
for instance) raises `InvalidRequestError` with exactly that message: the request is at fault.
Any other failure while rendering (a missing key, a type the template did not expect) is also an
`InvalidRequestError`, prefixed with "chat template error". A template that does not compile is
the model's fault: `ConfigError`, raised when the `ChatTemplate` is built.

Compiled templates are cached by source text, so the many `ChatTemplate` objects built for one
model (one per model card update, say) share one compilation.

Fallback. A model without a chat template (a base model) gets `FALLBACK_TEMPLATE`: one
``role: content`` line per message (text parts of a content list joined), preceded by the bos token
when the tokenizer has one, and ``assistant:`` when a generation prompt is asked for. It is not what
any model was trained on, but it keeps chat requests to a base model working and predictable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dynamo_core.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from dynamo_core.llm.tokenizer import Tokenizer

__all__ = ["FALLBACK_TEMPLATE", "ChatTemplate"]

logger = logging.getLogger(__name__)

FALLBACK_TEMPLATE = """\
{%- if bos_token %}{{ bos_token }}{% endif %}
{%- for message in messages %}
{{- message.role + ': ' }}
{%- if message.content is string %}
{{- message.content }}
{%- elif message.content is iterable %}
{%- for part in message.content %}
{%- if part.type == 'text' %}{{ part.text }}{% endif %}
{%- endfor %}
{%- endif %}
{{- '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}assistant:{% endif %}"""

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by the template's own ``raise_exception`` call."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore attributes (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        template = _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile (line {e.lineno}): {e.message}") from e
    # Each render copies the globals into a new context; jinja keeps them as a ChainMap (the
    # environment's under the template's), whose copy costs more than the rest of a short
    # render. The environment's globals never change after `_environment()`: flatten once.
    template.globals = dict(template.globals)
    return template


def _prepare_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None values and alias reasoning fields, as transformers does before rendering."""
    prepared = {key: value for key, value in message.items() if value is not None}
    reasoning = next(
        (prepared[key] for key in _REASONING_FIELDS if prepared.get(key) is not None), None
    )
    if reasoning is not None:
        prepared = {"thinking": reasoning, **prepared, "reasoning_content": reasoning}
    return prepared


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        tool_use_source: str | None = None,
        is_fallback: bool = False,
    ) -> None:
        self.source = source
        self.tool_use_source = tool_use_source
        self.is_fallback = is_fallback
        variables: dict[str, Any] = dict(special_tokens or {})
        if bos_token is not None:
            variables["bos_token"] = bos_token
        if eos_token is not None:
            variables["eos_token"] = eos_token
        self._variables = variables
        # Compile now: a broken template fails when the model loads, not on the first request.
        self._template = _compile(source)
        self._tool_use_template = _compile(tool_use_source) if tool_use_source else None

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> ChatTemplate:
        """The tokenizer's template, or `FALLBACK_TEMPLATE` (logged) when it has none."""
        templates = tok.chat_templates
        source = templates.get("default")
        is_fallback = source is None
        if source is None:
            if templates:
                # Only named templates and none called "default": take the first, as a user would.
                source = next(iter(templates.values()))
                is_fallback = False
            else:
                logger.warning(
                    "%s has no chat template; using the plain 'role: content' fallback",
                    tok.name_or_path or "tokenizer",
                )
                source = FALLBACK_TEMPLATE
        return cls(
            source,
            special_tokens=tok.special_tokens,
            tool_use_source=templates.get("tool_use"),
            is_fallback=is_fallback,
        )

    @classmethod
    def fallback(cls, *, bos_token: str | None = None) -> ChatTemplate:
        return cls(FALLBACK_TEMPLATE, bos_token=bos_token, is_fallback=True)

    @property
    def variables(self) -> dict[str, Any]:
        """The special-token variables every render gets (``bos_token``, ``eos_token``, ...)."""
        return dict(self._variables)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`, as ``apply_chat_template(tokenize=False)`` gives it.

        `tools` are JSON schemas (OpenAI's ``{"type": "function", "function": {...}}``);
        `extra` becomes template variables (``enable_thinking=False``, ``date_string=...``).
        """
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        template = self._template
        if tools is not None and self._tool_use_template is not None:
            template = self._tool_use_template
        context = {**self._variables, **extra}
        try:
            return template.render(
                messages=[_prepare_message(m) for m in messages],
                tools=None if tools is None else list(tools),
                documents=None if documents is None else list(documents),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except _TemplateRaised as e:
            raise InvalidRequestError(e.message or "chat template rejected the messages") from e
        except InvalidRequestError:
            raise
        except (
            jinja2.exceptions.TemplateError,
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
        ) as e:
            raise InvalidRequestError(f"chat template error: {e}") from e

    def __repr__(self) -> str:
        kind = "fallback" if self.is_fallback else f"{len(self.source)} chars"
        return f"ChatTemplate({kind})"
