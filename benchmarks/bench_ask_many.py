"""Compress once, ask many: time to first token of the k-th question over one long document, with a
saved compressed context against re-prefilling the document for every question; bytes on disk
against a saved full cache; memory of N forks; the RULER-style score from the loaded cache.

    python benchmarks/bench_ask_many.py                                  # both models, 2 documents each (~1 h on 2 cores)
    python benchmarks/bench_ask_many.py --models smollm2-135m --docs 1 --budgets 2.5 4

Documents are RULER-style niah_multikey prompts (``rdkv_hf.eval.tasks``: four needles "One of the
special magic numbers for <key> is: <7 digits>." in a haystack; SmolLM2-135M-Instruct at 2.5K tokens
in its chat template with the noise haystack, Gemma-3-270m at 8K as raw text with the text
haystack, as ``rdkv-hf eval`` runs them). Each document is split before its question: the
document is the context, and each of its four keys is one question (the RULER question and answer
prefix for that key; scored by RULER's string match on its value).

Per document:

* ``full, re-prefill``: the unpatched model with Transformers' ``DynamicCache``, the document and the
  question in one prompt for every question (what a user without a saved context does);
* ``RDKV, re-prefill``: the same through RDKV (the question is in the prompt, so RDKV's window
  queries see it: question-aware compression);
* ``RDKV, saved context``: the document compressed once (``rdkv_hf.context.prefill``), saved,
  loaded once (``RDKVCache.from_pretrained``), and every question asked on a fork of the loaded
  cache: question 1 pays the load, every later one only its own tokens (the compression is
  question-agnostic: the window queries are the document's last tokens). The same questions asked
  of the in-memory cache must give the same tokens, and so the same score.
* ``RDKV, saved context, one batch``: the four questions in one padded ``generate()``.

TTFT is the time from the request to the first token's logits (a logits processor marks the first
step). ``other`` is the CPU cores other processes used meanwhile (``bench_decode.OtherLoad``):
above ~0.1 the machine was shared and timings are slower than on an idle one. Results go to
``--out`` (``results.json``, ``table.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import OtherLoad, loadavg, machine  # noqa: E402
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

import rdkv_hf  # noqa: E402
from rdkv_hf import RDKVCache  # noqa: E402
from rdkv_hf.cache import held_nbytes  # noqa: E402
from rdkv_hf.compat import cache_kwargs  # noqa: E402
from rdkv_hf.context import QUESTION, ask, context_prompt, prefill  # noqa: E402

SETUP = {  # model: (context tokens, haystack, default budgets)
    "smollm2-135m": (2500, "noise", (2.5, 4.0)),
    "gemma3-270m": (8192, "text", (2.5,)),
}
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
MAX_NEW = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(SETUP), choices=list(SETUP))
    p.add_argument("--docs", type=int, default=2, help="documents per model (4 questions each)")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="RDKV bits per element (default: 2.5 and 4 on SmolLM2, 2.5 on Gemma)")
    p.add_argument("--no-profile", action="store_true", help="plain RDKV (default: the shipped profile, rdkv+profile)")
    p.add_argument("--no-reprefill", action="store_true", help="skip the re-prefill rows (the slow ones)")
    p.add_argument("--compress-questions", action="store_true",
                   help="compress each question's tokens too (compress_followups=True); by default they stay in full precision, "
                        "as `rdkv-hf compress` saves a context")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ask_many")
    p.add_argument("--rebuild", type=Path, default=None, help="only summarize a finished run's log or results.json into --out")
    return p.parse_args(argv)


class FirstStep(LogitsProcessor):
    """Marks the time of the first generation step (the first token's logits are ready)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def documents(tokenizer, model_name: str, n_docs: int):
    """``(document, [(question, answer prefix, value)])`` of `n_docs` niah_multikey samples."""
    from rdkv_hf.eval import tasks
    from rdkv_hf.text import load_text

    length, haystack, _ = SETUP[model_name]
    chat = tokenizer.chat_template is not None
    out = []
    for seed in range(n_docs):
        sample = tasks.niah_multikey(tokenizer, length, seed, haystack, load_text("eval") if haystack == "text" else None, chat=chat)
        assert sample.prompt.endswith("\n" + sample.question)
        document = sample.prompt[: -len(sample.question) - 1]
        questions = [(f"What is the special magic number for {key} mentioned in the provided text?",
                      f"The special magic number for {key} mentioned in the provided text is", value)
                     for key, value in NEEDLE.findall(document)]
        assert len(questions) == 4, questions
        out.append((document, questions))
    return out


def encode(tokenizer, document: str, questions):
    """Context ids and each question's ids, rendered as ``tasks.render`` renders the whole prompt."""
    chat = tokenizer.chat_template is not None
    ids, template = context_prompt(tokenizer, document, chat=chat, separator="\n", raw_template=QUESTION)
    qs = [tokenizer(template.replace(QUESTION, q) + (prefix if chat else " " + prefix), add_special_tokens=False).input_ids
          for q, prefix, _ in questions]
    return torch.tensor([ids]), qs


def timed_generate(model, ids, cache=None, start: float | None = None):
    """``(ttft seconds, answer ids, other load)`` of a greedy answer to `ids`, the TTFT counted from
    `start` (default: now)."""
    mark, load = FirstStep(), OtherLoad()
    load.start()
    start = time.perf_counter() if start is None else start
    kw = cache_kwargs(cache) if cache is not None else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         logits_processor=LogitsProcessorList([mark]), pad_token_id=model.generation_config.eos_token_id, **kw)
    return mark.at - start, out[0, ids.shape[1]:].tolist(), load.stop()


