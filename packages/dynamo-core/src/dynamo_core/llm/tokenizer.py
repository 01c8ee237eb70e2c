"""A model's tokenizer, read straight from its Hugging Face files with `tokenizers`.

`Tokenizer.from_dir(path)` reads what a model directory (or a `ModelCard`'s tokenizer path) holds:

- ``tokenizer.json``: the fast tokenizer itself (`tokenizers.Tokenizer`, exposed as `.backend`);
- ``tokenizer_config.json``: bos/eos tokens, ``model_max_length``, the chat template;
- ``generation_config.json`` (optional): extra eos ids. Chat models often end a turn with a token
  (``<|im_end|>``, ``<|eot_id|>``) that is not the tokenizer's ``eos_token``; `eos_token_ids` is the
  union of both files, so a worker stops on either;
- ``chat_template.jinja`` (optional): newer checkpoints keep the template in its own file, which
  then wins over the one in ``tokenizer_config.json``. A template given as a list of named
  templates (``[{"name": "default", ...}, {"name": "tool_use", ...}]``) is kept by name in
  `chat_templates`; `chat_template` is the ``default`` one.

transformers is not needed (the frontend must start fast and stay light). `encode`/`decode` match
`PreTrainedTokenizerFast` with ``clean_up_tokenization_spaces=False``, which is what Llama-3, Qwen
and most recent models ship; the cleanup step (``" ." -> "."``) is deliberately not reproduced.

Long texts. `tokenizers.Tokenizer.encode` holds the GIL for the whole encoding (about a second
per MB): run in a thread it still stalls the event loop. `encode_batch` releases it, so every
encoding of a long text here goes through `encode_batch([text])`; what still needs the GIL (the
list of ids, freeing the Rust encoding) is proportional to the token count. Short texts are encoded
inline: a thread hop costs more (tens of microseconds) than encoding a few hundred bytes.
`encode_async` picks by length (`ASYNC_ENCODE_THRESHOLD` characters). Long texts use
`encode_batch_fast`, which skips the offsets nobody here reads: it is several times faster and
its result costs nothing to free.

One token on its own, for log-probabilities: `token_string` is the text vLLM shows for it
(``decode([id])``, with the leading space a SentencePiece ``▁`` stands for put back), and
`token_bytes` the bytes it stands for in a sequence. The two differ for a token holding part of a
character: its string ends in U+FFFD, its bytes are the real ones (what OpenAI's ``bytes`` field
is for). Both read the token's vocabulary piece by the tokenizer's kind (byte-level BPE maps each
character back to a byte, byte fallback spells a byte ``<0xE4>``, Metaspace marks a space ``▁``);
both are cached per id.

Bounded work. A prompt only matters up to the model's context length, so `encode_within(text,
limit)` never tokenizes much more than `limit` tokens' worth of text: it encodes growing prefixes
(cut just before a whitespace, where pre-tokenizers split, so a prefix's tokens are the first
tokens of the whole text) and stops as soon as a prefix has more than `limit` tokens. A 30 MB
prompt for a 32k-token model costs what a few hundred KB cost, in time and in memory (a full
encoding holds about 200 bytes per token in Rust and Python objects).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import tokenizers

__all__ = ["ASYNC_ENCODE_THRESHOLD", "Encoded", "Tokenizer"]

logger = logging.getLogger(__name__)

#: Texts longer than this (in characters) are encoded in a worker thread by `encode_async`.
ASYNC_ENCODE_THRESHOLD = 4096

#: `encode_within`'s first prefix, in characters per token of the limit (English averages about 4).
_PROBE_CHARS_PER_TOKEN = 4
#: How far back from a prefix's end `encode_within` looks for whitespace to cut at.
_CUT_WINDOW = 1024


class Encoded(NamedTuple):
    """What `Tokenizer.encode_within` found."""

    ids: list[int]
    """The text's token ids; when not `complete`, those of a prefix (more than the limit)."""
    complete: bool
    """False: the text was not tokenized to its end: a prefix already exceeds the limit."""


