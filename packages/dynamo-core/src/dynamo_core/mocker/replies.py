"""What the mocker says when it is not drawing random tokens: a scripted reply or constrained text.

`Replies.tokens(request)` decides, once per request, before the engine runs it:

1. with a reply script (`--reply-script`), the first rule matching the prompt gives the text
   (`dynamo_core.mocker.script`: the prompt is detokenized for matching);
2. otherwise, with a `guided_decoding` constraint, the text is drawn by
   `dynamo_core.mocker.guided.generate_text` with a `random.Random` seeded from the request's
   seed (or the mocker's `--seed`) and prompt: the same request always gets the same text, another
   seed another one;
3. otherwise None: the engine draws its usual random tokens.

The text becomes token ids of the model's tokenizer; the engine emits them, then the model's
end-of-sequence token (unless the request ignores eos), as an engine does once a constraint is
satisfied. The ids must show exactly the text where the frontend detokenizes them: after the prompt
(SentencePiece decoders drop the leading space of a sequence's first token, so the plain
encoding of "Hi" shows " Hi" after a prompt; the encoding after a separator, minus the
separator's ids, is tried next). This is checked per request with two decodes; text the
vocabulary cannot spell fails the request with `InvalidRequestError` rather than send other text.
The engine streams the ids one per step, so timing, KV cache and `max_tokens` (finish reason
`length`) behave as for random tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from dynamo_core.errors import ConfigError, InvalidRequestError
from dynamo_core.mocker.engine import _seed_key
from dynamo_core.mocker.guided import generate_text
from dynamo_core.mocker.script import ChatLayout, PromptView, ReplyScript

if TYPE_CHECKING:
    from dynamo_core.llm.protocol import PreprocessedRequest
    from dynamo_core.llm.tokenizer import Tokenizer

__all__ = ["Replies"]

log = logging.getLogger("dynamo.mocker.replies")

#: Prompt ids decoded before a reply to check how it shows (the frontend uses a few too).
_CONTEXT = 6
#: Texts after which a reply is also encoded (and their ids dropped): one that starts a
#: sequence is spelled differently by SentencePiece-style tokenizers.
_SEPARATORS = ("\n", ".")


class Replies:
    """Scripted and constrained replies for one model (its tokenizer and chat template)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        script: ReplyScript | None = None,
        layout: ChatLayout | None = None,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.layout = layout
        self.seed = seed

    @classmethod
    def for_model(
        cls, tokenizer: Tokenizer, script: ReplyScript | None = None, *, seed: int = 0
    ) -> Replies:
        """`Replies` with the chat layout learned from the tokenizer's template (when a script
        needs it); a script that matches on tools the template does not show is refused."""
        from dynamo_core.llm.chat_template import ChatTemplate

        layout = None
        if script is not None and (script.uses_user or script.uses_tools):
            layout = ChatLayout.learn(ChatTemplate.from_tokenizer(tokenizer))
            if script.uses_tools and (layout is None or layout.tools_marker is None):
                raise ConfigError(
                    "the reply script matches on 'tools', but this model's chat template shows "
                    "no tools text the mocker can find; match on 'prompt' instead"
                )
            if layout is not None:
                log.info(
                    "reply script: user messages between %r and %r, tools marker %r",
                    layout.user_open,
                    layout.user_close,
                    layout.tools_marker,
                )
        return cls(tokenizer, script=script, layout=layout, seed=seed)

    def view(self, token_ids: list[int]) -> PromptView:
        """The prompt as a script's rules see it."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        layout = self.layout
        user = layout.last_user(text) if layout is not None else None
        if user is None:
            user = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return PromptView(
            text=text, user=user, tools=layout.has_tools(text) if layout is not None else None
        )

    def text(self, request: PreprocessedRequest) -> str | None:
        """The reply's text, or None when the engine should draw random tokens."""
        if self.script is not None:
            reply = self.script.reply(self.view(request.token_ids))
            if reply is not None:
                return reply
        if request.guided_decoding is not None:
            return generate_text(request.guided_decoding, self.rng(request))
        return None

    def tokens(self, request: PreprocessedRequest) -> list[int] | None:
        """The reply as token ids (without end-of-sequence: the engine adds it), or None."""
        text = self.text(request)
        return None if text is None else self.encode(text, request.token_ids)

    def encode(self, text: str, prompt: Sequence[int] = ()) -> list[int]:
        """`text` as token ids that show exactly `text` when detokenized after `prompt`."""
        tail = list(prompt[-_CONTEXT:])
        for ids in self._spellings(text):
            if self._shown(tail, ids) == text:
                return ids
        raise InvalidRequestError(
            "the mocker cannot spell its reply with this model's vocabulary "
            f"(it would not detokenize to the same text): {text[:80]!r}"
        )

    def _spellings(self, text: str) -> Iterator[list[int]]:
        encode = self.tokenizer.encode
        yield encode(text, add_special_tokens=False)
        for separator in _SEPARATORS:
            head = encode(separator, add_special_tokens=False)
            whole = encode(separator + text, add_special_tokens=False)
            if whole[: len(head)] == head:
                yield whole[len(head) :]

    def _shown(self, tail: list[int], ids: list[int]) -> str | None:
        """The text `ids` add after `tail`, as the frontend's detokenizer shows it."""
        decode = self.tokenizer.decode
        before = decode(tail, skip_special_tokens=False) if tail else ""
        after = decode(tail + ids, skip_special_tokens=False)
        return after[len(before) :] if after.startswith(before) else None

    def rng(self, request: PreprocessedRequest) -> random.Random:
        """The request's random source: its seed (or the mocker's) and its prompt."""
        seed = request.sampling_options.seed
        return random.Random(_seed_key(self.seed if seed is None else seed, request.token_ids))
