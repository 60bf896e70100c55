"""Gemma-3-270m (base) at long contexts against every peer, and the targets of its evaluation issue.

Runs (or resumes) `rdkv-hf eval --model gemma3-270m` (defaults: RULER-style tasks at 4K, 8K and 16K,
perplexity after an 8K prompt, budgets 0.4 / 1.6 / 2.5 bits), then checks, on the RULER-style score
at 8K (mean over tasks and samples):

1. RDKV at 2.5% of the global layers' bf16 bytes (budget 0.4) keeps >= 97.8% of the full cache's score;
2. RDKV at 10% (budget 1.6) keeps >= 99%;
3. at both, RDKV scores >= 9 points above the best eviction-only baseline (SnapKV, AdaKV,
   StreamingLLM) at the same bytes.

Only Gemma's 3 full-attention layers are compressed (its 15 sliding-window layers keep Transformers'
bounded cache in every method), so shares are of the global layers' bf16 bytes. "The same bytes":
each eviction baseline at the same budget, where it holds exactly budget/16 of those bytes, never
fewer than RDKV's measured bytes (RDKV spends at most its budget, scales and indices included).

The RULER lengths run one after another (8K first: the targets are there), each with its own
number of samples, then perplexity; every phase appends to the same resumable ``results.jsonl``
and the combined report (``table.md``, ``results.json``, ``rate_distortion.png``) covers them all.

    python benchmarks/eval_gemma3.py --threads 1 --samples 2,4,1   # samples at 4K, 8K, 16K
    python benchmarks/eval_gemma3.py --no-run --out runs/eval-gemma3  # only re-check a finished run
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from rdkv_hf.eval.report import format_targets

EVICTION = ("snapkv", "adakv", "streamingllm")
LENGTH = 8192
TARGETS = ((0.4, 2.5, 0.978), (1.6, 10.0, 0.99))  # (budget, % of global bf16, share of full's score)


def task_means(cells: list[dict], length: int = LENGTH) -> dict:
    """``{(method, budget): (mean over tasks of each task's mean score in %, {task: (score, samples)},
    mean % of global bf16)}`` of the RULER cells at `length`."""
    groups = defaultdict(lambda: defaultdict(list))
    pct = defaultdict(list)
    for c in cells:
        if c["task"].startswith("ruler/") and c["length"] == length:
            groups[(c["method"], c["budget"])][c["task"][6:]].append(100.0 * c["value"])
            pct[(c["method"], c["budget"])].append(c["pct_global_bf16"])
    out = {}
    for key, by_task in groups.items():
        per = {t: (sum(v) / len(v), len(v)) for t, v in sorted(by_task.items())}
        out[key] = (sum(m for m, _ in per.values()) / len(per), per, sum(pct[key]) / len(pct[key]))
    return out


def check_targets(cells: list[dict], length: int = LENGTH) -> list[tuple[str, bool | None, str]]:
    """``(target, met, detail)`` for each target; `met` is None when the run lacks the cells.
    Scores are averaged over tasks (each task's mean over its samples)."""
    means = task_means(cells, length)
    full = means.get(("full", None))
    out = []

    def show(m):
        return f"{m[0]:.1f} (" + ", ".join(f"{t} {v:.1f}/{n}" for t, (v, n) in m[1].items()) + ")"

    for budget, pct, keep in TARGETS:
        name = f"RULER at {length}: RDKV at {pct:g}% of global bf16 bytes"
        ours = means.get(("rdkv", budget))
        if full is None or ours is None:
            out.append((name, None, f"needs ruler cells of full and rdkv at budget {budget:g}, length {length}"))
            continue
        rel = ours[0] / full[0] if full[0] else float("nan")
        out.append((f"{name} >= {100 * keep:g}% of full", rel >= keep,
                    f"RDKV {show(ours)} at {ours[2]:.2f}% = {100 * rel:.1f}% of full {show(full)} "
                    "[task: score/samples]"))
        evict = {m: means[(m, budget)] for m in EVICTION if (m, budget) in means}
        if not evict:
            out.append((f"{name} >= 9 points over eviction", None, f"no eviction cells at budget {budget:g}"))
            continue
        best = max(evict, key=lambda m: evict[m][0])
        each = ", ".join(f"{m} {v[0]:.1f} at {v[2]:.2f}%" for m, v in evict.items())
        out.append((f"{name} >= 9 points over eviction", ours[0] - evict[best][0] >= 9,
                    f"RDKV {ours[0]:.1f} vs best eviction {best} {evict[best][0]:.1f} ({each})"))
    return out


def _csv(cast):
    return lambda text: tuple(cast(x) for x in text.split(",") if x.strip())


def run(args) -> list[dict]:
    """Every phase of the grid, then the combined report; returns all records of the grid."""
    import torch

    from rdkv_hf.eval import runner as ev
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.eval.report import write_reports

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = ev.MODEL_DEFAULTS["gemma3-270m"]
    common = dict(methods=args.methods, budgets=args.budgets or preset["budgets"], haystack=args.haystack or preset["haystack"],
                  ruler_tasks=args.ruler_tasks or preset["ruler_tasks"], ppl_length=preset["ppl_length"])
    lengths = args.lengths or preset["lengths"]
    if len(args.samples) != len(lengths):
        raise SystemExit(f"--samples needs one count per length {lengths}, got {args.samples}")
    model, tokenizer = load_model("gemma3-270m")
    phases = sorted(zip(lengths, args.samples), key=lambda ls: ls[0] != LENGTH)  # 8K first
    for n, samples in phases:
        ev.evaluate(model, tokenizer, ev.EvalSettings("gemma3-270m", tasks=("ruler",), lengths=(n,), samples=samples, **common),
                    args.out, progress=True)
    if args.windows:
        ev.evaluate(model, tokenizer, ev.EvalSettings("gemma3-270m", tasks=("ppl",), windows=args.windows, **common),
                    args.out, progress=True)
    for extra in args.extra:  # more samples of one task at one length
        task, n, samples = extra.split(":")
        ev.evaluate(model, tokenizer, ev.EvalSettings("gemma3-270m", tasks=("ruler",), lengths=(int(n),), samples=int(samples),
                                                      **{**common, "ruler_tasks": (task,)}), args.out, progress=True)
    # One report over all phases: the union of their cells.
    everything = ev.EvalSettings("gemma3-270m", tasks=("ruler", "ppl") if args.windows else ("ruler",), lengths=lengths,
                                 samples=max([*args.samples, *(int(x.split(":")[2]) for x in args.extra)]),
                                 windows=max(args.windows, 1), **common)
    store = ev.ResultStore(Path(args.out) / ev.RESULTS_FILE)
    records = [r for r in store.records.values() if r["model"] == "gemma3-270m" and r["method"] in everything.methods
               and (r["budget"] is None or r["budget"] in everything.budgets)
               and (r["task"] == "ppl" or r["task"].partition("/")[2] in everything.ruler_tasks)]
    skipped = []  # as evaluate() words them
    for spec in everything.methods:
        m = ev.parse_method(spec)
        if m.needs_profile:
            skipped.append(f"{spec} (no profile)")
            continue
        for b in (everything.budgets if m.budgeted else [None]):
            why = ev.check_cell(m, b, None, model)
            if why is not None:
                skipped.append(f"{spec}{'' if b is None else f' at {b:g} bits'} ({why})")
    write_reports(records, args.out, everything, skipped=skipped)
    return records


def main(argv=None) -> int:
    from rdkv_hf.eval.methods import methods

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/eval-gemma3")
    p.add_argument("--no-run", action="store_true", help="only check the targets on an existing run")
    p.add_argument("--methods", type=_csv(str), default=tuple(m for m in methods() if m not in ("rdkv+profile", "ratequant")),
                   help="comma list (default: all but the profile methods; quanto is skipped on Gemma)")
    p.add_argument("--budgets", type=_csv(float), default=None, help="default 0.4,1.6,2.5")
    p.add_argument("--lengths", type=_csv(int), default=None, help="default 4096,8192,16384")
    p.add_argument("--samples", type=_csv(int), default=(2, 4, 1), help="samples per task at each length (default 2,4,1)")
    p.add_argument("--windows", type=int, default=2, help="ppl windows after an 8K prompt (0: no ppl)")
    p.add_argument("--ruler-tasks", type=_csv(str), default=None)
    p.add_argument("--haystack", default=None, choices=("noise", "text"), help="default text (KJV)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--extra", action="append", default=[], metavar="TASK:LENGTH:SAMPLES",
                   help="after the grid, raise one task's samples at one length (repeatable), e.g. niah_single:8192:12")
    args = p.parse_args(argv)
    if not args.no_run:
        run(args)
    data = json.loads((Path(args.out) / "results.json").read_text())
    print((Path(args.out) / "table.md").read_text())
    print(format_targets(f"Targets of the Gemma 3 evaluation issue (RULER-style score at {LENGTH} tokens)",
                         check_targets(data["cells"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
