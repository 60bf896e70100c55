"""Full-cache baseline of the RULER-style tasks in `rdkv_hf.eval.tasks`: which tasks a model can do at all.

A task whose full-cache score is ~0 at some length cannot show what compression loses there, so this
table says which (task, length) pairs are worth measuring. Greedy decoding, default DynamicCache.

    python benchmarks/task_baseline.py                                   # SmolLM2, 1K and 2K, noise
    python benchmarks/task_baseline.py --haystack noise text --n 5 --json out.json
    python benchmarks/task_baseline.py --model gemma3-270m --lengths 4096 --raw

Prints one row per (task, length, haystack): mean score, samples, mean prompt tokens, seconds per
sample (prefill + decode) and `other_load`, the CPU cores other processes used meanwhile (timings
are only trustworthy near 0); with --verbose also every answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rdkv_hf.eval import tasks
from rdkv_hf.eval.models import load_model

DEFAULT_TEXT = Path(tasks.__file__).parent / "data" / "kjv_eval.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a name known to rdkv_hf.eval.models")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--n", type=int, default=5, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", nargs="+", default=["noise"], choices=tasks.HAYSTACKS)
    p.add_argument("--text-file", type=Path, default=DEFAULT_TEXT, help="natural text for 'text'")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=list(tasks.TASKS))
    p.add_argument("--raw", action="store_true", help="raw prompt instead of the chat template")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every sample's result here")
    p.add_argument("--verbose", action="store_true", help="print every answer")
    return p.parse_args(argv)


def busy_cpu_seconds() -> float | None:
    """CPU time all processes on the machine have spent busy so far (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


@torch.no_grad()
def run_sample(model, tokenizer, sample: tasks.Sample, chat: bool) -> dict:
    """Generate greedily with the full cache; return the answer, its score and the time taken."""
    input_ids = tasks.render(sample, tokenizer, chat)
    busy, cpu, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=sample.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    seconds = time.perf_counter() - start
    # Cores other processes kept busy meanwhile: the machine is shared, so timings need this.
    other_load = None
    if busy is not None:
        other_load = max(0.0, (busy_cpu_seconds() - busy - (time.process_time() - cpu)) / seconds)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return {
        "task": sample.task,
        "length": sample.context_len,
        "haystack": sample.haystack,
        "seed": sample.seed,
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": output.shape[1] - input_ids.shape[1],
        "seconds": seconds,
        "other_load": other_load,
        "score": tasks.score(sample, answer),
        "answers": sample.answers,
        "output": answer,
    }


def summarize(results: list[dict]) -> list[dict]:
    """One row per (task, length, haystack), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["length"], r["haystack"]), []).append(r)
    return [
        {
            "task": task,
            "length": length,
            "haystack": haystack,
            "n": len(rs),
            "score": statistics.mean(r["score"] for r in rs),
            "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rs),
            "s_per_sample": statistics.mean(r["seconds"] for r in rs),
            "other_load": statistics.mean(r["other_load"] or 0.0 for r in rs),
        }
        for (task, length, haystack), rs in groups.items()
    ]


def print_table(rows: list[dict]) -> None:
    print(
        f"{'task':<16} {'length':>6} {'haystack':<8} {'n':>3} {'score':>6} {'tokens':>7} "
        f"{'s/sample':>9} {'other_load':>10}"
    )
    for r in rows:
        print(
            f"{r['task']:<16} {r['length']:>6} {r['haystack']:<8} {r['n']:>3} {r['score']:>6.2f} "
            f"{r['prompt_tokens']:>7.0f} {r['s_per_sample']:>9.2f} {r['other_load']:>10.2f}"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    chat = not args.raw
    text = args.text_file.read_text() if "text" in args.haystack else None
    results = []
    for haystack in args.haystack:
        # cwe and fwe carry no haystack: their word lists are the context, so run them once.
        names = [t for t in args.tasks if haystack == "noise" or t not in ("cwe", "fwe")]
        suite = tasks.make_suite(
            tokenizer, args.lengths, args.n, args.seed, haystack, text, tasks=names, chat=chat
        )
        for sample in suite:
            result = run_sample(model, tokenizer, sample, chat)
            results.append(result)
            if args.verbose:
                print(
                    f"{result['task']} {result['length']} {haystack} seed={result['seed']} "
                    f"score={result['score']:.2f} {result['answers']} -> {result['output']!r}"
                )
    rows = summarize(results)
    print(
        f"model={args.model} chat={chat} threads={args.threads} machine={platform.machine()} "
        f"cpus={os.cpu_count()} torch={torch.__version__}"
    )
    print_table(rows)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"args": settings, "rows": rows, "samples": results}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
