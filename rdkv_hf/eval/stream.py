"""What happens during decode: a long text streamed through each method's cache after a short prompt.

``rdkv-hf eval --tasks stream`` (and :func:`evaluate_stream`) runs, per sample, the demo's recall
prompt (``eval.prompts.recall_prompt``: a five-digit code in held-out text, the question at the
end) with its code placed early: the first ``prompt_tokens`` tokens are the prompt (compressed by
the RDKV methods as any prompt), everything after them goes through the decode path, teacher
forced. The answer starts, as RULER's do, with its first words given ("The secret code of the
blue door is ", ``prompts.RECALL_ANSWER``) and the code is generated greedily after them, so that
the recall measures what the cache kept rather than a small model's instruction following (without
them SmolLM2 answers a question in six "The five-digit number is 123456789" with the full cache
too). Each cell records

* ``ppl``: the perplexity of the last ``ppl_tokens`` streamed tokens of text (before the question);
* ``recall``: whether the answer holds the code (given ``depth`` into the stream, asked at its end);
* ``digit_nll``: the code's digits teacher forced after the answer's first words, mean NLL (a
  steadier signal than a yes/no over a few samples), and ``digits_right``: how many are the argmax;
* ``recall_plain`` / ``answer_plain``: the answer generated right after the question (on a fork of
  the cache), what this task measured before the answer's first words were given;
* ``nbytes``: the cache's bytes at the end of the stream, and as a share of a bf16 full cache.

The stream is fed in chunks that end where a decode block falls due (``decode_block`` tokens past
the tail's ``keep``), which is what feeding it token by token computes: between two packs every
query attends to the same full-precision tail and packed segments, and a block is weighed by the
same queries (tested in ``tests/test_stream.py``). It is 30-50 times faster on a CPU.

Methods (:data:`STREAM_METHODS`): the full cache; RDKV with compressed decoding, without and with
the cap; RDKV + profile (the model's shipped profile's head budgets), without and with the cap;
the eviction peers on the same cache under the same cap (StreamingLLM sinks + recent window, SnapKV
scores re-pruned every block as kvpress's DecodingPress, random per-head eviction); uniform KIVI-2
quantized on append (no eviction, so no cap: its own bytes). The cap is ``cap_share`` of the full cache's bf16 bytes at the end of the stream.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compat import cache_kwargs

RESULTS_FILE = "stream.jsonl"
# In every cell's key: records of earlier versions (the answer generated after the question, its
# first token taken from the logits of the prompt's last token) are not resumed.
ANSWER_VERSION = "answer-prefix"

# name -> (RDKVConfig settings, capped); None: the full cache
STREAM_METHODS: dict[str, tuple[dict, bool] | None] = {
    "full": None,
    "rdkv": (dict(mode="rdkv"), False),
    "rdkv-cap": (dict(mode="rdkv"), True),
    "rdkv+profile": (dict(mode="rdkv+profile"), False),
    "rdkv+profile-cap": (dict(mode="rdkv+profile"), True),
    "streamingllm-cap": (dict(mode="streamingllm", budget=16.0), True),
    "snapkv-cap": (dict(mode="snapkv", budget=16.0), True),
    "random-cap": (dict(mode="random", budget=16.0), True),
    "kivi2": (dict(mode="uniform"), False),
}
LABELS = {
    "full": "full cache", "rdkv": "RDKV, decode blocks", "rdkv-cap": "RDKV, decode blocks + cap",
    "rdkv+profile": "RDKV + profile, decode blocks", "rdkv+profile-cap": "RDKV + profile, decode blocks + cap",
    "streamingllm-cap": "StreamingLLM (sinks + window) + cap",
    "snapkv-cap": "SnapKV re-pruned every block (DecodingPress-style) + cap", "random-cap": "random per-head eviction + cap",
    "kivi2": "uniform KIVI-2 on append",
}


@dataclass
class StreamSettings:
    """What to stream. `stream_tokens` counts everything after the prompt (text, code, question)."""

    model_name: str
    methods: tuple = tuple(STREAM_METHODS)
    budget: float = 2.5
    cap_share: float = 0.10
    decode_block: int = 128
    prompt_tokens: int = 64
    stream_tokens: int = 6144
    ppl_tokens: int = 1024
    depth: float = 0.1
    samples: int = 3
    seed: int = 0
    answer_tokens: int = 16
    extra: dict = field(default_factory=dict)  # more RDKVConfig settings for every RDKV method

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in STREAM_METHODS]
        if bad:
            raise ValueError(f"unknown stream method(s) {bad}; valid ones: {', '.join(STREAM_METHODS)}")
        if not 0 < self.cap_share <= 1:
            raise ValueError(f"`cap_share` must be in (0, 1], got {self.cap_share}")
        if self.ppl_tokens >= self.stream_tokens:
            raise ValueError(f"`ppl_tokens`={self.ppl_tokens} must be below `stream_tokens`={self.stream_tokens}")


def stream_sample(tokenizer, settings: StreamSettings, seed: int):
    """``(ids [1, T], code, text_end)``: the recall prompt of ``prompt_tokens + stream_tokens``
    tokens with its code at ``depth`` of the stream, and where its text ends (the question after)."""
    from .prompts import RECALL_OUTRO, RECALL_QUESTION, recall_prompt

    total = settings.prompt_tokens + settings.stream_tokens
    # recall_prompt's depth is of its haystack, which starts right after the short instruction.
    ids, code = recall_prompt(tokenizer, total, seed=seed, depth=settings.depth)
    question = tokenizer(RECALL_OUTRO.format(question=RECALL_QUESTION), add_special_tokens=False).input_ids
    tail = len(question) + 16  # the question and the chat template's turn markers
    return ids, code, ids.shape[1] - tail


def chunk_sizes(cfg, prompt: int, total: int) -> list[int]:
    """Chunks of the stream (after `prompt` tokens, up to `total`) that end where a decode block is
    due for `cfg` (an RDKVConfig with ``decode_block``), so chunked equals token by token."""
    from ..decode_blocks import keep_tokens

    tail = min(cfg.residual, prompt)  # what the prompt leaves in the tail
    first = cfg.decode_block + keep_tokens(cfg) - tail
    sizes, done = [], prompt
    step = first
    while done < total:
        sizes.append(min(step, total - done))
        done += sizes[-1]
        step = cfg.decode_block
    return sizes


def _config(name: str, settings: StreamSettings, cap: int | None, head_dim: int):
    from ..config import RDKVConfig
    from .methods import uniform_budget

    spec = STREAM_METHODS[name]
    opts = dict(spec[0])
    if opts["mode"] == "uniform":
        # KIVI-2: the budget that stores 2-bit codes with their scales over the prompt and each block
        opts["budget"] = uniform_budget(2, head_dim, min(settings.prompt_tokens, settings.decode_block))
    opts.setdefault("budget", settings.budget)
    # min_tokens=0, observe=0: the 64-token prompt is packed at its forward, as a long one would be
    # (and so chunked equals token by token); the stream measures the decode path. `extra` may override.
    opts.update(decode_block=settings.decode_block, compress_followups=False, min_tokens=0, observe=0,
                max_cache_bytes=cap if spec[1] else None)
    return RDKVConfig(**{**opts, **settings.extra})


@torch.no_grad()
def run_cell(model, ids: torch.Tensor, code: str, text_end: int, name: str, settings: StreamSettings, profile, tokenizer) -> dict:
    """Stream one sample through one method; returns the cell's record."""
    from transformers import DynamicCache

    from ..cache import RDKVCache, layer_nbytes
    from ..patching import patch, unpatch

    P, T = settings.prompt_tokens, ids.shape[1]
    cfg = None
    bf16 = _bf16_bytes(model, T)
    cap = int(settings.cap_share * bf16)
    start = time.perf_counter()
    if STREAM_METHODS[name] is None:
        cache = DynamicCache(config=model.config)
        sizes = [settings.decode_block] * math.ceil((T - P) / settings.decode_block)
    else:
        tc = model.config.get_text_config(decoder=True)
        cfg = _config(name, settings, cap, getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
        patch(model, config=cfg, profile=profile if cfg.mode == "rdkv+profile" else None)
        cache = RDKVCache(model)
        sizes = chunk_sizes(cfg, P, T)
    try:
        logits = [model(ids[:, :P], **cache_kwargs(cache), logits_to_keep=1).logits[0, -1:].float()]
        pos, most = P, 0
        for n in sizes:
            out = model(ids[:, pos : pos + n], **cache_kwargs(cache))
            logits.append(out.logits[0].float())
            pos += n
            most = max(most, sum(layer_nbytes(cache)))
        end_bytes = sum(layer_nbytes(cache))
        logits = torch.cat(logits)  # logits[i] predicts ids[P + i]; the last one the answer's first token
        lo = text_end - settings.ppl_tokens
        nll = F.cross_entropy(logits[lo - P : text_end - P], ids[0, lo:text_end], reduction="sum").item()
        answer_plain = _greedy(model, _fork(cache), logits[-1], settings.answer_tokens, tokenizer)
        answer, digit_nll, digits_right, n_digits = _answer(model, cache, code, settings.answer_tokens, tokenizer)
    finally:
        if cfg is not None:
            unpatch(model)
    return dict(
        method=name, label=LABELS[name], budget=None if cfg is None else cfg.budget, decode_block=settings.decode_block,
        prompt_tokens=P, tokens=T, ppl=math.exp(nll / settings.ppl_tokens), nll_sum=nll, answer=answer, code=code,
        recall=float(code in answer), digit_nll=digit_nll, digits_right=digits_right, digits=n_digits,
        answer_plain=answer_plain, recall_plain=float(code in answer_plain), nbytes=end_bytes, max_nbytes=most, bf16_bytes=bf16, cap=cap if cfg is not None and
        cfg.max_cache_bytes else None, pct_bf16=100.0 * end_bytes / bf16, seconds=round(time.perf_counter() - start, 1),
    )


def _bf16_bytes(model, tokens: int) -> int:
    """Bytes of a bf16 full cache of `tokens` tokens (every layer; sliding layers at their window)."""
    from ..compat import layer_types

    tc = model.config.get_text_config(decoder=True)
    H = tc.num_key_value_heads
    D = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    window = getattr(tc, "sliding_window", None)
    per = [min(tokens, window) if t == "sliding_attention" and window else tokens for t in layer_types(tc)]
    return sum(per) * H * D * 2 * 2


def _fork(cache):
    """A copy of `cache` to generate from, leaving `cache` as it was."""
    return cache.fork() if hasattr(cache, "fork") else copy.deepcopy(cache)


def _answer(model, cache, code: str, n: int, tokenizer) -> tuple[str, float, int, int]:
    """``(answer, digit_nll, digits_right, digits)``: the answer's first words (``RECALL_ANSWER`` and
    a space) through `cache`, then `n` greedy tokens on a fork (the answer, without the given words),
    and the code's digits teacher forced on `cache` (their mean NLL, how many are the argmax)."""
    from .prompts import RECALL_ANSWER

    ids = tokenizer(f"{RECALL_ANSWER} {code}", add_special_tokens=False).input_ids
    digits = tokenizer(code, add_special_tokens=False).input_ids
    if ids[-len(digits):] != digits:
        raise ValueError(f"the tokenizer splits the code {code!r} differently after the answer's first words; cannot score its digits")
    lead = ids[: -len(digits)]
    first = model(input_ids=torch.tensor([lead]), **cache_kwargs(cache)).logits[0, -1].float()
    answer = _greedy(model, _fork(cache), first, n, tokenizer)
    rest = model(input_ids=torch.tensor([digits[:-1]]), **cache_kwargs(cache)).logits[0].float()
    scores = torch.cat([first[None], rest])
    target = torch.tensor(digits)
    nll = F.cross_entropy(scores, target).item()
    return answer, nll, int((scores.argmax(-1) == target).sum()), len(digits)


def _greedy(model, cache, first_logits, n: int, tokenizer) -> str:
    tok, out = int(first_logits.argmax()), []
    for _ in range(n):
        out.append(tok)
        if tok == tokenizer.eos_token_id:
            break
        logits = model(input_ids=torch.tensor([[tok]]), **cache_kwargs(cache)).logits[0, -1]
        tok = int(logits.argmax())
    return tokenizer.decode(out, skip_special_tokens=True)


def evaluate_stream(model, tokenizer, settings: StreamSettings, out_dir, profile=None, progress: bool = True) -> list[dict]:
    """Run every pending (method, sample) cell, appending each to ``out_dir/stream.jsonl``
    (resumable), then write ``stream_table.md``. Returns the records of this grid."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    key = lambda m, s: json.dumps([settings.model_name, m, s, settings.stream_tokens, settings.decode_block, settings.budget,  # noqa: E731
                                   settings.cap_share, settings.depth, sorted(settings.extra.items()), ANSWER_VERSION])
    cells = [(m, settings.seed + i) for i in range(settings.samples) for m in settings.methods]
    todo = [c for c in cells if key(*c) not in done]
    samples = {}
    for m, s in tqdm(todo, desc="stream", disable=not progress):
        if STREAM_METHODS[m] and STREAM_METHODS[m][0]["mode"] == "rdkv+profile" and profile is None:
            continue  # no shipped profile for this model
        if s not in samples:
            samples[s] = stream_sample(tokenizer, settings, s)
        ids, code, text_end = samples[s]
        rec = dict(key=key(m, s), model=settings.model_name, seed=s, **run_cell(model, ids, code, text_end, m, settings, profile, tokenizer))
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[rec["key"]] = rec
    records = [done[key(*c)] for c in cells if key(*c) in done]
    (out_dir / "stream_table.md").write_text(stream_table(records, settings))
    return records


def stream_table(records: list[dict], settings: StreamSettings) -> str:
    """A markdown table: per method, mean perplexity, recall, bytes (share of bf16), max bytes; "vs
    full" against the full cache on the same samples (a method run on fewer samples is compared with
    the full cache on those)."""
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    full = {r.get("seed"): r for r in by.get("full", ())}
    lines = [
        f"Streaming: {settings.prompt_tokens}-token prompt, {settings.stream_tokens} tokens through the decode path, "
        f"decode_block {settings.decode_block}, budget {settings.budget}, cap {settings.cap_share:.0%} of the full "
        f"cache's bf16 bytes; perplexity of the last {settings.ppl_tokens} text tokens; recall of a code at "
        f"{settings.depth:.0%} of the stream, asked at its end, the answer's first words given (code NLL: its digits "
        "teacher forced, mean; question only: the answer generated right after the question).",
        "",
        "| method | samples | % of bf16 bytes (end) | max bytes / cap | PPL | vs full | recall | vs full | code NLL "
        "| recall, question only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in STREAM_METHODS:
        rs = by.get(m)
        if not rs:
            continue
        ppl, recall, pct = _mean(rs, "ppl"), _mean(rs, "recall"), _mean(rs, "pct_bf16")
        cap = rs[0].get("cap")
        vs_cap = f"{max(r['max_nbytes'] / r['cap'] for r in rs):.3f}" if cap else "—"
        paired = [full[r.get("seed")] for r in rs if r.get("seed") in full]
        full_ppl, full_recall = (_mean(paired, "ppl"), _mean(paired, "recall")) if len(paired) == len(rs) else (None, None)
        d_ppl = f"{100 * (ppl / full_ppl - 1):+.1f}%" if full_ppl else "—"
        d_rec = f"{100 * recall / full_recall:.0f}%" if full_recall else "—"
        # records written before the answer's first words were given have neither
        nll, plain = _mean(rs, "digit_nll"), _mean(rs, "recall_plain")
        nll = "—" if nll is None else f"{nll:.2f}"
        plain = "—" if plain is None else f"{100 * plain:.0f}%"
        lines.append(f"| {LABELS[m]} | {len(rs)} | {pct:.1f}% | {vs_cap} | {ppl:.2f} | {d_ppl} | {100 * recall:.0f}% | {d_rec} | {nll} "
                     f"| {plain} |")
    return "\n".join(lines) + "\n"


def _mean(records: list[dict], key: str) -> float | None:
    """The mean of `key` over `records`; None if a record lacks it."""
    if not all(key in r for r in records):
        return None
    return sum(r[key] for r in records) / len(records)


__all__ = ["STREAM_METHODS", "StreamSettings", "chunk_sizes", "evaluate_stream", "run_cell", "stream_sample", "stream_table"]
