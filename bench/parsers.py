"""Tool-call and reasoning parser cost per streamed token, per family.

    python bench/parsers.py                 # every family, outputs of ~400 and ~8000 tokens
    python bench/parsers.py --repeat 50

For each tool-call family (paired with the reasoning parser its models use), a realistic output
in that family's format (reasoning, a sentence of content, two calls with nested JSON) is cut
into ~4-character "tokens" and fed to a fresh `OutputParser`, as the frontend does. Prints the
CPU microseconds per token (streaming) and per output (whole-text `parse`), for a short and a 20x
longer output: equal per-token figures at both lengths show the cost is linear in the output
(no re-scan of the text so far). The last line compares with the ~27 us per token that NVIDIA
Dynamo's frontend spends on everything.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from dynamo_core.llm.parsers import ParserSpec

ARGS = {"city": "Tōkyō", "days": 3, "filters": {"rain": True, "note": 'use {braces} and "q"'}}
REASONING = "The user asks about the weather, so I should call the tool with the city. " * 3
CONTENT = "Let me look that up for you. "


def _ds(name: str) -> str:
    return "<\uff5c" + name.replace("_", "\u2581") + "\uff5c>"


def _calls(fmt: str, n: int = 2) -> str:
    """`n` calls in `fmt`'s markup."""
    a = json.dumps(ARGS, ensure_ascii=False)
    ds_call = _ds("tool_call_begin")
    if fmt == "hermes":
        return f'<tool_call>\n{{"name": "get_weather", "arguments": {a}}}\n</tool_call>\n' * n
    if fmt == "llama3_json":
        return "; ".join([f'{{"name": "get_weather", "parameters": {a}}}'] * n)
    if fmt == "mistral":
        return f"[TOOL_CALLS]get_weather[ARGS]{a}" * n
    if fmt == "pythonic":
        call = 'get_weather(city="Tōkyō", days=3, filters={"rain": True, "note": "a) ]"})'
        return "[" + ", ".join([call] * n) + "]"
    if fmt == "deepseek_v3":
        call = f"{ds_call}function{_ds('tool_sep')}get_weather\n```json\n{a}\n```"
        return _ds("tool_calls_begin") + (call + _ds("tool_call_end")) * n + _ds("tool_calls_end")
    if fmt == "deepseek_v3_1":
        call = f"{ds_call}get_weather{_ds('tool_sep')}{a}{_ds('tool_call_end')}"
        return _ds("tool_calls_begin") + call * n + _ds("tool_calls_end")
    if fmt == "kimi_k2":
        calls = "".join(
            f"<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{a}"
            "<|tool_call_end|>"
            for i in range(n)
        )
        return f"<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>"
    obj = f'{{"name": "get_weather", "arguments": {a}}}'
    if fmt == "granite":
        return "<|tool_call|>[" + ", ".join([obj] * n) + "]"
    if fmt == "phi4":
        return "functools[" + ", ".join([obj] * n) + "]"
    if fmt == "jamba":
        return "<tool_calls>[" + ", ".join([obj] * n) + "]</tool_calls>"
    if fmt == "nemotron_deci":
        return "<TOOLCALL>[" + ", ".join([obj] * n) + "]</TOOLCALL>"
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in ARGS.items()}
    if fmt == "deepseek_v3_2":
        dsml = "<\uff5cDSML\uff5c"
        params = "".join(
            f'{dsml}parameter name="{k}" string="{str(isinstance(ARGS[k], str)).lower()}">{v}'
            f"</\uff5cDSML\uff5cparameter>\n"
            for k, v in values.items()
        )
        call = f'{dsml}invoke name="get_weather">\n{params}</\uff5cDSML\uff5cinvoke>\n'
        return f"{dsml}function_calls>\n{call * n}</\uff5cDSML\uff5cfunction_calls>"
    if fmt == "minimax_m2":
        params = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in values.items())
        call = f'<invoke name="get_weather">\n{params}</invoke>\n'
        return f"<minimax:tool_call>\n{call * n}</minimax:tool_call>"
    if fmt == "qwen3_coder":
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
        return f"<tool_call>\n<function=get_weather>\n{params}</function>\n</tool_call>\n" * n
    if fmt == "glm45":
        params = "".join(
            f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in values.items()
        )
        return f"<tool_call>get_weather\n{params}</tool_call>" * n
    raise ValueError(fmt)