def score(tokenizer, answer: list[int], value: str) -> float:
    return float(value in tokenizer.decode(answer, skip_special_tokens=True))


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def save_full(cache, folder: Path) -> int:
    """A DynamicCache saved as safetensors (every layer's K/V as it holds them); its bytes on disk."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{n}": getattr(layer, n).contiguous() for i, layer in enumerate(cache.layers) for n in ("keys", "values")}
    save_file(tensors, str(folder / "full.safetensors"))
    return dir_bytes(folder)


def _row(tok, questions, method, budget, n_ctx, ttft, answers, other, **extra) -> dict:
    return dict(method=method, budget=budget, context=n_ctx, ttft=ttft,
                score=100 * statistics.mean(score(tok, a, v) for a, (_, _, v) in zip(answers, questions)),
                answers=[tok.decode(a, skip_special_tokens=True) for a in answers], other=max(other), **extra)


@torch.no_grad()
def full_rows(model, tok, ctx, full_q, questions, work: Path, reprefill: bool) -> tuple[list[dict], int]:
    """The unpatched model: every question re-prefilled; and the bytes of the document's full cache saved."""
    rdkv_hf.unpatch(model)
    cache = DynamicCache(config=model.config)
    model(ctx, **cache_kwargs(cache), logits_to_keep=1)
    disk = save_full(cache, work / "full")
    del cache
    if not reprefill:
        return [], disk
    res = [timed_generate(model, ids) for ids in full_q]
    return [_row(tok, questions, "full, re-prefill", None, ctx.shape[1], [r[0] for r in res], [r[1] for r in res], [r[2] for r in res],
                 disk=disk)], disk


@torch.no_grad()
def rdkv_rows(model, tok, profile, budget: float, ctx, qs, full_q, questions, work: Path, reprefill: bool,
              compress_questions: bool, full_disk: int) -> list[dict]:
    rows = []
    rdkv_hf.patch(model, budget=budget, profile=profile, compress_followups=compress_questions)
    if reprefill:
        res = [timed_generate(model, ids, RDKVCache(model)) for ids in full_q]
        rows.append(_row(tok, questions, "RDKV, re-prefill", budget, ctx.shape[1], [r[0] for r in res], [r[1] for r in res],
                         [r[2] for r in res]))

    # Compress once, save, load once, ask on forks.
    load = OtherLoad()
    load.start()
    start = time.perf_counter()
    cache = prefill(model, ctx)
    compress_s = time.perf_counter() - start
    cache.save_pretrained(work / "ctx")
    other_compress = load.stop()
    in_memory = [timed_generate(model, ids, cache.fork())[1] for ids in full_q]
    del cache

    ttft, answers, other, forks = [], [], [], []
    for k, ids in enumerate(full_q):
        load = OtherLoad()
        load.start()
        start = time.perf_counter()
        if k == 0:
            loaded = RDKVCache.from_pretrained(work / "ctx", model)
            load_s = time.perf_counter() - start
        fork = loaded.fork()
        t, a, _ = timed_generate(model, ids, fork, start=start)  # question 1 pays the load
        ttft.append(t)
        answers.append(a)
        other.append(load.stop())
        forks.append(fork)
    rows.append(_row(tok, questions, "RDKV, saved context", budget, ctx.shape[1], ttft, answers, other,
                     disk=dir_bytes(work / "ctx"), full_disk=full_disk, compress_s=compress_s, load_s=load_s, other_compress=other_compress,
                     same_as_in_memory=answers == in_memory, forks_bytes=held_nbytes(forks), one_fork_bytes=held_nbytes(forks[:1]),
                     bits=loaded.summary().prompt_bits_per_element))

    # All four in one padded batch, from the loaded cache.
    mark, load = FirstStep(), OtherLoad()
    load.start()
    start = time.perf_counter()
    batch = ask(model, loaded, qs, max_new_tokens=MAX_NEW, logits_processor=LogitsProcessorList([mark]))
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    alone = [a[: next((j for j, t in enumerate(a) if t in eos), len(a))] for a in answers]  # ask() cuts at the EOS
    rows.append(_row(tok, questions, "RDKV, saved context, one batch", budget, ctx.shape[1], [mark.at - start] * len(qs), batch,
                     [load.stop()], same_as_one_by_one=batch == alone))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (model, method, budget): TTFT of question k (mean over documents), score, bytes."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["budget"]), []).append(r)
    out = []
    for (model_name, method, budget), rs in groups.items():
        line = dict(model=model_name, method=method, budget=budget, context=round(statistics.mean(r["context"] for r in rs)),
                    docs=len(rs), score=statistics.mean(r["score"] for r in rs), other=max(r["other"] for r in rs))
        for k in range(len(rs[0]["ttft"])):
            line[f"ttft_q{k + 1}"] = statistics.mean(r["ttft"][k] for r in rs)
        for key in ("disk", "full_disk", "compress_s", "load_s", "forks_bytes", "one_fork_bytes", "bits"):
            if key in rs[0]:
                line[key] = statistics.mean(r[key] for r in rs)
        for key in ("same_as_in_memory", "same_as_one_by_one"):
            if key in rs[0]:
                line[key] = all(r[key] for r in rs)
        out.append(line)
    return out


