"""A fake `sglang` for dynamo-sglang's tests: SGLang's Python interface, no model, no GPU.

Written against SGLang 0.5.23 (PyPI wheel `sglang-0.5.23`): `sglang.Engine(server_args=...)`
(`sglang/srt/entrypoints/engine.py`), `Engine.async_generate(input_ids=..., sampling_params=...,
stream=True, rid=..., bootstrap_host=..., bootstrap_port=..., bootstrap_room=...,
return_logprob=..., logprob_start_len=..., top_logprobs_num=...)`, streaming dicts with
*cumulative* `output_ids` (the same list object, mutated, between items; `text` None until the
last item) and `meta_info` (`finish_reason` as `{"type": "length", "length": n}` /
`{"type": "stop", "matched": id}` / `{"type": "abort", ...}`, `prompt_tokens`,
`completion_tokens`, `cached_tokens`, `output_token_logprobs` / `output_top_logprobs` as
`(logprob, token_id, text)` triples, and `input_token_logprobs` / `input_top_logprobs` from
`logprob_start_len` on (-1, the default: the last prompt token only), the first position's
logprob None and its top None, as SGLang's scheduler makes them),
`engine.tokenizer_manager.abort_request(rid)`, `tokenizer_manager.rid_to_state`,
`tokenizer_manager.context_len`; for an `is_embedding` engine `Engine.async_encode(prompt=...,
dimensions=..., rid=...)` and `tokenizer_manager.generate_request(EmbeddingReqInput(...))`
(`sglang/srt/managers/io_struct.py`), answering `{"embedding", "meta_info"}` per input (a list
for a batch), `tokenizer_manager.model_config` (`hidden_size`, Matryoshka settings,
`sglang/srt/configs/model_config.py`); `ServerArgs.add_cli_args` / `from_cli_args` /
`resolved_dict()` (`sglang/srt/server_args.py`) and the ZMQ KV-event publisher's message format
(`sglang/srt/disaggregation/kv_events.py`).

Tokens are a deterministic function of (prompt, seed, position), so a disaggregated request
(prefill engine computes position 0, the decode engine the rest) yields the same tokens as an
aggregated one. Disaggregation moves the "KV cache" (the first token) over a real TCP bootstrap
connection: the prefill engine waits for the decode engine to connect for its
`bootstrap_room`, as SGLang does. Behaviour switches, as environment variables (for worker
processes) or `Engine` attributes: `FAKE_SGLANG_STEP_S` (seconds per token),
`FAKE_SGLANG_PREFILL_FAIL=1` (a prefill aborts after the decode engine connected, leaving it
waiting), `FAKE_SGLANG_TRANSFER_TIMEOUT` (how long a decode engine waits for the KV cache).
"""

from sglang.srt.entrypoints.engine import Engine
from sglang.srt.server_args import ServerArgs

__version__ = "0.5.23+fake"

__all__ = ["Engine", "ServerArgs", "__version__"]
