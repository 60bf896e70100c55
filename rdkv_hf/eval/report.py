"""Reports of an evaluation run (see :mod:`rdkv_hf.evaluate`): summary rows, a markdown table, the
JSON of every cell and a rate-distortion plot.

Every number is aggregated over the cells of one ``(task, method, budget, length)``:

* ``ppl``: ``exp(sum NLL / sum targets)`` over the windows;
* ``distortion``: the mean over windows of the mean over layers of the relative error;
* ``ruler``: the mean RULER score in percent over tasks and samples.

Bytes are the mean measured bytes after the prompt, as a share of a bf16 cache of the same tokens.
On a model with sliding-window layers (Gemma 3) the methods compress only the full-attention
("global") layers: the share they are compared at is that of the global layers
(``pct_global_bf16``, ``bits_per_element``), and the tables also give the sliding layers' bytes and
the total over all layers.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)

_METRIC_NAMES = {"ppl": "perplexity", "distortion": "attention-output relative error", "ruler": "RULER score (%)"}


def _kind(task: str) -> str:
    return task.partition("/")[0]


def summarize(records: list[dict]) -> list[dict]:
    """One row per ``(task kind, method, budget, length)``, RULER tasks pooled; sorted."""
    groups = defaultdict(list)
    for r in records:
        groups[(_kind(r["task"]), r["method"], r["budget"], r["length"])].append(r)
    rows = []
    for (kind, method, budget, length), rs in groups.items():
        if kind == "ppl":
            value = math.exp(sum(r["nll_sum"] for r in rs) / sum(r["n_targets"] for r in rs))
        elif kind == "ruler":
            value = 100.0 * sum(r["value"] for r in rs) / len(rs)
        else:
            value = sum(r["value"] for r in rs) / len(rs)
        bits = sum(r["bits_per_element"] for r in rs) / len(rs)
        rows.append({
            "task": kind, "method": method, "label": rs[0]["label"], "budget": budget, "length": length,
            "cells": len(rs), "value": value,
            "pct_bf16": sum(r["pct_bf16"] for r in rs) / len(rs),
            "bits_per_element": bits, "pct_global_bf16": 100.0 * bits / 16,
            "nbytes": sum(r["nbytes"] for r in rs) / len(rs),
            # Cells written before the global/sliding split came from models without sliding layers.
            "sliding_nbytes": sum(r.get("sliding_nbytes", 0) for r in rs) / len(rs),
            "global_nbytes": sum(r.get("global_nbytes", r["nbytes"]) for r in rs) / len(rs),
        })
        if kind == "ruler" and all("chat" in r for r in rs):
            rows[-1]["chat"] = rs[0]["chat"]
        if kind == "ruler":  # answers that ended before the prompt was packed (`observe`)
            rows[-1]["unpacked"] = sum(bool(r.get("prompt_unpacked")) for r in rs)
    return sorted(rows, key=lambda r: (r["task"], r["length"], r["method"], -1 if r["budget"] is None else r["budget"]))


def curve(rows: list[dict], task: str, method: str, length=None) -> list[tuple[float, float]]:
    """``(bits per element, value)`` points of one method, sorted by bits (lengths pooled if None)."""
    pts = defaultdict(list)
    for r in rows:
        if r["task"] == task and r["method"] == method and (length is None or r["length"] == length):
            pts[r["budget"]].append((r["bits_per_element"], r["value"]))
    out = [(sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v)) for v in pts.values()]
    return sorted(out)


def interpolate(points: list[tuple[float, float]], bits: float, log: bool = False, rel_tol: float = 0.03):
    """The value of a curve at `bits`: linear between the two nearest points (in log value if `log`),
    the point itself within `rel_tol`, None outside the curve (no extrapolation)."""
    for x, y in points:
        if abs(x - bits) <= rel_tol * bits:
            return y
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= bits <= x1:
            t = (bits - x0) / (x1 - x0)
            if log:
                return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
            return y0 + t * (y1 - y0)
    return None


def _fmt_budget(b) -> str:
    return "—" if b is None else f"{b:g}"


def _order(rows, methods) -> list[tuple[str, object]]:
    seen = []
    for m in methods:
        for r in sorted((r for r in rows if r["method"] == m), key=lambda r: -1 if r["budget"] is None else r["budget"]):
            if (m, r["budget"]) not in seen:
                seen.append((m, r["budget"]))
    return seen


def _has_sliding(rows) -> bool:
    return any(r.get("sliding_nbytes", 0) > 0 for r in rows)


def _layers_note(layers: dict | None) -> list[str]:
    """What the byte shares cover on a model with sliding-window layers."""
    if not layers:
        return []
    glob, n = layers["global_layers"], layers["n_layers"]
    return ["", f"Layers: {len(glob)} of the {n} layers are full-attention (\"global\": layers {', '.join(map(str, glob))}); "
            f"the other {n - len(glob)} are sliding-window layers, which keep Transformers' bounded cache (the last "
            "window - 1 tokens, in the model's float32) in **every** method, the full cache included. Only the global "
            "layers are compressed, so `% of global bf16` = bytes of the global layers / a bf16 cache of the same tokens "
            "in those layers, and `bits` = 16 x that share; `sliding` = bytes of the sliding layers; `total` = bytes of "
            "all layers and their share of a bf16 cache of all layers (sliding layers at their bounded size)."]


def markdown(rows: list[dict], settings, skipped=(), records_by_task=None, layers=None, samples=None) -> str:
    """The report as markdown: one table per task kind, then quality at matched bytes.

    `records_by_task`: rows of :func:`summarize_ruler_tasks` for the per-task RULER table.
    `layers`: ``{"global_layers": [...], "n_layers": n}`` of a model with sliding-window layers
    (the tables then give global-layer shares, sliding and total bytes). `samples`: of
    :func:`ruler_samples`, for the RULER section's text."""
    methods = list(settings.methods)
    labels = {r["method"]: r["label"] for r in rows}
    sliding = _has_sliding(rows)
    pct_name = "% of global bf16" if sliding else "% of bf16"
    out = [f"# KV-cache evaluation: {settings.model_name}", ""]
    out.append(
        "Bytes are measured after the prompt (codes, scales, indices, full-precision parts) and given as a "
        "share of a bf16 cache of the same tokens; `bits` = 16 x that share (the model runs in float32, so "
        "the full cache holds 200%). Budget = the nominal setting in bits per element; fixed methods have none. "
        "RDKV's methods pack the prompt at its forward (`observe=0`) unless they say `[observe=k]`."
    )
    out += _layers_note(layers if sliding else None)
    if skipped:
        out += ["", "Skipped: " + "; ".join(skipped) + "."]
    tf = [r for r in rows if r["task"] in ("ppl", "distortion")]
    if tf:
        out += ["", "## Perplexity and attention distortion", "",
                f"Prompt {settings.ppl_length} tokens (compressed), {settings.continuation} teacher-forced continuation "
                f"tokens scored through the cache (not compressed), {settings.windows} window(s) of held-out text. "
                "Distortion: ||o - o_full|| / ||o_full|| of each attention module's output on the continuation, "
                "mean over layers (max layer in brackets).", ""]
        full_ppl = next((r["value"] for r in tf if r["task"] == "ppl" and r["method"] == "full"), None)
        if sliding:
            out += ["| method | budget | global KV bytes | % of global bf16 | bits | sliding | total (% of bf16) | PPL | vs full | attn. error |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
        else:
            out += ["| method | budget | KV bytes | % of bf16 | bits | PPL | vs full | attn. error |", "|---|---|---|---|---|---|---|---|"]
        for m, b in _order(tf, methods):
            ppl = next((r for r in tf if r["task"] == "ppl" and r["method"] == m and r["budget"] == b), None)
            dis = next((r for r in tf if r["task"] == "distortion" and r["method"] == m and r["budget"] == b), None)
            base = ppl or dis
            value = f"{ppl['value']:.3f}" if ppl else ""
            rel = f"{100 * (ppl['value'] / full_ppl - 1):+.1f}%" if ppl and full_ppl else ""
            err = f"{dis['value']:.3f} ({dis.get('max_layer', dis['value']):.3f})" if dis else ""
            if sliding:
                out.append(f"| {labels[m]} | {_fmt_budget(b)} | {base['global_nbytes'] / 2**20:.2f} MiB | {base['pct_global_bf16']:.1f}% | "
                           f"{base['bits_per_element']:.2f} | {base['sliding_nbytes'] / 2**20:.2f} MiB | "
                           f"{base['nbytes'] / 2**20:.2f} MiB ({base['pct_bf16']:.1f}%) | {value} | {rel} | {err} |")
            else:
                out.append(f"| {labels[m]} | {_fmt_budget(b)} | {base['nbytes'] / 2**20:.2f} MiB | {base['pct_bf16']:.1f}% | "
                           f"{base['bits_per_element']:.2f} | {value} | {rel} | {err} |")
    ru = [r for r in rows if r["task"] == "ruler"]
    if ru:
        lengths = sorted({r["length"] for r in ru})
        out += ["", "## RULER-style tasks", "",
                f"Tasks {', '.join(settings.ruler_tasks)}; {_samples_text(samples, settings)}, "
                f"{settings.haystack} haystack, greedy decoding, RULER string match (score in %)."
                + (f" Prompts: {prompt_style(rows)}." if prompt_style(rows) else "")
                + (" Byte shares are means over the lengths; `total` is all layers' share of an all-layer bf16 cache "
                   "(the sliding layers' share shrinks as the prompt grows)." if sliding else ""), ""]
        head = f"| method | budget | {pct_name} | " + ("total % of bf16 | " if sliding else "") + " | ".join(f"{n}" for n in lengths) + " | mean | vs full |"
        out += [head, "|" + "---|" * (5 + len(lengths) + sliding)]
        full = [r["value"] for r in ru if r["method"] == "full"]
        full_mean = sum(full) / len(full) if full else None
        for m, b in _order(ru, methods):
            cells = {r["length"]: r for r in ru if r["method"] == m and r["budget"] == b}
            mean = sum(c["value"] for c in cells.values()) / len(cells)
            pct = sum(c["pct_global_bf16"] for c in cells.values()) / len(cells)
            total = f"{sum(c['pct_bf16'] for c in cells.values()) / len(cells):.1f}% | " if sliding else ""
            vs = f"{100 * mean / full_mean:.1f}%" if full_mean else ""
            vals = " | ".join(f"{cells[n]['value']:.1f}" if n in cells else "" for n in lengths)
            out.append(f"| {labels[m]} | {_fmt_budget(b)} | {pct:.1f}% | {total}{vals} | {mean:.1f} | {vs} |")
        out += _unpacked_note(ru, methods, labels)
        out += _ruler_by_task(records_by_task, methods, labels)
    out += _matched_section(rows, methods, labels, pct_name)
    return "\n".join(out) + "\n"


def _unpacked_note(ru: list[dict], methods, labels) -> list[str]:
    """A warning under the RULER table for methods whose answers ended before their prompt was packed
    (``observe``): those scores measure the full-precision prompt, not the compression."""
    notes = []
    for m, b in _order(ru, methods):
        cells = [r for r in ru if r["method"] == m and r["budget"] == b]
        n = sum(r.get("unpacked", 0) for r in cells)
        if n:
            notes.append(f"{labels[m]} at {_fmt_budget(b)}: {n} of {sum(r['cells'] for r in cells)} answers")
    if not notes:
        return []
    return ["", "**Not all measured packed:** " + "; ".join(notes) + " ended before the prompt was packed "
            "(`observe`), so they read it in full precision: those scores do not measure the compression."]


def ruler_samples(records: list[dict]) -> dict:
    """``{(task, length): number of samples}`` of the RULER cells (distinct seeds)."""
    seeds = defaultdict(set)
    for r in records:
        if _kind(r["task"]) == "ruler":
            seeds[(r["task"].partition("/")[2], r["length"])].add(r["seed"])
    return {k: len(v) for k, v in sorted(seeds.items())}


def _samples_text(samples, settings) -> str:
    """"2 sample(s) per task and length", or each task's count at each length when they differ
    (the mean of a row then weighs each task by its samples)."""
    if not samples or set(samples.values()) == {settings.samples}:
        return f"{settings.samples} sample(s) per task and length"
    by_task = defaultdict(list)
    for (task, n), c in samples.items():
        by_task[task].append(f"{c} at {n}")
    return ("samples: " + "; ".join(f"{t} {', '.join(v)}" for t, v in by_task.items())
            + " (a row's score pools the samples, so tasks with more samples weigh more; see the per-task table)")


def prompt_style(rows) -> str:
    """How the RULER prompts were rendered ("chat template" / "raw text"), from the rows' cells."""
    styles = {r["chat"] for r in rows if "chat" in r}
    return ", ".join("chat template" if c else "raw text (no chat template)" for c in sorted(styles))


def format_targets(title: str, checks) -> str:
    """A benchmark's target checks, one line each: ``checks`` holds ``(target, met, detail)`` with
    `met` True, False or None (the run lacks the cells)."""
    marks = {True: "MET   ", False: "MISSED", None: "n/a   "}
    return "\n".join([f"\n{title}:"] + [f"  {marks[met]} {name}: {detail}" for name, met, detail in checks])


def summarize_ruler_tasks(records: list[dict]) -> list[dict]:
    """Mean RULER score (%) per ``(task, method, budget)``, lengths and samples pooled."""
    groups = defaultdict(list)
    for r in records:
        if _kind(r["task"]) == "ruler":
            groups[(r["task"].partition("/")[2], r["method"], r["budget"])].append(r["value"])
    return [{"task": t, "method": m, "budget": b, "cells": len(v), "value": 100.0 * sum(v) / len(v)}
            for (t, m, b), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or -1))]


