"""SmolLM2-135M-Instruct against every peer at matched bytes, and the targets of the evaluation issue.

Runs (or resumes) `rdkv-hf eval` with the given settings, then checks:

1. at 2.5 bits, RDKV + profile perplexity within 3% of the full cache;
2. ... and lower than uniform KIVI-2 and RateQuant-only at the same bytes;
3. at <= 10% of the bf16 cache bytes, RULER-style score >= 97.8% of the full cache's and >= 9 points
   above the best eviction-only baseline (SnapKV, AdaKV, StreamingLLM) at the same bytes (checked for
   RDKV and RDKV + profile at each of their budgets at or below 10%).

"At the same bytes" reads each method's quality off its own measured curve at the other's measured
bits (rdkv_hf.eval.report.interpolate: linear between its two nearest points, no extrapolation).

    python benchmarks/eval_smollm2.py --threads 1                  # the full grid (tens of minutes)
    python benchmarks/eval_smollm2.py --quick --out runs/quick     # a smoke run
    python benchmarks/eval_smollm2.py --no-run --out runs/eval-smollm2   # only re-check a finished run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rdkv_hf.eval.report import curve, format_targets, interpolate

EVICTION = ("snapkv", "adakv", "streamingllm")
REF = "rdkv+profile"


def check_targets(summary: list[dict]) -> list[tuple[str, bool | None, str]]:
    """``(target, met, detail)`` for each target; `met` is None when the run lacks the cells."""
    out = []
    ppl = lambda m: curve(summary, "ppl", m)  # noqa: E731
    full = ppl("full")
    ref = {round(r["budget"], 3): r for r in summary if r["task"] == "ppl" and r["method"] == REF and r["budget"] is not None}
    if not full or 2.5 not in ref:
        out.append(("PPL within 3% of full at 2.5 bits", None, "needs ppl cells of full and rdkv+profile at 2.5"))
    else:
        r, f = ref[2.5], full[0][1]
        rel = r["value"] / f - 1
        out.append(("PPL within 3% of full at 2.5 bits", rel <= 0.03,
                    f"RDKV+profile {r['value']:.3f} at {r['bits_per_element']:.2f} bits vs full {f:.3f}: {100 * rel:+.2f}%"))
        for other, name in (("uniform-2", "uniform KIVI-2"), ("ratequant", "RateQuant")):
            pts = ppl(other)
            if not pts:
                out.append((f"PPL below {name} at matched bytes", None, f"no {other} cells"))
                continue
            # Both directions: the peer at RDKV's bytes, and RDKV at the peer's bytes nearest 2.5 bits.
            bits = r["bits_per_element"]
            peer_here = interpolate(pts, bits, log=True)
            x, y = min(pts, key=lambda p: abs(p[0] - 2.5))
            ours_there = interpolate(ppl(REF), x, log=True)
            checks = []
            if peer_here is not None:
                checks.append(r["value"] < peer_here)
            if ours_there is not None:
                checks.append(ours_there < y)
            detail = (f"at {bits:.2f} bits: RDKV+profile {r['value']:.3f} vs {name} "
                      f"{'n/a' if peer_here is None else f'{peer_here:.3f}'}; at {x:.2f} bits ({name}'s point): "
                      f"{name} {y:.3f} vs RDKV+profile {'n/a' if ours_there is None else f'{ours_there:.3f}'}")
            out.append((f"PPL below {name} at matched bytes", all(checks) if checks else None, detail))
    ruler = lambda m: curve(summary, "ruler", m)  # noqa: E731
    full_r = ruler("full")
    ours = {m: [(x, y) for x, y in ruler(m) if 100 * x / 16 <= 10.0] for m in ("rdkv", REF)}
    if not full_r or not any(ours.values()):
        out.append(("RULER at <=10% bytes: >=97.8% of full, >=9 points over eviction", None, "needs ruler cells at <=10%"))
        return out
    for method, low in ours.items():
        for x, y in low:
            evict = {m: interpolate(ruler(m), x) for m in EVICTION}
            known = {m: v for m, v in evict.items() if v is not None}
            best = max(known.values()) if known else None
            rel = y / full_r[0][1] if full_r[0][1] else float("nan")
            met = rel >= 0.978 and best is not None and y - best >= 9
            detail = (f"{method} {y:.1f} at {x:.2f} bits ({100 * x / 16:.1f}%) = {100 * rel:.1f}% of full "
                      f"({full_r[0][1]:.1f}); eviction at these bytes: "
                      + ", ".join(f"{m} {'n/a' if v is None else f'{v:.1f}'}" for m, v in evict.items()))
            out.append((f"RULER at {100 * x / 16:.1f}% of bf16 bytes ({method})", met, detail))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/eval-smollm2")
    p.add_argument("--no-run", action="store_true", help="only check the targets on an existing run")
    args, rest = p.parse_known_args(argv)
    if not args.no_run:
        from rdkv_hf.cli import main as cli

        code = cli(["eval", "--model", "smollm2-135m", "--out", args.out, *rest])
        if code:
            return code
    data = json.loads((Path(args.out) / "results.json").read_text())
    print(format_targets("Targets of the evaluation issue", check_targets(data["summary"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
