"""Quality per byte of every KV-cache method: perplexity, RULER-style tasks, attention distortion.

``rdkv-hf eval`` (and :func:`evaluate`) runs a grid of *cells*, one per
``(model, task, method, budget, length, seed)``, and appends each finished cell to
``<out>/results.jsonl``; a cell already there is never recomputed, so an interrupted run resumes.

Tasks:

* ``ppl``: a window of held-out text (``text.load_text("eval")``); its first ``ppl_length`` tokens
  are the prompt (compressed), the next ``continuation`` tokens are fed in one teacher-forced
  forward through the compressed cache (and not compressed themselves) and scored.
* ``distortion``: in that same forward, the relative error ``||o - o_full|| / ||o_full||`` of every
  attention module's output against the full-cache forward, per layer.
* ``ruler``: RULER-style samples from :mod:`rdkv_hf.tasks`, greedy decoding, RULER string match.

Every method is compared at its *measured* bytes: the bytes its cache holds right after the prompt,
also given as a share of a bf16 cache of the same tokens. On a model with sliding-window layers
(Gemma 3) only the full-attention ("global") layers are compressed; every method keeps the same
bounded cache in the sliding layers. Each cell then records the bytes of the global layers and their
share of those layers' bf16 bytes (``pct_global_bf16``, the share the methods are matched at), the
sliding layers' bytes, and the total over all layers (``nbytes``, ``pct_bf16``).

The prompt's forward is the same for every method: RDKV and the eviction baselines compress each
layer right after that layer's (full-precision) prompt attention, and ``QuantizedCache`` attends the
prompt unquantized. So each window or sample runs its prompt once, keeps every layer's post-RoPE K/V
and last queries, and fills each method's cache from them exactly as the attention would have
(``tests/test_evaluate.py`` checks this against the patched model's own prefill, bit for bit).
The methods and that shared prefill live in :mod:`rdkv_hf.eval.methods`, the reports in
:mod:`rdkv_hf.eval.report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import observe
from ..cache import RDKVCache
from ..compat import cache_kwargs
from . import tasks as ruler
from .methods import (
    Method,
    Prefill,
    _full_cache,
    build_cache,
    cache_nbytes,
    check_cell,
    compressed_layers,
    layer_nbytes,
    method_planner,
    parse_method,
    prefill,
    uniform_budget,
)
from .methods import (
    methods as all_methods,
)
from .models import shipped_profile

logger = logging.getLogger(__name__)

__all__ = [
    "Method", "Prefill", "EvalSettings", "ResultStore", "build_cache", "cache_nbytes", "cell_key", "compressed_layers",
    "MODEL_DEFAULTS", "check_cell", "evaluate", "greedy_decode", "layer_nbytes", "method_planner", "all_methods",
    "parse_method", "prefill", "relative_errors", "shipped_profile", "teacher_forced", "uniform_budget",
]

TASK_KINDS = ("ppl", "ruler", "distortion")
DEFAULT_BUDGETS = (1.0, 1.5, 2.5, 4.0)
DEFAULT_LENGTHS = (1024, 2048, 3072)
# The RULER tasks SmolLM2-135M-Instruct answers with the full cache (benchmarks/results/knobs.md).
DEFAULT_RULER_TASKS = ("niah_single", "niah_multikey")
RESULTS_FILE = "results.jsonl"


# ---------------------------------------------------------------------------------------------
# What is measured through a cache


@torch.no_grad()
def teacher_forced(model, cache, inputs: torch.Tensor, targets: torch.Tensor, modules=None):
    """One forward of ``inputs [1, C]`` after the cached prompt.

    Returns:
        ``(nll_sum, n_targets, outputs)``: summed NLL of ``targets [1, C]``, and when `modules` is
        given the output ``[C, hidden]`` of each (attention) module in that forward, else None.
    """
    if isinstance(cache, RDKVCache):
        cache.flush()  # tokens waiting for decoded queries (`observe`): this forward must read them packed
    outputs, handles = {}, []
    for i, m in enumerate(modules or []):
        handles.append(m.register_forward_hook(lambda mod, a, out, i=i: outputs.__setitem__(i, out[0][0].detach().float())))
    try:
        logits = model(input_ids=inputs, **cache_kwargs(cache), use_cache=True).logits
    finally:
        for h in handles:
            h.remove()
    nll = F.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()
    return nll, targets.shape[1], [outputs[i] for i in range(len(modules))] if modules else None


def relative_errors(outputs, reference) -> list[float]:
    """``||o - o_ref|| / ||o_ref||`` per layer (Frobenius over tokens and hidden)."""
    return [float((o - r).norm() / r.norm().clamp(min=1e-30)) for o, r in zip(outputs, reference)]


@torch.no_grad()
def greedy_decode(model, cache, first_logits: torch.Tensor, max_new_tokens: int, eos_ids) -> list[int]:
    """Greedy tokens after the cached prompt, the first from the prompt's last `first_logits`;
    stops after an end-of-sequence token (as ``generate`` does)."""
    tokens, logits = [], first_logits
    while len(tokens) < max_new_tokens:
        tok = int(logits.argmax(-1))
        tokens.append(tok)
        if tok in eos_ids or len(tokens) == max_new_tokens:
            break
        logits = model(input_ids=torch.tensor([[tok]], device=first_logits.device), **cache_kwargs(cache), use_cache=True).logits[0, -1]
    return tokens


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for x in (getattr(model.generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if x is not None:
            ids.update(x if isinstance(x, (list, tuple)) else [x])
    return ids


# ---------------------------------------------------------------------------------------------
# Settings, the results file, the run


@dataclass
class EvalSettings:
    """What to evaluate. Every field is validated on creation.

    Args:
        model_name: recorded in every cell's key.
        tasks: any of ``TASK_KINDS``.
        methods: method specs (see :func:`parse_method`).
        budgets: bits per element for the budgeted methods, in (0, 16].
        lengths: RULER prompt lengths in tokens.
        samples: RULER samples per task and length (seeds ``seed .. seed + samples - 1``).
        windows: text windows for ``ppl`` / ``distortion`` (seeds likewise).
        ppl_length: prompt tokens of a ``ppl`` window; continuation: tokens scored after it.
        ruler_tasks: names from ``rdkv_hf.tasks.TASKS``; haystack: ``"noise"`` or ``"text"``.
    """

    model_name: str
    tasks: tuple = TASK_KINDS
    methods: tuple = dataclasses.field(default_factory=lambda: tuple(all_methods()))
    budgets: tuple = DEFAULT_BUDGETS
    lengths: tuple = DEFAULT_LENGTHS
    samples: int = 2
    windows: int = 4
    ppl_length: int = 2048
    continuation: int = 256
    ruler_tasks: tuple = DEFAULT_RULER_TASKS
    haystack: str = "noise"
    seed: int = 0

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in TASK_KINDS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {bad or self.tasks}; valid tasks: {', '.join(TASK_KINDS)}")
        self.methods = tuple(parse_method(m).spec for m in self.methods)
        if not self.methods:
            raise ValueError(f"give at least one method; valid methods: {', '.join(all_methods())}")
        self.budgets = tuple(float(b) for b in self.budgets)
        bad = [b for b in self.budgets if not 0 < b <= 16]
        if bad:
            raise ValueError(f"`budgets` must be in (0, 16] bits per element, got {bad}")
        self.lengths = tuple(int(n) for n in self.lengths)
        for name in ("samples", "windows", "ppl_length", "continuation"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"`lengths` must be positive token counts, got {self.lengths}")
        self.ruler_tasks = tuple(self.ruler_tasks)
        bad = [t for t in self.ruler_tasks if t not in ruler.TASKS]
        if bad:
            raise ValueError(f"unknown RULER task(s) {bad}; valid ones: {', '.join(ruler.TASKS)}")
        if self.haystack not in ruler.HAYSTACKS:
            raise ValueError(f"`haystack` must be one of {ruler.HAYSTACKS}, got {self.haystack!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cell_key(model: str, task: str, method: str, budget, length: int, seed: int) -> str:
    """The identity of a cell in the results file."""
    return json.dumps([model, task, method, None if budget is None else float(budget), int(length), int(seed)])


class ResultStore:
    """Append-only JSONL of finished cells; a cell is done once its line is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._torn = False  # the file ends without a newline: a run was killed mid-write
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self._torn = bool(text) and not text.endswith("\n")
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a partial last line: that cell is simply redone.
                    logger.warning("%s:%d is not valid JSON; ignoring that line", self.path, n)
                    continue
                self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self._torn else "") + json.dumps(record) + "\n")
        self._torn = False
        self.records[record["key"]] = record