def table(lines: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    head = ("| model | context | method | TTFT q1 (s) | q2 | q3 | q4 | on disk (MiB) | score | other |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    same = lambda x: " (answers = one by one)" if x.get("same_as_one_by_one") else " (answers differ from one by one)" \
        if "same_as_one_by_one" in x else ""  # noqa: E731
    body = []
    for x in lines:
        name = x["method"] + (f" {x['budget']:g} b" if x["budget"] is not None else "") + same(x)
        disk = mib(x["disk"]) if "disk" in x else ""
        body.append(f"| {x['model']} | {x['context']:,} | {name} | " + " | ".join(f"{x[f'ttft_q{k}']:.2f}" for k in range(1, 5))
                    + f" | {disk} | {x['score']:.1f} | {x['other']:.2f} |")
    # N forks hold the shared part once and each its own part: forks = shared + N own, one = shared + own.
    mem = ["", "| model | budget | on disk (MiB) | saved full cache (MiB) | one fork (MiB) | 4 forks (MiB) | 4 x one fork (MiB) | "
           "shared by the forks (MiB) | each fork's own (MiB) | compress (s) | load (s) | bits | loaded = in-memory |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
        if "forks_bytes" in x:
            own = (x["forks_bytes"] - x["one_fork_bytes"]) / 3
            mem.append(f"| {x['model']} | {x['budget']:g} | {mib(x['disk'])} | {mib(x['full_disk'])} ({x['full_disk'] / x['disk']:.1f}x) | "
                       f"{mib(x['one_fork_bytes'])} | {mib(x['forks_bytes'])} | {mib(4 * x['one_fork_bytes'])} | "
                       f"{mib(x['one_fork_bytes'] - own)} | {mib(own)} | {x['compress_s']:.1f} | {x['load_s']:.3f} | {x['bits']:.2f} | "
                       f"{'yes' if x['same_as_in_memory'] else 'NO'} |")
    return "\n".join([head] + body + mem)


def rebuild(path: Path, out: Path) -> None:
    """Summarize rows printed by a run (its log, one JSON object a line) or its results.json."""
    text = path.read_text()
    rows = json.loads(text)["rows"] if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    for r in rows:  # runs before the EOS cut compared uncut answers
        if "same_as_one_by_one" in r:
            alone = next(x["answers"] for x in rows if x["model"] == r["model"] and x["doc"] == r["doc"]
                         and x["budget"] == r["budget"] and x["method"] == "RDKV, saved context")
            r["same_as_one_by_one"] = [a.strip() for a in r["answers"]] == [a.strip() for a in alone]
    lines = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "rows": rows, "summary": lines}, indent=1) + "\n")
    (out / "table.md").write_text(f"machine: {machine()}\n\n{table(lines)}\n")
    print(table(lines))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rebuild:
        return rebuild(args.rebuild, args.out)
    torch.set_num_threads(args.threads)
    from rdkv_hf.eval.models import load_model, shipped_profile

    print(f"machine: {machine()}; threads {args.threads}; loadavg {loadavg()}", flush=True)
    rows = []
    for model_name in args.models:
        model, tok = load_model(model_name)
        profile = None if args.no_profile else shipped_profile(model_name)
        for d, (document, questions) in enumerate(documents(tok, model_name, args.docs)):
            ctx, qs = encode(tok, document, questions)
            full_q = [torch.cat([ctx, torch.tensor([q])], 1) for q in qs]
            with tempfile.TemporaryDirectory() as work:
                new, full_disk = full_rows(model, tok, ctx, full_q, questions, Path(work), not args.no_reprefill)
                for budget in args.budgets or SETUP[model_name][2]:
                    new += rdkv_rows(model, tok, profile, budget, ctx, qs, full_q, questions, Path(work), not args.no_reprefill,
                                     args.compress_questions, full_disk)
            for r in new:
                rows.append(dict(model=model_name, doc=d, **r))
                print(json.dumps(rows[-1]), flush=True)
        rdkv_hf.unpatch(model)
        del model
    lines = summarize(rows)
    text = table(lines)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows, "summary": lines},
                                                      indent=1) + "\n")
    (args.out / "table.md").write_text(f"machine: {machine()}; threads {args.threads}\n\n{text}\n")
    print(f"\nwrote {args.out}/results.json and table.md")


if __name__ == "__main__":
    main()
