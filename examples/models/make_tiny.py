"""Build the project's tiny offline model (tokenizer, config, optional random weights).

The model lives in ``examples/models/tiny/`` and is what tests, examples and the mocker use when no
model hub can be reached. Everything here is generated from text this script writes itself, with a
fixed seed, so running it twice gives byte-identical files (a test checks ``tokenizer.json``):

- a byte-level BPE tokenizer (GPT-2 / Llama-3 style: every byte is a token, so any UTF-8 text,
  including accents, CJK and emoji, round-trips exactly) trained with ``tokenizers``;
- special tokens ``<|begin_of_text|>`` (bos), ``<|end_of_text|>`` (eos), ``<|im_start|>`` and
  ``<|im_end|>`` (the chat turn delimiters; ``<|im_end|>`` is also an eos for chat);
- ``tokenizer_config.json`` with a ChatML-style chat template (system/user/assistant/tool, light
  tool-call support, ``add_generation_prompt``);
- ``config.json`` for a 2-layer Llama with hidden size 64 and head_dim 32 (engines such as vllm
  need head_dim >= 32), and ``generation_config.json``;
- with ``--weights``, ``model.safetensors`` holding seeded random float32 weights with the real
  Llama parameter names and shapes. Weights are never committed (see ``tiny/.gitignore``).

Usage::

    python examples/models/make_tiny.py                 # writes examples/models/tiny/
    python examples/models/make_tiny.py --weights       # ... plus model.safetensors
    python examples/models/make_tiny.py --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tiny"

SEED = 20240607
VOCAB_SIZE = 3000
NUM_SENTENCES = 6000

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# Llama shape: hidden = heads * head_dim.
HIDDEN_SIZE = 64
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 32
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 2048

# ChatML with a Qwen-2.5-like tool section, kept small. `bos_token` comes first so that a rendered
# prompt tokenized with add_special_tokens=False starts with bos, as Llama 3 templates do.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}
{{- part.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token }}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}
{{- render_content(messages[0].content) + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' }}
{{- tool | tojson }}
{%- endfor %}
{{- '\\n</tools>\\n\\nReturn each call as {\"name\": ..., \"arguments\": ...} within <tool_call></tool_call>.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}
{{- '<|im_start|>system\\n' + render_content(message.content) + '<|im_end|>\\n' }}
{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + render_content(message.content) + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.content %}
{{- render_content(message.content) }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}
{%- set tool_call = tool_call.function %}
{%- endif %}
{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}
{%- if tool_call.arguments is string %}
{{- tool_call.arguments }}
{%- else %}
{{- tool_call.arguments | tojson }}
{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>tool\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- raise_exception('Unknown message role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the old man",
    "our team",
    "the server",
    "this model",
    "the router",
    "a worker",
    "the frontend",
    "every request",
    "the scheduler",
    "she",
    "he",
    "they",
    "we",
    "you",
    "the engine",
    "a small bird",
    "the teacher",
    "the GPU",
    "the cache",
]
_VERBS = [
    "runs",
    "sees",
    "likes",
    "builds",
    "sends",
    "reads",
    "writes",
    "finds",
    "moves",
    "stops",
    "starts",
    "waits for",
    "answers",
    "routes",
    "streams",
    "decodes",
    "counts",
    "loads",
    "keeps",
    "returns",
    "helps",
    "opens",
    "closes",
    "tells",
    "asks about",
    "walks to",
    "looks at",
]
_OBJECTS = [
    "the house",
    "a token",
    "the message",
    "an answer",
    "the blue car",
    "the data",
    "a story",
    "the weather",
    "the river",
    "a new book",
    "the tokens",
    "the prompt",
    "the door",
    "a song",
    "the result",
    "the city",
    "the garden",
    "a question",
    "the block",
    "the key",
    "the value",
]
_ADVERBS = [
    "quickly",
    "slowly",
    "today",
    "again",
    "at night",
    "in the morning",
    "without a pause",
    "very well",
    "once more",
    "by design",
    "on time",
    "in parallel",
    "for a while",
]
_CONNECTORS = ["and", "but", "because", "so", "while", "although", "then", "if", "when"]
_NON_ASCII = [
    "café",
    "naïve",
    "résumé",
    "crème brûlée",
    "déjà vu",
    "über",
    "señor",
    "façade",
    "Ångström",
    "Straße",
    "中文",
    "你好\uff0c世界",
    "日本語",
    "こんにちは",
    "한국어",
    "Привет, мир",
    "Ελληνικά",
    "العربية",
    "हिन्दी",
    "🙂",
    "🚀",
    "👍🏽",
    "🎉",
    "❤️",
    "👨‍👩‍👧",
    "∑ x² ≤ π",
    "€ 12,50",
    "°C",
    "—",
    "…",
]
_PUNCT = [".", "!", "?", ";", ":", ",", "...", " -", " (ok)", ' "quoted"', " [x]", " {y}", " <z>"]
_TOOL_NAMES = ["get_weather", "search", "add", "lookup_user", "send_email"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADVERBS))
    if rng.random() < 0.3:
        words += [
            rng.choice(_CONNECTORS),
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
        ]
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_NON_ASCII))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), str(rng.randrange(0, 100_000)))
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    return text + rng.choice(_PUNCT)


def _structured_line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        args = {
            "city": rng.choice(["Paris", "Tokyo", "São Paulo", "北京"]),
            "days": rng.randrange(1, 8),
        }
        call = {"name": rng.choice(_TOOL_NAMES), "arguments": args}
        return "<tool_call>\n" + json.dumps(call, ensure_ascii=False) + "\n</tool_call>"
    if kind == 1:
        a, b = rng.randrange(1000), rng.randrange(1000)
        return f"{a} + {b} = {a + b}; {a} * {b} = {a * b}; {a / (b or 1):.3f}"
    if kind == 2:
        name = rng.choice(["x", "count", "value", "result", "tokens"])
        return f"def f({name}):\n    return {name} + {rng.randrange(10)}  # note"
    return rng.choice(["system", "user", "assistant", "tool"]) + ": " + _sentence(rng)


def synthetic_corpus(seed: int = SEED, n: int = NUM_SENTENCES) -> list[str]:
    """Deterministic English-ish text with digits, punctuation, code, JSON and non-ASCII text."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n):
        if rng.random() < 0.15:
            lines.append(_structured_line(rng))
        else:
            lines.append(" ".join(_sentence(rng) for _ in range(rng.randrange(1, 4))))
    # Every non-ASCII sample on its own too, so each gets merged tokens and not only raw bytes.
    lines.extend(_NON_ASCII * 5)
    return lines