def _budgets(method: Method, budgets) -> list:
    return list(budgets) if method.budgeted else [None]


def _record(settings, task, method, budget, length, seed, pre, layer_bytes, seconds, **values) -> dict:
    """One cell's line. `layer_bytes`: the bytes each layer of the method's cache holds.

    ``bits_per_element`` is 16 x the global layers' bytes over their bf16 bytes: the bits per
    element of the layers the methods compress (on a model without sliding layers, of all layers)."""
    nbytes = sum(layer_bytes)
    glob = sum(layer_bytes[i] for i in pre.global_layers)
    return {
        "key": cell_key(settings.model_name, task, method.spec, budget, length, seed),
        "model": settings.model_name, "task": task, "method": method.spec, "label": method.display,
        "budget": budget, "length": length, "seed": seed, "prompt_tokens": pre.tokens,
        "nbytes": nbytes, "bf16_bytes": pre.bf16_bytes, "pct_bf16": 100.0 * nbytes / pre.bf16_bytes,
        "global_layers": list(pre.global_layers), "n_layers": len(layer_bytes),
        "global_nbytes": glob, "global_bf16_bytes": pre.global_bf16_bytes, "sliding_nbytes": nbytes - glob,
        "pct_global_bf16": 100.0 * glob / pre.global_bf16_bytes,
        "bits_per_element": 16.0 * glob / pre.global_bf16_bytes, "seconds": round(seconds, 3), **values,
    }