def _cut(text: str, end: int) -> tuple[int, bool]:
    """Where to end a prefix of about `end` characters: before a whitespace when there is one
    close by (a pre-token boundary: exact counts), else at `end` (the last word may differ)."""
    low = max(0, end - _CUT_WINDOW)
    at = max(text.rfind(" ", low, end), text.rfind("\n", low, end))
    if at > low:
        return at, True
    return end, False


# transformers' sentinel for "no limit" (int(1e30)); treated as unknown here.
_VERY_LARGE_INTEGER = int(1e20)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (byte-level BPE pieces)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _has_type(component: Any, kind: str) -> Any:
    """The first part of type `kind` in a tokenizer.json component (a `Sequence` searched)."""
    if not isinstance(component, dict):
        return None
    if component.get("type") == kind:
        return component
    for part in component.get("decoders") or component.get("pretokenizers") or ():
        found = _has_type(part, kind)
        if found is not None:
            return found
    return None


class _Pieces:
    """How one tokenizer's vocabulary pieces map to bytes (read once from tokenizer.json)."""

    __slots__ = ("byte_fallback", "byte_level", "space_marker")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.byte_level = _has_type(spec.get("decoder"), "ByteLevel") is not None
        model = spec.get("model") or {}
        self.byte_fallback = bool(model.get("byte_fallback"))
        metaspace = _has_type(spec.get("pre_tokenizer"), "Metaspace")
        self.space_marker: str | None = (
            metaspace.get("replacement", "▁") if metaspace is not None else None
        )

    def piece_bytes(self, piece: str) -> bytes | None:
        """The bytes a vocabulary piece stands for, or None when its kind is unknown."""
        if self.byte_level:
            try:
                return bytes(_BYTE_LEVEL[c] for c in piece)
            except KeyError:
                return None
        if self.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece[5] == ">":
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        if self.space_marker is not None:
            return piece.replace(self.space_marker, " ").encode()
        return None


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _parse_chat_templates(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        named = {}
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                named[str(item.get("name", "default"))] = item["template"]
        return named
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items() if isinstance(v, str)}
    return {}


