"""Fake `sglang.srt.entrypoints.engine`: `Engine` and the parts of its `TokenizerManager`
that callers touch (see the package docstring for the interface it follows).

An engine started with `is_embedding=True` answers `EmbeddingReqInput` (`Engine.async_encode`
with text, `tokenizer_manager.generate_request` with text or token ids): one deterministic unit
vector per input (`unit_vector`: `hidden_size` values from a SHAKE-256 digest of the ids, the
first `dimensions` of them renormalised for a Matryoshka request), after SGLang's own checks
(`--is-embedding`, the context length, the Matryoshka dimensions) with SGLang's messages.
Text is "tokenized" as its UTF-8 bytes (plus 3). Fault switches: `tokenizer_manager.fail_next`
(an exception the next embedding request raises), `FAKE_SGLANG_EMBED_FAIL_TOKEN=<id>` (every
request with an input holding that token id fails, as a per-request engine error).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from hashlib import blake2b
from typing import Any

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.io_struct import EmbeddingReqInput
from sglang.srt.server_args import ServerArgs

# SGLang's SamplingParams fields (a dict with any other key fails, as in SGLang)
SAMPLING_KEYS = {
    "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "temperature", "top_p",
    "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "n",
    "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed", "json_schema",
    "regex", "ebnf", "logit_bias", "custom_params", "spaces_between_special_tokens",
}  # fmt: skip


GRAMMAR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")


def check_grammar(params: dict[str, Any]) -> str | None:
    """What SGLang checks of a constrained request: `SamplingParams` types (msgspec), `verify`
    (one of json_schema, regex, ebnf), then the grammar backend compiling it. Raises as
    `async_generate` does; returns the abort message the scheduler would finish it with."""
    given = [k for k in GRAMMAR_KEYS if params.get(k) is not None]
    for key in given:
        if not isinstance(params[key], str):
            raise TypeError(
                f"Expected `str | null`, got `{type(params[key]).__name__}` - at `$.{key}`"
            )
    if sum(k != "structural_tag" for k in given) > 1:
        raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
    if not given:
        return None
    if "json_schema" in given:
        try:
            json.loads(params["json_schema"])
        except ValueError:
            return f"Invalid grammar request: key=('json', {params['json_schema']!r})"
    if "regex" in given:
        try:
            re.compile(params["regex"])
        except re.error:
            return f"Invalid grammar request: key=('regex', {params['regex']!r})"
    return None


def token_at(prompt_digest: bytes, seed: int, pos: int) -> int:
    h = blake2b(prompt_digest, digest_size=8)
    h.update(struct.pack("<qI", seed, pos))
    return 100 + int.from_bytes(h.digest(), "little") % 2000


def digest_of(prompt: list[int]) -> bytes:
    return blake2b(struct.pack(f"<{len(prompt)}I", *prompt), digest_size=16).digest()


def unit_vector(ids: list[int], size: int, dimensions: int | None = None) -> list[float]:
    """The fake embedding of `ids`: `dimensions` (default `size`) values of unit length."""
    digest = hashlib.shake_256(struct.pack(f"<{len(ids)}i", *ids)).digest(2 * size)
    n = dimensions or size
    values = [int.from_bytes(digest[2 * i : 2 * i + 2], "little") - 32767.5 for i in range(n)]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def fake_tokenize(text: Any) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"the fake tokenizes text only, not {type(text).__name__}")
    return [b + 3 for b in text.encode()]


def input_logprobs(
    prompt: list[int], start: int, top_n: int
) -> tuple[list[tuple[float | None, int, None]], list[list[tuple[float, int, None]] | None]]:
    """SGLang's `input_token_logprobs` and `input_top_logprobs` from `logprob_start_len`
    (-1: the last prompt token only): a `(logprob, token_id, text)` per prompt token from
    there, the first's logprob None (and its top None); each a function of the token's
    prefix; the top `top_n` most likely, sometimes the token among them."""
    start = len(prompt) - 1 if start < 0 else start
    values: list[tuple[float | None, int, None]] = [(None, prompt[start], None)]
    tops: list[list[tuple[float, int, None]] | None] = [None]
    for pos in range(start + 1, len(prompt)):
        token = prompt[pos]
        place = digest_of(prompt[: pos + 1])[0] % 3  # 0: the most likely; 2: often not in top
        lp = -0.1 - 0.25 * place
        values.append((lp, token, None))
        others = [100 + (token + 13 * k) % 2000 for k in range(1, top_n + 1)]
        top = [(-0.1 - 0.25 * k, token if k == place else others[k], None) for k in range(top_n)]
        tops.append(top)
    return values, tops


class ReqState:
    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.aborted = False
        self.abort_sent = False


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, context_len: int) -> None:
        self.server_args = server_args
        self.context_len = context_len
        self.rid_to_state: dict[str, ReqState] = {}
        self.aborted: list[str] = []
        self.model_config = ModelConfig(
            server_args.model_path, context_len, is_embedding=server_args.is_embedding
        )
        self.is_generation = self.model_config.is_generation
        self.embed_delay_s = float(os.environ.get("FAKE_SGLANG_STEP_S", "0.001"))
        fail_token = os.environ.get("FAKE_SGLANG_EMBED_FAIL_TOKEN")
        self.fail_token = int(fail_token) if fail_token else None
        self.fail_next: BaseException | None = None
        self.embed_calls: list[EmbeddingReqInput] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        if abort_all:
            for state in self.rid_to_state.values():
                state.aborted = True
            self.rid_to_state.clear()
            return
        state = self.rid_to_state.pop(rid, None)
        if state is not None:
            state.aborted = True
            self.aborted.append(rid)

    async def generate_request(
        self, obj: EmbeddingReqInput, request: Any = None
    ) -> AsyncGenerator[Any, None]:
        """SGLang's entry for a request object; the fake serves `EmbeddingReqInput` (a batch is
        answered with one list, a single input with one dict)."""
        if not isinstance(obj, EmbeddingReqInput):
            raise NotImplementedError("the fake generates through Engine.async_generate")
        obj.normalize_batch_and_arguments()
        rids: list[str] = [obj.rid] if obj.is_single else list(obj.rid)  # type: ignore[list-item, arg-type]
        if obj.text is not None:
            texts = [obj.text] if obj.is_single else list(obj.text)
            inputs = [fake_tokenize(t) for t in texts]
        else:
            assert obj.input_ids is not None
            inputs = [obj.input_ids] if obj.is_single else list(obj.input_ids)  # type: ignore[list-item]
        states = {rid: ReqState(rid) for rid in rids}
        self.rid_to_state.update(states)
        self.embed_calls.append(obj)
        dispatched = False
        try:
            for ids in inputs:
                self._validate_embedding(obj, ids)
            dispatched = True  # to the (simulated) scheduler
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            if self.fail_token is not None and any(self.fail_token in ids for ids in inputs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")
            await asyncio.sleep(self.embed_delay_s)  # the forward pass
            size = self.model_config.hidden_size
            outputs = [
                {
                    "embedding": unit_vector(list(ids), size, obj.dimensions),
                    "meta_info": {
                        "id": rid,
                        "finish_reason": {"type": "length", "length": 0},
                        "prompt_tokens": len(ids),
                        "cached_tokens": 0,
                    },
                }
                for rid, ids in zip(rids, inputs, strict=True)
            ]
            for rid in rids:  # SGLang forgets a finished request before yielding it
                self.rid_to_state.pop(rid, None)
        except BaseException:  # SGLang releases what it created: aborts what it dispatched
            for rid, state in states.items():
                if self.rid_to_state.get(rid) is state:
                    if dispatched:
                        self.abort_request(rid)
                    else:
                        del self.rid_to_state[rid]
            raise
        yield outputs[0] if obj.is_single else outputs

    def _validate_embedding(self, obj: EmbeddingReqInput, ids: list[int]) -> None:
        """`TokenizerManager._validate_one_request` for an embedding, with SGLang's messages."""
        if len(ids) >= self.context_len:
            raise ValueError(
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({self.context_len} tokens)."
            )
        if self.is_generation:
            raise ValueError(
                "This model does not appear to be an embedding model by default. "
                "Please add `--is-embedding` when launching the server or try another model."
            )
        config = self.model_config
        if obj.dimensions is None:
            return
        if not config.is_matryoshka:
            raise ValueError(
                f"Model '{config.model_path}' does not support matryoshka representation, "
                f"changing output dimensions will lead to poor results."
            )
        if obj.dimensions < 1:
            raise ValueError("Requested dimensions must be greater than 0")
        if config.matryoshka_dimensions and obj.dimensions not in config.matryoshka_dimensions:
            raise ValueError(
                f"Model '{config.model_path}' only supports {config.matryoshka_dimensions} "
                f"matryoshka dimensions, using other output dimensions will lead to poor results."
            )
        if obj.dimensions > config.hidden_size:
            raise ValueError(
                "Provided dimensions are greater than max embedding dimension: "
                f"{config.hidden_size}"
            )


