"""`POST /v1/embeddings`: OpenAI's embeddings API, checked as its published schema types it.

- `input`: a string, an array of strings, an array of token ids or an array of arrays of token
  ids; at most 2048 inputs (OpenAI's limit), none empty, each within the model's context (a
  400 `context_length_exceeded` naming the input otherwise; an input as long as the context is
  fine, nothing is generated after it). One array of token ids may be as long as the context
  (OpenAI's schema caps it at 2048 ids, its models' context is 8192: the README says so). Strings are tokenized with the model's special tokens
  (an encoder's [CLS]/[SEP], a decoder's bos), as vLLM's embeddings server does.
- `encoding_format`: `float` (the default) or `base64`, the little-endian float32 bytes of
  each vector, which the `openai` SDK asks for by default and decodes with numpy.
- `dimensions`: served only by a model whose card says it may shorten its vectors
  (`EmbeddingSpec.matryoshka`); otherwise a 400, as OpenAI answers for its older models.
- `user`: accepted, unused; `model`: a model whose card has type `embedding` (any other gets a
  400 that says which routes it serves; chat and completions refuse an embedding model alike).

Every input of a request goes to one worker in one `PreprocessedEmbeddingRequest`: engines
batch them themselves (vLLM schedules them together). `bench/embeddings.py` measured it against
fanning the inputs out one request each over two workers (batches of 64, TCP, this 2-core
machine): one request costs the caller 5-8 us of CPU per input against 18-25 us, and serves as
many batches per second or more once several batches are in flight (31 vs 30/s at 4 in flight
with real-time simulated prefill; 490 vs 260/s when prefill is nearly free); fan-out only wins
the latency of a lone batch on an idle fleet (37 vs 65 ms), by using workers that load would
keep busy anyway. The vectors come back as float32 bytes: base64 is one `b64encode` per vector;
floats are unpacked once, at the edge.

Faults: the request is idempotent, so a worker that fails it (died, drained, stopped answering
heartbeats: the request plane's liveness fails the call within its timeout, never a hang) is
replaced by another instance with the whole request. A worker that refused it before starting
(draining, gone from discovery) is skipped without counting; one that broke while holding it
counts against the migration limit, so a request that kills every worker it reaches is not
sent on forever. The client then gets the OpenAI-shaped 503 every route gives.
"""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from dynamo_core import errors
from dynamo_core.frontend.messages import invalid_type
from dynamo_core.frontend.models import ModelEntry
from dynamo_core.frontend.openai import INT32_MAX, ParamError, new_id
from dynamo_core.llm.model_card import ModelCard
from dynamo_core.llm.protocol import PreprocessedEmbeddingRequest, unpack_embedding
from dynamo_core.llm.tokenizer import Tokenizer
from dynamo_core.runtime import Context

__all__ = [
    "MAX_INPUTS",
    "EmbeddingRequest",
    "check_model",
    "embed_on_workers",
    "embedding_inputs",
    "embeddings_body",
    "wire_request",
]

log = logging.getLogger("dynamo.frontend.embeddings")

#: Most inputs in one request (OpenAI's limit).
MAX_INPUTS = 2048
#: A worker that refused the request before doing any work on it: skipped, not counted.
_REFUSED = (
    errors.DrainingError,
    errors.InstanceNotFoundError,
    errors.EndpointNotFoundError,
    errors.AuthenticationError,
)
_json = msgspec.json.Encoder()


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]
    """Checked by `embedding_inputs` (a union of array types is more than a struct says)."""
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None


def check_model(body: EmbeddingRequest, card: ModelCard) -> None:
    """What the model's card decides: `dimensions`."""
    spec = card.embedding
    if body.dimensions is not None and spec is not None:
        why = spec.check_dimensions(body.dimensions)
        if why is not None:
            raise ParamError(why, "dimensions", "invalid_value")


def embedding_inputs(entry: ModelEntry, body: EmbeddingRequest) -> list[list[int]]:
    """Each input's token ids, or `ParamError` for the first input that breaks a rule.

    Blocking for long texts (the service runs it off the loop for large bodies); the work per
    string is bounded by the model's context (`Tokenizer.encode_within`)."""
    raw = body.input
    context_length = entry.card.context_length
    tokenizer = entry.tokenizer
    if isinstance(raw, str):
        return [_tokenized(tokenizer, raw, context_length, "input")]
    if not raw:
        raise ParamError("input must not be empty", "input", "empty_array")
    first = raw[0]
    if _is_token_id(first):  # one input: as long as the context allows
        return [_token_ids(raw, tokenizer.vocab_size, context_length, "input")]
    if len(raw) > MAX_INPUTS:
        raise ParamError(
            f"input must have at most {MAX_INPUTS} items, got {len(raw)}", "input", "invalid_value"
        )
    if isinstance(first, str):
        return _texts(tokenizer, raw, context_length)
    if isinstance(first, list):
        vocab = tokenizer.vocab_size
        inputs = []
        for i, item in enumerate(raw):
            if not isinstance(item, list):
                raise invalid_type(f"input[{i}]", "an array of integers", item)
            inputs.append(_token_ids(item, vocab, context_length, f"input[{i}]"))
        return inputs
    raise invalid_type("input[0]", "one of a string, an integer or an array of integers", first)


def _is_token_id(value: Any) -> bool:
    return type(value) is int  # not a bool