def _ruler_by_task(rows, methods, labels) -> list[str]:
    if not rows:
        return []
    names = list(dict.fromkeys(r["task"] for r in rows))
    out = ["", "By task (mean over lengths and samples):", "",
           "| method | budget | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for m, b in _order(rows, methods):
        vals = {r["task"]: r["value"] for r in rows if r["method"] == m and r["budget"] == b}
        out.append(f"| {labels[m]} | {_fmt_budget(b)} | " + " | ".join(f"{vals[t]:.1f}" if t in vals else "" for t in names) + " |")
    return out


def _matched_section(rows, methods, labels, pct_name="% of bf16") -> list[str]:
    """Quality of every method interpolated at the measured bytes of the reference method's points."""
    ref = next((m for m in ("rdkv+profile", "rdkv") if m in methods and any(r["method"] == m for r in rows)), None)
    if ref is None:
        return []
    out = ["", "## At matched bytes", "",
           f"Each method's quality at the measured bits of {labels[ref]}'s points, read off its own measured "
           "curve (linear between its two nearest points, in log PPL; a single-point method only where it "
           "lies within 3%; blank: outside its measured range)."]
    for task, log in (("ppl", True), ("ruler", False)):
        ref_pts = curve(rows, task, ref)
        if not ref_pts:
            continue
        others = [m for m in methods if m != "full" and any(r["method"] == m and r["task"] == task for r in rows)]
        out += ["", f"{_METRIC_NAMES[task]}:", "",
                f"| bits ({pct_name}) | " + " | ".join(labels[m] for m in others) + " |", "|---|" + "---|" * len(others)]
        for bits, _ in ref_pts:
            vals = []
            for m in others:
                v = interpolate(curve(rows, task, m), bits, log=log)
                vals.append("" if v is None else (f"{v:.3f}" if task == "ppl" else f"{v:.1f}"))
            out.append(f"| {bits:.2f} ({100 * bits / 16:.1f}%) | " + " | ".join(vals) + " |")
    return out


def plot(rows: list[dict], path: Path, settings) -> Path | None:
    """Quality against measured bytes, one panel per task kind, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    kinds = [k for k in ("ppl", "ruler", "distortion") if any(r["task"] == k for r in rows)]
    if not kinds:
        return None
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        full = curve(rows, kind, "full")
        # Perplexity: keep the axis on the useful range; worse points sit on the top edge as triangles.
        top = 1.5 * full[0][1] if kind == "ppl" and full else math.inf
        for m in settings.methods:
            pts = curve(rows, kind, m)
            if not pts:
                continue
            label = next(r["label"] for r in rows if r["method"] == m)
            if m == "full":
                ax.axhline(pts[0][1], color="black", linestyle="--", linewidth=1, label=f"{label} ({100 * pts[0][0] / 16:.0f}% of bf16)")
                continue
            xs = [100 * x / 16 for x, _ in pts]
            line, = ax.plot(xs, [min(y, top) for _, y in pts], marker="o", label=label)
            off = [(x, top) for x, (_, y) in zip(xs, pts) if y > top]
            if off:
                ax.plot(*zip(*off), linestyle="none", marker="^", markersize=9, color=line.get_color())
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 2.5, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 100)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("KV cache bytes of the global layers, % of bf16 (log)" if _has_sliding(rows) else "KV cache bytes, % of a bf16 cache (log)")
        ax.set_ylabel(_METRIC_NAMES[kind])
        if kind == "distortion":
            ax.set_yscale("log")
        title = {"ppl": f"perplexity, {settings.ppl_length}-token prompt", "distortion": "attention distortion",
                 "ruler": f"RULER-style, lengths {', '.join(map(str, settings.lengths))}"}[kind]
        if top < math.inf:
            title += " (▲: off scale)"
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    # One legend for all panels (same methods, same colours), below them.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(settings.model_name)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(records: list[dict], out_dir, settings, skipped=()) -> dict:
    """Write ``results.json`` (settings, every cell, the summary), ``table.md`` and
    ``rate_distortion.png`` to `out_dir`; returns the paths written."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    for r in rows:  # the worst layer, for the table
        if r["task"] == "distortion":
            cells = [c for c in records if c["task"] == "distortion" and c["method"] == r["method"] and c["budget"] == r["budget"]]
            r["max_layer"] = max(max(c["per_layer"]) for c in cells)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
               "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads()}
    data = {"settings": settings.to_dict(), "skipped": list(skipped), "machine": machine, "summary": rows,
            "cells": sorted(records, key=lambda r: r["key"])}
    paths = {"json": out_dir / "results.json", "table": out_dir / "table.md"}
    by_task = summarize_ruler_tasks(records)
    data["ruler_by_task"] = by_task
    paths["json"].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    split = next((r for r in records if r.get("sliding_nbytes", 0) > 0), None)
    layers = {"global_layers": split["global_layers"], "n_layers": split["n_layers"]} if split else None
    paths["table"].write_text(markdown(rows, settings, skipped, by_task, layers, ruler_samples(records)), encoding="utf-8")
    png = plot(rows, out_dir / "rate_distortion.png", settings)
    if png is not None:
        paths["png"] = png
    return paths