class Tokenizer:
    """Encode and decode text for one model; see the module docstring for the files it reads."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        name_or_path: str | None = None,
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        self._config: dict[str, Any] = dict(config or {})
        gen = generation_config or {}

        self._bos_token = _token_content(self._config.get("bos_token"))
        self._eos_token = _token_content(self._config.get("eos_token"))

        self._chat_templates = _parse_chat_templates(self._config.get("chat_template"))
        if chat_template is not None:
            self._chat_templates["default"] = chat_template

        eos_ids: list[int] = []
        if self._eos_token is not None:
            eos_id = backend.token_to_id(self._eos_token)
            if eos_id is not None:
                eos_ids.append(eos_id)
        for token_id in _as_id_list(gen.get("eos_token_id")):
            if token_id not in eos_ids:
                eos_ids.append(token_id)
        self._eos_token_ids = eos_ids

        self._special_token_ids = frozenset(
            token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._added_ids = frozenset(backend.get_added_tokens_decoder())
        self._pieces: _Pieces | None = None
        self._strings: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        self._alone: tuple[dict[int, str], dict[int, str]] = ({}, {})
        # without offsets: 5x faster on long texts, and its result is freed at once (the full
        # encoding's per-token strings take longer to free than to compute, with the GIL held)
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory holding ``tokenizer.json`` (see the module docstring)."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(root / "tokenizer_config.json")
        generation_config = _read_json(root / "generation_config.json")
        template_file = root / "chat_template.jinja"
        chat_template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        )
        tok = cls(
            backend,
            config=config,
            generation_config=generation_config,
            chat_template=chat_template,
            name_or_path=str(root),
        )
        logger.debug(
            "loaded tokenizer from %s (vocab %d, eos ids %s)",
            root,
            tok.vocab_size,
            tok.eos_token_ids,
        )
        return tok

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the post-processor's bos/eos too."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_released(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`encode`, with the GIL released while Rust works (for long texts, off the loop)."""
        encoding = self._encode_batch([text], add_special_tokens=add_special_tokens)[0]
        ids: list[int] = encoding.ids
        return ids

    async def encode_async(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`encode`, in a worker thread when `text` is long enough to stall the event loop."""
        if len(text) <= ASYNC_ENCODE_THRESHOLD:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode_released, text, add_special_tokens)

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = False) -> Encoded:
        """`text`'s token ids, or a prefix's once they number more than `limit`: the work is
        bounded by `limit`, not by the text. `complete` says which (the whole text's ids may
        still exceed `limit` by a little: the caller checks their count).

        Blocking for long texts: call it from a thread (see the module docstring).
        """
        encode = self.encode if len(text) <= ASYNC_ENCODE_THRESHOLD else self.encode_released
        size = max(ASYNC_ENCODE_THRESHOLD, limit * _PROBE_CHARS_PER_TOKEN)
        # past a cut inside a word, the prefix's last word may take a few more tokens than it does
        # in the whole text: leave room for that before calling the text too long
        margin = max(16, limit // 16)
        while size < len(text):
            end, exact = _cut(text, size)
            ids = encode(text[:end], add_special_tokens)
            if len(ids) > limit + (0 if exact else margin):
                return Encoded(ids, complete=False)
            size *= 2
        return Encoded(encode(text, add_special_tokens), complete=True)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def alone_texts(self, skip_special_tokens: bool) -> dict[int, str]:
        """``decode([id])`` by id, for the caller to fill as it goes (the incremental
        detokenizer's window is one id after most tokens: a dict lookup instead of a decode)."""
        return self._alone[skip_special_tokens]

    def token_string(self, token_id: int) -> str:
        """The text vLLM shows for one token in log-probabilities (see the module docstring)."""
        text = self._strings.get(token_id)
        if text is None:
            text = self.decode([token_id], skip_special_tokens=False)
            marker = self._piece_kinds().space_marker
            piece = self.backend.id_to_token(token_id)
            if marker is not None and piece:
                # decode() drops the leading space of a sequence's first token: put it back
                wanted = len(piece) - len(piece.lstrip(marker))
                missing = wanted - (len(text) - len(text.lstrip(" ")))
                if missing > 0:
                    text = " " * missing + text
            self._strings[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in a sequence (part of a character included)."""
        data = self._bytes.get(token_id)
        if data is None:
            piece = self.backend.id_to_token(token_id)
            if piece is None:
                data = b""
            elif token_id in self._added_ids:
                data = piece.encode()  # added tokens are stored as their text
            else:
                data = self._piece_kinds().piece_bytes(piece)
                if data is None:
                    data = self.decode([token_id], skip_special_tokens=False).encode()
            self._bytes[token_id] = data
        return data

    def _piece_kinds(self) -> _Pieces:
        if self._pieces is None:
            self._pieces = _Pieces(json.loads(self.backend.to_str()))
        return self._pieces

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self.backend.token_to_id(token)
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self.backend.id_to_token(token_id)
        return token

    # -- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what the model's embedding must cover)."""
        return self._vocab_size

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        return None if self._bos_token is None else self.token_to_id(self._bos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer's eos id, then generation_config's eos ids, without duplicates."""
        return list(self._eos_token_ids)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (skipped by ``decode(skip_special_tokens=True)``)."""
        return self._special_token_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens from tokenizer_config.json (``bos_token``, ``eos_token``, ...).

        These are the variables transformers passes to a chat template.
        """
        named: dict[str, str] = {}
        for key in (
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ):
            content = _token_content(self._config.get(key))
            if content is not None:
                named[key] = content
        return named

    @property
    def model_max_length(self) -> int | None:
        """``model_max_length`` from tokenizer_config.json, or None when absent or unbounded."""
        value = self._config.get("model_max_length")
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value < _VERY_LARGE_INTEGER
        ):
            return int(value)
        return None

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None when the model has none."""
        return self._chat_templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every named chat template (``default``, ``tool_use``, ...)."""
        return dict(self._chat_templates)

    @property
    def config(self) -> dict[str, Any]:
        """The raw tokenizer_config.json content."""
        return self._config

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"