def _window_ids(tokenizer, settings: EvalSettings, cache: dict) -> list:
    """The ``ppl`` windows: ``ppl_length + continuation + 1`` tokens, one seeded start each in the
    eval text (drawn per seed, so window i does not depend on how many windows are asked for).

    A window starts with the special tokens the tokenizer puts before any text (Gemma's BOS, which
    the model needs; none for SmolLM2), followed by eval tokens up to the window's length."""
    if "ids" not in cache:
        from ..text import encode_text

        cache["ids"] = encode_text(tokenizer, "eval")
        cache["lead"] = torch.tensor(tokenizer("", return_attention_mask=False).input_ids, dtype=torch.long, device="cpu")
    ids, lead = cache["ids"], cache["lead"]
    n = settings.ppl_length + settings.continuation + 1 - len(lead)
    if len(ids) < n:
        raise ValueError(f"the eval text has {len(ids)} tokens, fewer than the {n} a window needs; lower `ppl_length`")
    starts = [random.Random(f"ppl:{settings.seed + i}").randrange(len(ids) - n + 1) for i in range(settings.windows)]
    return [torch.cat([lead, ids[s : s + n]])[None] for s in starts]


def evaluate(model, tokenizer, settings: EvalSettings, out_dir, profile=None, progress: bool = True,
             window_ids: list | None = None) -> list[dict]:
    """Run every pending cell of `settings`, append it to ``out_dir/results.jsonl`` and write the
    reports (``results.json``, ``table.md``, ``rate_distortion.png``).

    Args:
        model: an unpatched Transformers causal LM; it is patched for the run and unpatched after.
        tokenizer: its tokenizer (a chat template for instruct models' RULER prompts).
        profile: an :class:`~rdkv_hf.RDKVProfile` for ``rdkv+profile`` / ``ratequant``; without
            one those methods are skipped with a warning.
        window_ids: ``ppl`` windows ``[1, ppl_length + continuation + 1]`` to use instead of eval
            text (tests).
    Returns:
        the records of every cell of the grid (finished now or before).
    """
    from ..patching import is_patched, patch, unpatch
    from .report import write_reports

    if is_patched(model):
        raise ValueError("evaluate() patches the model itself for each method; call rdkv_hf.unpatch(model) first")
    out_dir = Path(out_dir)
    store = ResultStore(out_dir / RESULTS_FILE)
    methods = [parse_method(m) for m in settings.methods]
    skipped = [m.spec for m in methods if m.needs_profile and profile is None]
    if skipped:
        logger.warning("no profile: skipping %s (they need one)", ", ".join(skipped))
        skipped = [f"{m} (no profile)" for m in skipped]
    methods = [m for m in methods if not (m.needs_profile and profile is None)]
    grid = []
    for m in methods:
        for b in _budgets(m, settings.budgets):
            why = check_cell(m, b, profile, model)
            if why is None:
                grid.append((m, b))
            else:
                where = "" if b is None else f" at {b:g} bits"
                logger.warning("skipping %s%s: %s", m.spec, where, why)
                skipped.append(f"{m.spec}{where} ({why})")
    # The prompt forward keeps as many last queries as the widest scoring window asks for.
    capture = max([32] + [dict(m.options).get("window", 32) for m in methods])
    patch(model, budget=16)  # the "rdkv" attention serves every RDKVCache; other caches fall back to sdpa
    try:
        if {"ppl", "distortion"} & set(settings.tasks):
            _run_teacher_forced(model, tokenizer, settings, grid, store, profile, capture, progress, window_ids)
        if "ruler" in settings.tasks:
            _run_ruler(model, tokenizer, settings, grid, store, profile, capture, progress)
    finally:
        unpatch(model)
    records = [r for r in store.records.values() if _in_grid(r, settings, grid)]
    write_reports(records, out_dir, settings, skipped=skipped)
    return records


