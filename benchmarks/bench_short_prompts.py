"""Short chats: does a compressed cache keep what the full cache answers? (issue "Nothing silently wrong")

    python benchmarks/bench_short_prompts.py --residuals 0                  # the defaults (min_tokens 512)
    python benchmarks/bench_short_prompts.py --min-tokens 0 --out benchmarks/results/short-prompts-residual-sweep.md
    python benchmarks/bench_short_prompts.py --residuals 0 128 --budgets 2.5 4 --modes rdkv rdkv+profile
    python benchmarks/bench_short_prompts.py --residuals 0 --observe 0 8 --only-long   # RDKVConfig.observe

SmolLM2-135M-Instruct (float32, chat template) answers 56 short chat prompts (20-300 tokens: plain
questions and instructions, and passages of held-out KJV text with a request) and 8 prompts of about
800 tokens, greedily, 24 new tokens, with the full cache and with RDKV. For each setting the table
gives, per length bucket, the share of answers identical to the full cache's and the mean KL divergence
(nats per answer token) of RDKV's next-token distribution from the full cache's, teacher-forcing the
full cache's answer, one token a forward as ``generate()`` feeds them (so that ``observe`` packs the prompt
where it would); with ``observe`` > 0 also the KL of the answer tokens after the largest `observe` (with it, the first
ones are computed over the prompt in full precision); and the cost of the residual: the bytes of a
2,048-token prompt's cache, packed, as a share of bf16. Writes ``benchmarks/results/short-prompts.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import OtherLoad, machine, write_report  # noqa: E402

import rdkv_hf  # noqa: E402
from rdkv_hf.compat import cache_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 24

QUESTIONS = [
    "Count to five, please.", "What is 12 times 7?", "Name three primary colors.", "What is the capital of France?",
    "Write a haiku about the sea.", "Give me a synonym for happy.", "What day comes after Monday?",
    "Translate 'good morning' into Spanish.", "How many legs does a spider have?", "What is the opposite of cold?",
    "Tell me a fun fact about cats.", "What is 100 divided by 4?", "Spell the word 'banana' backwards.",
    "Name a fruit that is yellow.", "What is the boiling point of water in Celsius?", "List the four seasons.",
    "Who wrote Romeo and Juliet?", "What color is the sky on a clear day?", "Give me one tip for better sleep.",
    "What is the plural of mouse?", "Write one sentence about the moon.", "What is 9 plus 10?",
    "Name two animals that live in the ocean.", "What is the largest planet in our solar system?",
    "Suggest a name for a pet goldfish.", "How many minutes are in an hour?", "What is the chemical symbol for water?",
    "Say hello in French.", "What shape has three sides?", "Recommend a book for children.",
]
REQUESTS = [
    "Summarize the passage above in one sentence.", "Who are the people named in the passage above?",
    "What is the main event of the passage above?", "Give the passage above a short title.",
    "What place is mentioned first in the passage above?",
]


def prompts(tokenizer, seed: int = 0, n_long: int = 8) -> list[tuple[str, torch.Tensor]]:
    """``(label, input_ids [1, T])`` of every prompt, short ones first, then the ~800-token ones."""
    from rdkv_hf.text import load_text

    rng = random.Random(seed)
    words = re.sub(r"\s+", " ", load_text("eval")).split(" ")
    def chat(text):  # a base model without a chat template (Gemma-3-270m) reads the text as it is
        if tokenizer.chat_template is None:
            return tokenizer(text + "\n\n", return_tensors="pt")["input_ids"]
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]

    out = [("question", chat(q)) for q in QUESTIONS]
    for i in range(26):  # passages of 15-220 words: 40-300 tokens with the request
        n = 15 + (205 * i) // 25
        start = rng.randrange(len(words) - n)
        out.append(("passage", chat(" ".join(words[start : start + n]) + "\n\n" + REQUESTS[i % len(REQUESTS)])))
    for i in range(n_long):  # ~800 tokens
        start = rng.randrange(len(words) - 700)
        out.append(("long", chat(" ".join(words[start : start + 600]) + "\n\n" + REQUESTS[i % len(REQUESTS)])))
    return out


@torch.no_grad()
def answer(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The full cache's greedy answer ``[n]`` and the log-probs ``[n, vocab]`` it was chosen from."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1] :], torch.cat(out.logits).float().log_softmax(-1)


@torch.no_grad()
def answer_logits(model, ids, ans, cache) -> torch.Tensor:
    """``[len(ans), vocab]`` log-probs of each answer token's position, the answer teacher-forced one
    token a forward (a multi-token forward would be a follow-up: it packs tokens waiting for decoded
    queries after attending to them in full precision, and its own queries would weigh them)."""
    logits = [model(ids, **cache_kwargs(cache)).logits[0, -1:]]
    for tok in ans[:-1]:
        logits.append(model(tok.reshape(1, 1), **cache_kwargs(cache)).logits[0, -1:])
    return torch.cat(logits).float().log_softmax(-1)


def _mean(values) -> float:
    """Mean of the values that are not None (nan if none is)."""
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else float("nan")


def bucket(label: str, T: int) -> str:
    return "~800 tok" if label == "long" else ("20-100 tok" if T <= 100 else "100-300 tok")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--residuals", type=int, nargs="+", default=[0, 32, 64, 128])
    p.add_argument("--min-tokens", type=int, default=None, help="RDKVConfig.min_tokens (default: the library's, 512)")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5])
    p.add_argument("--modes", nargs="+", default=["rdkv"])
    p.add_argument("--observe", type=int, nargs="+", default=[0], help="RDKVConfig.observe values (decoded queries before packing)")
    p.add_argument("--window", type=int, default=None, help="RDKVConfig.window (default: the library's)")
    p.add_argument("--only-long", action="store_true", help="only the ~800-token prompts")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or gemma3-270m")
    p.add_argument("--long-prompts", type=int, default=8, help="how many ~800-token prompts (default 8)")
    p.add_argument("--later-from", type=int, default=None, help="the 'later tokens' KL starts after this many answer tokens "
                   "(default: the largest --observe)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "short-prompts.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rdkv_hf.eval.models import load_model, shipped_profile_name

    model, tok = load_model(args.model)
    cases = [c for c in prompts(tok, n_long=args.long_prompts) if c[0] == "long" or not args.only_long]
    start, load = time.perf_counter(), OtherLoad()
    load.start()
    full = [answer(model, ids) for _, ids in cases]
    rows = []
    skip = max(args.observe) if args.later_from is None else args.later_from  # the same answer tokens in every row
    for mode in args.modes:
        profile = shipped_profile_name(args.model) if mode != "rdkv" else None
        for budget in args.budgets:
            for r, observe in itertools.product(args.residuals, args.observe):
                extra = {} if args.window is None else {"window": args.window}
                rdkv_hf.patch(model, budget=budget, mode=mode, profile=profile, residual=r, min_tokens=args.min_tokens,
                              observe=observe, **extra)
                min_tokens = rdkv_hf.state.patch_state(model).planner.config.min_tokens
                per_bucket: dict[str, list] = {}
                for (label, ids), (ans, ref) in zip(cases, full):
                    got = answer_logits(model, ids, ans, rdkv_hf.RDKVCache(model))
                    # Greedy decoding with RDKV writes the same answer iff it picks each of its tokens
                    # when fed the ones before: the argmax of every teacher-forced position.
                    same = bool((got.argmax(-1) == ans).all())
                    kl = F.kl_div(got, ref, log_target=True, reduction="batchmean").item()
                    # None: the answer ended (EOS) within the first `skip` tokens
                    after = F.kl_div(got[skip:], ref[skip:], log_target=True, reduction="batchmean").item() if len(ans) > skip else None
                    per_bucket.setdefault(bucket(label, ids.shape[1]), []).append((same, kl, after))
                long_ids = torch.randint(100, 40000, (1, 2048), generator=torch.Generator().manual_seed(0))
                cache = rdkv_hf.RDKVCache(model)
                with torch.no_grad():
                    model(long_ids, **cache_kwargs(cache), logits_to_keep=1)
                cache.flush()
                share = cache.nbytes / cache.summary().bf16_bytes
                rdkv_hf.unpatch(model)
                for name, results in per_bucket.items():
                    rows.append((mode, budget, r, min_tokens, observe, name, len(results), 100 * sum(s for s, _, _ in results) / len(results),
                                 statistics.mean(k for _, k, _ in results), _mean(a for _, _, a in results), share))
                    print(f"{mode} {budget:g} bits residual {r} min_tokens {min_tokens} observe {observe}: {name}: "
                          f"{rows[-1][7]:.0f}% identical, KL {rows[-1][8]:.4f} (tokens after the {skip}th {rows[-1][9]:.4f}), "
                          f"2K prompt at {100 * share:.1f}% of bf16", flush=True)
    other = load.stop()
    lines = [
        "# Short chats at low bits: identical answers and KL against the full cache",
        "",
        f"Machine: {machine()}, transformers {__import__('transformers').__version__}; {time.perf_counter() - start:.0f} s, "
        f"other CPU load {other:.2f} cores (quality figures do not depend on it).",
        f"Command: `python benchmarks/bench_short_prompts.py --residuals {' '.join(map(str, args.residuals))} "
        f"--budgets {' '.join(f'{b:g}' for b in args.budgets)} --modes {' '.join(args.modes)}"
        f"{'' if args.min_tokens is None else f' --min-tokens {args.min_tokens}'} --observe {' '.join(map(str, args.observe))}"
        f"{'' if args.window is None else f' --window {args.window}'}{' --only-long' if args.only_long else ''}"
        f"{'' if args.later_from is None else f' --later-from {args.later_from}'}"
        f"{'' if args.long_prompts == 8 else f' --long-prompts {args.long_prompts}'}"
        f"{'' if args.model == 'smollm2-135m' else f' --model {args.model}'}"
        f" --threads {args.threads} --out {args.out.resolve().relative_to(ROOT) if args.out.resolve().is_relative_to(ROOT) else args.out}`.",
        "",
        f"{args.model}, float32, {'chat template' if tok.chat_template else 'raw text'}, greedy, {NEW_TOKENS} new tokens; "
        f"{'' if args.only_long else f'{len(QUESTIONS)} questions and 26 passages with a request (20-300 tokens), '}"
        f"{args.long_prompts} prompts of ~800 tokens. KL: mean over the answer tokens of KL(full || RDKV), the full "
        f"cache's answer teacher-forced one token a forward; \"later tokens\": the same over the answer tokens after the "
        f"first {skip} (with `observe` >= {skip}, those are computed over the prompt in full precision). Cost: a 2,048-token prompt's whole cache "
        "(residual included), packed, as a share of bf16.",
        "",
        "| mode | budget | residual | min_tokens | observe | prompts | n | identical answers | answer-token KL | KL of later tokens | "
        "2K cache, % of bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, budget, r, min_tokens, observe, name, n, same, kl, after, share in rows:
        later = "—" if math.isnan(after) else f"{after:.4f}"
        lines.append(f"| {mode} | {budget:g} | {r} | {min_tokens} | {observe} | {name} | {n} | {same:.0f}% | {kl:.4f} | {later} | "
                     f"{100 * share:.1f}% |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