class BootstrapServer:
    """The prefill side's bootstrap server: a decode engine connects and names its room."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.05)
        self.rooms: dict[int, socket.socket] = {}
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            data = b""
            try:
                while len(data) < 8:
                    chunk = conn.recv(8 - len(data))
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                conn.close()
                continue
            if len(data) == 8:
                with self.lock:
                    self.rooms[int.from_bytes(data, "big")] = conn

    async def wait(self, room: int, timeout: float, state: ReqState) -> socket.socket | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not state.aborted:
            with self.lock:
                conn = self.rooms.pop(room, None)
            if conn is not None:
                return conn
            await asyncio.sleep(0.002)
        return None

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.thread.join(2)
        for conn in [*self.rooms.values(), *self.held]:
            conn.close()


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        server_args = kwargs["server_args"] if "server_args" in kwargs else ServerArgs(**kwargs)
        self.server_args = server_args
        resolved = server_args.resolved_dict()
        self.page_size = int(resolved["page_size"])
        self.tokenizer_manager = TokenizerManager(server_args, int(resolved["context_length"]))
        config_path = os.path.join(server_args.model_path, "config.json")
        eos: Any = []
        if os.path.isfile(config_path):
            with open(config_path) as f:
                eos = json.load(f).get("eos_token_id", [])
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.mode = server_args.disaggregation_mode
        self.step_s = float(os.environ.get("FAKE_SGLANG_STEP_S", "0.001"))
        self.prefill_fail = os.environ.get("FAKE_SGLANG_PREFILL_FAIL") == "1"
        self.transfer_timeout = float(os.environ.get("FAKE_SGLANG_TRANSFER_TIMEOUT", "300"))
        self.handshake_timeout = 60.0
        self.fail_next: BaseException | None = None
        self.calls: list[dict[str, Any]] = []
        self.cached_pages: set[int] = set()
        self.shut_down = False
        self._bootstrap: BootstrapServer | None = None
        if self.mode == "prefill":
            self._bootstrap = BootstrapServer(
                "127.0.0.1", server_args.disaggregation_bootstrap_port
            )
        self._publisher: Any = None
        config = json.loads(server_args.kv_events_config or "{}")
        if config.get("publisher") == "zmq":
            from sglang.srt.disaggregation.kv_events import ZmqEventPublisher

            self._publisher = ZmqEventPublisher(server_args.kv_events_config or "")

    def shutdown(self) -> None:
        self.shut_down = True
        if self._bootstrap is not None:
            self._bootstrap.close()
        if self._publisher is not None:
            self._publisher.shutdown()
            self._publisher = None

    def flush_cache(self) -> None:
        from sglang.srt.disaggregation.kv_events import AllBlocksCleared

        self.cached_pages.clear()
        if self._publisher is not None:
            self._publisher.publish([AllBlocksCleared()])

    async def async_encode(
        self,
        prompt: str | list[str] | list[dict[str, Any]] | list[list[dict[str, Any]]],
        image_data: Any = None,
        audio_data: Any = None,
        video_data: Any = None,
        dimensions: int | None = None,
        lora_path: list[str | None] | str | None = None,
        embed_override_token_id: int | None = None,
        embed_overrides: Any = None,
        external_trace_header: dict[str, Any] | None = None,
        rid: list[str] | str | None = None,
    ) -> dict[str, Any]:
        """SGLang's: `EmbeddingReqInput(text=prompt, ...)` through the tokenizer manager; a
        dict (`embedding`, `meta_info`) for one prompt, a list of them for a list of prompts."""
        obj = EmbeddingReqInput(
            text=prompt,  # type: ignore[arg-type]
            image_data=image_data,
            audio_data=audio_data,
            video_data=video_data,
            dimensions=dimensions,
            lora_path=lora_path,
            embed_override_token_id=embed_override_token_id,
            embed_overrides=embed_overrides,
            external_trace_header=external_trace_header,
            rid=rid,
        )
        generator = self.tokenizer_manager.generate_request(obj, None)
        return await generator.__anext__()  # type: ignore[no-any-return]

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        image_data: Any = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        lora_path: Any = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        data_parallel_rank: int | None = None,
        rid: str | None = None,
    ) -> Any:
        self.calls.append(
            {
                "input_ids": input_ids,
                "sampling_params": dict(sampling_params or {}),
                "rid": rid,
                "bootstrap_host": bootstrap_host,
                "bootstrap_port": bootstrap_port,
                "bootstrap_room": bootstrap_room,
                "return_logprob": return_logprob,
                "logprob_start_len": logprob_start_len,
                "top_logprobs_num": top_logprobs_num,
            }
        )
        gen = self._generate(
            list(input_ids or []),
            dict(sampling_params or {}),
            rid or uuid.uuid4().hex,
            return_logprob,
            top_logprobs_num or 0,
            (bootstrap_host, bootstrap_port, bootstrap_room),
            -1 if logprob_start_len is None else logprob_start_len,
        )
        if stream:
            return gen
        last = None
        async for item in gen:
            last = item
        return last

    # -- the fake scheduler ---------------------------------------------------------------

    def _prefix_cache(self, prompt: list[int]) -> int:
        """Cached prompt tokens; new full pages are stored and announced as BlockStored."""
        size = self.page_size
        parent: int | None = None
        cached = 0
        leading = True
        new_hashes: list[int] = []
        new_tokens: list[int] = []
        first_parent: int | None = None
        for start in range(0, len(prompt) - len(prompt) % size, size):
            page = prompt[start : start + size]
            h = blake2b(struct.pack(f"<q{len(page)}I", parent or 0, *page), digest_size=8)
            block = int.from_bytes(h.digest(), "little", signed=True)  # SGLang's are int64
            if block in self.cached_pages and leading:
                cached += size
            else:
                if not new_hashes:
                    first_parent = parent
                leading = False
                self.cached_pages.add(block)
                new_hashes.append(block)
                new_tokens.extend(page)
            parent = block
        if new_hashes and self._publisher is not None:
            from sglang.srt.disaggregation.kv_events import BlockStored

            self._publisher.publish(
                [
                    BlockStored(
                        block_hashes=new_hashes,
                        parent_block_hash=first_parent,
                        token_ids=new_tokens,
                        block_size=size,
                        lora_id=None,
                    )
                ]
            )
        return cached

    async def _generate(
        self,
        prompt: list[int],
        params: dict[str, Any],
        rid: str,
        return_logprob: bool,
        top_n: int,
        bootstrap: tuple[str | None, int | None, int | None],
        logprob_start_len: int = -1,
    ) -> AsyncIterator[dict[str, Any]]:
        tm = self.tokenizer_manager
        if rid in tm.rid_to_state:
            raise ValueError(f"Duplicate request ID: {rid}")
        unknown = set(params) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        grammar_error = check_grammar(params)
        if any(params.get(k) is not None for k in GRAMMAR_KEYS):
            if tm.server_args.grammar_backend == "none":
                grammar_error = (
                    "Grammar-based generation (json_schema, regex, ebnf, structural_tag) is not "
                    "supported when the server is launched with --grammar-backend none"
                )
        state = ReqState(rid)
        tm.rid_to_state[rid] = state
        held: socket.socket | None = None
        dropped = True
        try:
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            if not prompt:
                raise ValueError("input_ids is empty")
            if len(prompt) >= tm.context_len:
                raise ValueError(
                    f"The input ({len(prompt)} tokens) is longer than the model's context "
                    f"length ({tm.context_len} tokens)."
                )
            max_new = int(params.get("max_new_tokens", 128))
            min_new = int(params.get("min_new_tokens", 0))
            stop_ids = set(params.get("stop_token_ids") or ())
            ignore_eos = bool(params.get("ignore_eos", False))
            seed = int(params.get("sampling_seed") or 0)
            digest = digest_of(prompt)
            incremental = self.server_args.incremental_streaming_output
            output: list[int] = []
            logprobs: list[tuple[float, int, None]] = []
            tops: list[list[tuple[float, int, None]]] = []
            sent = 0
            inputs, input_tops = input_logprobs(prompt, logprob_start_len, top_n)

            def item(reason: dict[str, Any] | None, cached: int) -> dict[str, Any]:
                nonlocal sent
                meta: dict[str, Any] = {
                    "id": rid,
                    "finish_reason": reason,
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(output),
                    "cached_tokens": cached,
                }
                start = sent if incremental else 0
                if return_logprob:
                    meta["input_token_logprobs"] = inputs
                    meta["output_token_logprobs"] = logprobs[start:]
                    if top_n > 0:
                        meta["input_top_logprobs"] = input_tops
                    meta["output_top_logprobs"] = tops[start:]
                if incremental:
                    ids = output[sent:]
                elif reason is None:
                    ids = output  # the same list, mutated by later steps, as in SGLang
                else:
                    ids = output.copy()
                sent = len(output)
                if reason is not None:  # SGLang forgets a finished request before yielding it
                    tm.rid_to_state.pop(rid, None)
                text = None if reason is None and not incremental else f"<{len(ids)} tokens>"
                return {"text": text, "output_ids": ids, "meta_info": meta}

            def add(tok: int) -> None:
                output.append(tok)
                lp = -0.01 - (tok % 7) / 10
                logprobs.append((lp, tok, None))
                tops.append(
                    [(lp - 0.5 * k, tok if k == 0 else tok + k, None) for k in range(max(1, top_n))]
                )

            if grammar_error is not None:  # the scheduler aborts it before it runs
                yield item({"type": "abort", "message": grammar_error, "status_code": 400}, 0)
                return
            host, port, room = bootstrap
            first: int | None = None
            if self.mode in ("prefill", "decode") and room is None:
                raise ValueError(f"a {self.mode} engine needs bootstrap_host/port/room")
            if self.mode == "prefill":
                assert self._bootstrap is not None
                held = await self._bootstrap.wait(room or 0, self.handshake_timeout, state)
                cached = self._prefix_cache(prompt)
                if held is None:
                    yield item(
                        {"type": "abort", "message": "bootstrap timeout", "status_code": 500},
                        cached,
                    )
                    return
                await asyncio.sleep(self.step_s)
                if self.prefill_fail:  # leave the decode side waiting for its KV cache
                    assert self._bootstrap is not None
                    self._bootstrap.held.append(held)
                    held = None
                    yield item(
                        {
                            "type": "abort",
                            "message": "KV transfer failed (fake)",
                            "status_code": 500,
                        },
                        cached,
                    )
                    return
                tok = token_at(digest, seed, 0)
                held.sendall(tok.to_bytes(4, "big"))
                add(tok)
                yield item({"type": "length", "length": 1}, cached)
                return
            if self.mode == "decode":
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write((room or 0).to_bytes(8, "big"))
                    await writer.drain()
                    data = await asyncio.wait_for(reader.readexactly(4), self.transfer_timeout)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    yield item(
                        {"type": "abort", "message": "KV transfer failed", "status_code": 500}, 0
                    )
                    return
                finally:
                    writer.close()
                first = int.from_bytes(data, "big")
                cached = 0
            else:
                cached = self._prefix_cache(prompt)
            pos = 0
            while True:
                if state.aborted:
                    yield item({"type": "abort", "message": "Aborted", "status_code": None}, cached)
                    return
                await asyncio.sleep(self.step_s)
                tok = first if pos == 0 and first is not None else token_at(digest, seed, pos)
                pos += 1
                add(tok)
                reason: dict[str, Any] | None = None
                n = len(output)
                if n > min_new and tok in stop_ids:
                    reason = {"type": "stop", "matched": tok}
                elif n > min_new and not ignore_eos and tok in self.eos_token_ids:
                    reason = {"type": "stop", "matched": tok}
                elif n >= max_new or len(prompt) + n >= tm.context_len:
                    reason = {"type": "length", "length": n}
                yield item(reason, cached)
                if reason is not None:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            # the caller stopped reading: like SGLang, keep running it until abort_request()
            dropped = False
            raise
        finally:
            if dropped:
                tm.rid_to_state.pop(rid, None)
            if held is not None:
                held.close()