def _harmony(r: str, n: int) -> str:
    call = (
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        f"<|message|>{json.dumps(ARGS)}<|call|>"
    )
    return f"<|channel|>analysis<|message|>{r}<|end|>" + call * n


# (tool-call parser, reasoning parser, text builder(reasoning, number of calls))
FAMILIES = {
    "hermes": (
        "hermes",
        "qwen3",
        lambda r, n: f"<think>\n{r}\n</think>\n\n{CONTENT}{_calls('hermes', n)}",
    ),
    "llama3_json": ("llama3_json", None, lambda r, n: _calls("llama3_json", n)),
    "mistral": (
        "mistral",
        "mistral",
        lambda r, n: f"[THINK]{r}[/THINK]{CONTENT}{_calls('mistral', n)}",
    ),
    "pythonic": ("pythonic", None, lambda r, n: _calls("pythonic", n)),
    "deepseek_v3": (
        "deepseek_v3",
        "deepseek_r1",
        lambda r, n: f"{r}</think>\n\n{CONTENT}{_calls('deepseek_v3', n)}",
    ),
    "deepseek_v3_1": (
        "deepseek_v3_1",
        "deepseek_r1",
        lambda r, n: f"{r}</think>{CONTENT}{_calls('deepseek_v3_1', n)}",
    ),
    "kimi_k2": ("kimi_k2", "kimi_k25", lambda r, n: f"{r}</think>{CONTENT}{_calls('kimi_k2', n)}"),
    "qwen3_coder": (
        "qwen3_coder",
        "qwen3",
        lambda r, n: f"<think>{r}</think>{CONTENT}{_calls('qwen3_coder', n)}",
    ),
    "glm45": ("glm45", "glm45", lambda r, n: f"<think>{r}</think>\n{CONTENT}{_calls('glm45', n)}"),
    "harmony": ("harmony", "gpt_oss", _harmony),
    "deepseek_v3_2": (
        "deepseek_v3_2",
        "deepseek_r1",
        lambda r, n: f"{r}</think>\n\n{CONTENT}{_calls('deepseek_v3_2', n)}",
    ),
    "minimax_m2": (
        "minimax_m2",
        "minimax_m2",
        lambda r, n: f"{r}\n</think>\n\n{CONTENT}{_calls('minimax_m2', n)}",
    ),
    "granite": ("granite", None, lambda r, n: CONTENT + _calls("granite", n)),
    "phi4": ("phi4", None, lambda r, n: _calls("phi4", n)),
    "jamba": ("jamba", None, lambda r, n: CONTENT + _calls("jamba", n)),
    "nemotron_deci": (
        "nemotron_deci",
        "nemotron_deci",
        lambda r, n: f"<think>{r}</think>\n{_calls('nemotron_deci', n)}",
    ),
    "content only (hermes)": ("hermes", None, lambda r, n: r),
    "no parser": (
        None,
        None,
        lambda r, n: f"<think>\n{r}\n</think>\n\n{CONTENT}{_calls('hermes', n)}",
    ),
}


def tokens(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(2, 6)
        out.append(text[i : i + n])
        i += n
    return out


def measure(spec: ParserSpec, pieces: list[str], repeat: int) -> float:
    """CPU seconds per streamed output (best of `repeat`)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        parser = spec.new_parser()
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    print(
        f"{'family':24} {'tokens':>7} {'us/token':>9} {'tokens(x20)':>12} {'us/token':>9} {'whole us':>9}"
    )
    worst = 0.0
    for label, (tool, think, build) in FAMILIES.items():
        spec = ParserSpec(tool, think)
        short = build(REASONING, 2)
        long = build(REASONING * 20, 40)
        p_short, p_long = tokens(short, rng), tokens(long, rng)
        per_short = measure(spec, p_short, args.repeat) / len(p_short) * 1e6
        per_long = measure(spec, p_long, max(1, args.repeat // 5)) / len(p_long) * 1e6
        whole = min(_whole(spec, short) for _ in range(args.repeat)) * 1e6
        worst = max(worst, per_short, per_long)
        print(
            f"{label:24} {len(p_short):7d} {per_short:9.2f} {len(p_long):12d} {per_long:9.2f} {whole:9.1f}"
        )
    print(
        f"summary: worst {worst:.2f} us/token streamed (NVIDIA Dynamo's whole frontend: ~27 us/token)"
    )


def _whole(spec: ParserSpec, text: str) -> float:
    start = time.process_time()
    spec.parse(text)
    return time.process_time() - start


if __name__ == "__main__":
    main()