def _in_grid(rec: dict, settings: EvalSettings, grid: list) -> bool:
    """Whether a stored record is one of this run's cells (the file may hold other runs' too)."""
    if rec["model"] != settings.model_name or (rec["method"], rec["budget"]) not in {(m.spec, b) for m, b in grid}:
        return False
    if rec["task"] in ("ppl", "distortion"):
        return (rec["task"] in settings.tasks and rec["length"] == settings.ppl_length
                and settings.seed <= rec["seed"] < settings.seed + settings.windows)
    sub = rec["task"].partition("/")[2]
    return ("ruler" in settings.tasks and sub in settings.ruler_tasks and rec["length"] in settings.lengths
            and settings.seed <= rec["seed"] < settings.seed + settings.samples)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled or total == 0, dynamic_ncols=True)


def _run_teacher_forced(model, tokenizer, settings, grid, store, profile, window, progress, window_ids):
    from ..model_patches import patcher_for

    kinds = [t for t in ("ppl", "distortion") if t in settings.tasks]
    n = settings.ppl_length
    seeds = [settings.seed + i for i in range(settings.windows)]

    def pending(seed):
        return [(m, b) for m, b in grid if any(cell_key(settings.model_name, t, m.spec, b, n, seed) not in store for t in kinds)]

    todo = {s: pending(s) for s in seeds}
    bar = _progress(sum(len(v) for v in todo.values()), "ppl/distortion", progress)
    modules = patcher_for(model).attention_modules(model) if "distortion" in kinds else None
    ids_cache: dict = {}
    with bar:
        for i, seed in enumerate(seeds):
            if not todo[seed]:
                continue
            ids = window_ids[i] if window_ids is not None else _window_ids(tokenizer, settings, ids_cache)[i]
            prompt, inputs, targets = ids[:, :n], ids[:, n : n + settings.continuation], ids[:, n + 1 : n + settings.continuation + 1]
            pre = prefill(model, prompt, window)
            reference = None
            if modules is not None:  # the full-cache outputs every other method is compared with
                _, _, reference = teacher_forced(model, _full_cache(model, pre.keys, pre.values), inputs, targets, modules)
            for m, b in todo[seed]:
                bar.set_postfix_str(f"window {seed} {m.spec} {'' if b is None else b}")
                start = time.perf_counter()
                cache = build_cache(model, pre, m, b, profile)
                if isinstance(cache, RDKVCache):
                    cache.flush()  # `observe`: teacher forcing has no decoded queries to wait for
                layer_bytes = layer_nbytes(cache)
                nll, count, outputs = teacher_forced(model, cache, inputs, targets, modules)
                seconds = time.perf_counter() - start
                if "ppl" in kinds:
                    store.add(_record(settings, "ppl", m, b, n, seed, pre, layer_bytes, seconds, metric="ppl",
                                      value=math.exp(nll / count), nll_sum=nll, n_targets=count))
                if "distortion" in kinds:
                    errs = relative_errors(outputs, reference)
                    store.add(_record(settings, "distortion", m, b, n, seed, pre, layer_bytes, seconds,
                                      metric="attn_rel_error", value=sum(errs) / len(errs), per_layer=errs))
                bar.update()