def build_tokenizer(lines: list[str]) -> Any:
    """Train a byte-level BPE tokenizer; bos is added by the post-processor when asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return tok


def tokenizer_config(tok: Any) -> dict[str, Any]:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(tok: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)],
        "pad_token_id": tok.token_to_id(EOS),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(tok: Any) -> dict[str, Any]:
    return {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)],
        "pad_token_id": tok.token_to_id(EOS),
        "do_sample": False,
    }


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Llama parameter names and shapes, as `LlamaForCausalLM.state_dict()` has them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_weights(config: dict[str, Any], path: Path, seed: int = SEED) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            std = config["initializer_range"]
            tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path, *, weights: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(synthetic_corpus())
    # Compact JSON keeps tokenizer.json small; its content is deterministic.
    tok.save(str(out / "tokenizer.json"), pretty=False)
    _write_json(out / "tokenizer_config.json", tokenizer_config(tok))
    config = model_config(tok)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(tok))
    (out / ".gitignore").write_text(
        "# Random weights: regenerate with make_tiny.py --weights\n*.safetensors\n"
    )
    if weights:
        write_weights(config, out / "model.safetensors")
    print(f"wrote {out} (vocab {config['vocab_size']}{', weights' if weights else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--weights", action="store_true", help="also write random model.safetensors"
    )
    args = parser.parse_args()
    # Training is deterministic either way; one thread avoids any doubt about merge tie order.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build(args.out, weights=args.weights)


if __name__ == "__main__":
    main()