def _texts(tokenizer: Tokenizer, texts: list[Any], context_length: int) -> list[list[int]]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid_type(f"input[{i}]", "a string", text)
        if not text:
            raise ParamError(
                f"input[{i}] must not be an empty string", f"input[{i}]", "empty_string"
            )
    # strings that cannot hold much more than the context go to the tokenizer together (its
    # batch runs in parallel, outside the GIL); a longer one is tokenized only as far as needed
    short = context_length * 8
    batch = [i for i, text in enumerate(texts) if len(text) <= short]
    ids: dict[int, list[int]] = dict(
        zip(batch, tokenizer.encode_batch([texts[i] for i in batch], True), strict=True)
    )
    inputs = []
    for i, text in enumerate(texts):
        at = f"input[{i}]"
        encoded = ids.get(i)
        if encoded is None:
            inputs.append(_tokenized(tokenizer, text, context_length, at))
        else:
            _check_length(len(encoded), context_length, at)
            inputs.append(encoded)
    return inputs


def _tokenized(tokenizer: Tokenizer, text: str, context_length: int, at: str) -> list[int]:
    if not text:
        raise ParamError(f"{at} must not be an empty string", at, "empty_string")
    encoded = tokenizer.encode_within(text, context_length, add_special_tokens=True)
    _check_length(len(encoded.ids), context_length, at, at_least=not encoded.complete)
    return encoded.ids


def _token_ids(ids: list[Any], vocab: int, context_length: int, at: str) -> list[int]:
    if not ids:
        raise ParamError(f"{at} must not be empty", at, "empty_array")
    _check_length(len(ids), context_length, at)  # before looking at every id of a huge list
    for j, t in enumerate(ids):
        if not _is_token_id(t) or not 0 <= t < vocab:
            raise ParamError(
                f"{at}[{j}] must be a token id, an integer in [0, {vocab}); got {t!r}",
                f"{at}[{j}]",
                "invalid_value",
            )
    return ids


def _check_length(n: int, context_length: int, at: str, *, at_least: bool = False) -> None:
    if at_least or n > context_length:
        raise ParamError(
            f"This model's maximum context length is {context_length} tokens. However, {at} "
            f"has {'more than ' + str(context_length) if at_least else n} tokens. Please "
            "shorten it.",
            at,
            "context_length_exceeded",
        )


def wire_request(
    entry: ModelEntry, body: EmbeddingRequest, token_ids: list[list[int]]
) -> PreprocessedEmbeddingRequest:
    return PreprocessedEmbeddingRequest(
        token_ids=token_ids,
        model=entry.name,
        dimensions=body.dimensions,
        request_id=new_id("embd"),
    )


async def embed_on_workers(
    entry: ModelEntry,
    request: PreprocessedEmbeddingRequest,
    ctx: Context,
    limit: int,
    migratable: tuple[type[errors.DynamoError], ...],
) -> list[bytes]:
    """The vectors of `request` from one of the model's workers, moving to another when one
    fails it (`migratable` errors; see the module docstring); at most `limit` of them count."""
    inputs = request.token_ids
    # what the router weighs: every token the worker will process
    prompt = inputs[0] if len(inputs) == 1 else list(itertools.chain.from_iterable(inputs))
    exclude: list[int] = []
    while True:
        route = await entry.route(prompt, exclude, ctx.id)
        iid = route.instance_id
        stream = None
        try:
            stream = await entry.client.direct(request, iid, context=ctx)
            async for item in stream:
                route.first_token()
                return _vectors(item, request, entry)
            raise errors.EngineError("the worker ended the request without an answer")
        except migratable as exc:
            if ctx.is_stopped():
                raise
            exclude.append(iid)
            if isinstance(exc, _REFUSED):
                log.info("request %s: instance %x did not take it (%s)", ctx.id, iid, exc)
                continue
            if limit <= 0:
                log.warning(
                    "request %s: instance %x failed (%s); migration limit reached", ctx.id, iid, exc
                )
                raise
            limit -= 1
            log.warning(
                "request %s: instance %x failed (%s); sending it to another", ctx.id, iid, exc
            )
        finally:
            route.done()
            if stream is not None:
                stream.cancel()


def _vectors(item: Any, request: PreprocessedEmbeddingRequest, entry: ModelEntry) -> list[bytes]:
    """The worker's vectors, checked: one per input, each as long as promised."""
    vectors = item.get("embeddings") if isinstance(item, dict) else None
    spec = entry.card.embedding
    size = request.dimensions or (spec.size if spec is not None else None)
    if (
        not isinstance(vectors, list)
        or len(vectors) != len(request.token_ids)
        or not all(isinstance(v, bytes) and (size is None or len(v) == 4 * size) for v in vectors)
    ):
        log.warning("request %s: malformed answer from the worker", request.request_id)
        raise errors.EngineError("the worker's answer is malformed")
    return vectors


def embeddings_body(
    model: str, vectors: Sequence[bytes], encoding_format: str | None, prompt_tokens: int
) -> bytes:
    """OpenAI's response: a list of embedding objects, usage (prompt tokens only)."""
    if encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v).decode("ascii")}
            for i, v in enumerate(vectors)
        ]
    else:
        data = [
            {"object": "embedding", "index": i, "embedding": unpack_embedding(v)}
            for i, v in enumerate(vectors)
        ]
    return _json.encode(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