def _prompt_waits(cache) -> bool:
    """Whether a layer of `cache` holds prompt tokens waiting for decoded queries (``observe``)."""
    return any(observe.waiting(layer) for layer in cache.layers)


def _packed_prompt_bytes(cache: RDKVCache, before: list[int], fed: int) -> list[int]:
    """Bytes per layer after the prompt, for a cache whose prompt waited for decoded queries
    (``RDKVConfig.observe``) and was packed while `fed` decoded tokens went in: RDKV layers as they
    hold it now (packed by :meth:`~rdkv_hf.RDKVCache.flush` if the answer ended first) less those
    tokens' full-precision K/V, other layers as they were after the prompt (`before`)."""
    cache.flush()
    now = layer_nbytes(cache)
    out = list(before)
    for i in cache.rdkv_layers:
        layer = cache.layers[i]
        per_token = (layer.keys[:, :, :1].numel() * layer.keys.element_size() + layer.values[:, :, :1].numel() * layer.values.element_size())
        out[i] = now[i] - fed * per_token
    return out


def _run_ruler(model, tokenizer, settings, grid, store, profile, window, progress):
    chat = getattr(tokenizer, "chat_template", None) is not None
    text = None
    if settings.haystack == "text":
        from ..text import load_text

        text = load_text("eval")
    eos = eos_token_ids(model, tokenizer)
    samples = [(t, n, settings.seed + s) for t in settings.ruler_tasks for n in settings.lengths for s in range(settings.samples)]
    todo = {smp: [(m, b) for m, b in grid if cell_key(settings.model_name, f"ruler/{smp[0]}", m.spec, b, smp[1], smp[2]) not in store]
            for smp in samples}
    bar = _progress(sum(len(v) for v in todo.values()), "ruler", progress)
    with bar:
        for (task, length, seed), cells in todo.items():
            if not cells:
                continue
            sample = ruler.TASKS[task](tokenizer, length, seed, settings.haystack, text, chat=chat)
            pre = prefill(model, ruler.render(sample, tokenizer, chat), window)
            for m, b in cells:
                bar.set_postfix_str(f"{task} {length} #{seed} {m.spec} {'' if b is None else b}")
                start = time.perf_counter()
                cache = build_cache(model, pre, m, b, profile)
                layer_bytes = layer_nbytes(cache)
                waited = _prompt_waits(cache)
                tokens = greedy_decode(model, cache, pre.logits, sample.max_new_tokens, eos)
                unpacked = _prompt_waits(cache)  # the answer ended first: it read the prompt in full precision
                if waited:  # `observe`: the prompt was packed during the answer, or is now
                    layer_bytes = _packed_prompt_bytes(cache, layer_bytes, fed=len(tokens) - 1)
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                store.add(_record(settings, f"ruler/{task}", m, b, length, seed, pre, layer_bytes, time.perf_counter() - start,
                                  metric="ruler_score", value=ruler.score(sample, answer), output=answer, chat=chat,
                                  answers=sample.answers, new_tokens=len(tokens), prompt_unpacked=unpacked))
                bar.update()


# A small grid for a smoke run of the real model (a few minutes on two cores).
QUICK = dict(budgets=(1.5, 2.5), lengths=(1024,), samples=1, windows=1, ppl_length=1024, continuation=128,
             ruler_tasks=("niah_single",))

# `rdkv-hf eval --model NAME` defaults where they differ from EvalSettings' (which suit SmolLM2).
# Gemma-3-270m (base, 32K positions) is evaluated at long contexts: RULER-style tasks at 4K-16K and
# perplexity after an 8K prompt; why these tasks and budgets: benchmarks/results/knobs.md.
MODEL_DEFAULTS = {
    "gemma3-270m": dict(budgets=(0.4, 1.6, 2.5), lengths=(4096, 8192, 16384), windows=2, ppl_length=8192,
                        ruler_tasks=("niah_single", "niah_multikey"), haystack="text"),
}
