"""Decode speed, KV bytes and memory of RDKV against DynamicCache and Transformers' QuantizedCache.

    python benchmarks/bench_decode.py                         # 4K, 16K, 32K; every method; 8K prefill
    python benchmarks/bench_decode.py --contexts 4096 --no-prefill --methods dynamic rdkv-cpu
    python benchmarks/bench_decode.py --csv out.csv --steps 32

Model: SmolLM2-135M-Instruct (float32, sdpa, 30 layers, 3 KV heads of 64), 2 threads.

Prompt caches: one real 4K prefill of KJV text gives every layer's post-RoPE K/V and the queries of
its last 32 positions (cached in ``--workdir``). A context of N tokens tiles that K/V to N tokens,
every copy after the first perturbed by 10% of each channel's spread, and feeds it to each cache
as one prompt: DynamicCache stores it, QuantizedCache (quanto, 4 and 2 bits) quantizes it, RDKV
weighs it with the captured window queries, allocates and packs it layer by layer. The model's
max_position_embeddings is raised for 16K/32K (speed only: quality is not measured here).

Each (method, context) runs in a fresh worker process, so its peak RSS is its own: ``peak MiB``
is the peak during decode (reset after building the cache), ``rss MiB`` the resident size after
it. Decode time is the median over ``--steps`` greedy steps after ``--warmup``; the torch
reference (which walks heads in Python) and QuantizedCache (which dequantizes the whole cache
every step) run ``--slow-steps``. ``cpu_ms_token`` is the process CPU time of a step (less
sensitive to other load than wall time). ``other`` is the CPU cores other processes used during
the timed steps (/proc/stat); rerun rows where it is above ~0.1.

The prefill rows time one 8K forward (``logits_to_keep=1``) with a DynamicCache and with RDKV at
2.5 bits, split into the RDKV work (scoring, allocation, packing), and record the peak RSS above
the loaded model, once with glibc's default malloc and once with ``MALLOC_MMAP_THRESHOLD_=65536``
(freed blocks go back to the system, so the peak RSS is the peak of live tensors).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rdkv_hf.compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "rdkv_hf" / "data" / "kjv_eval.txt"
SEED_TOKENS = 4096
WINDOW = 32
METHODS = ["dynamic", "quanto-4", "quanto-2", "rdkv-torch", "rdkv-cpu"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.5, 4.0], help="RDKV bits per element")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--slow-steps", type=int, default=4,
                   help="steps (after 1 warm-up) of the slow paths: QuantizedCache and the RDKV torch reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("RDKV_HF_CACHE", Path.home() / ".cache" / "rdkv_hf")) / "bench")
    p.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "decode.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job for a worker process
    return p.parse_args(argv)


# -- machine facts ------------------------------------------------------------------------------


def git_sha() -> str:
    """The checked-out commit, read from .git without running git."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}, git {git_sha()}"


def write_report(lines: list[str], out: Path) -> None:
    """Print a benchmark's markdown report and write it to `out` (its folder made if missing)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


class OtherLoad:
    """CPU cores used by other processes between start() and stop() (from /proc/stat)."""

    def _busy(self):
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def start(self):
        self.t0 = self._busy()

    def stop(self) -> float:
        b1, own1, w1 = self._busy()
        b0, own0, w0 = self.t0
        return max(0.0, ((b1 - b0) - (own1 - own0)) / max(w1 - w0, 1e-9))


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def rss_mib(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the seed: a real 4K prefill ----------------------------------------------------------------


def load_smollm():
    from rdkv_hf.eval.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def text_ids(tokenizer, path: Path, n: int) -> torch.Tensor:
    ids = tokenizer(path.read_text()[: n * 8], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"{path} gives only {ids.shape[1]} tokens, {n} needed")
    return ids


@torch.no_grad()
def build_seed(args) -> Path:
    """Per-layer K/V of a real 4K prefill and the post-RoPE queries of its last 32 positions."""
    path = args.workdir / f"seed-smollm2-{SEED_TOKENS}.pt"
    if path.exists():
        return path
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tokenizer = load_smollm()
    ids = text_ids(tokenizer, args.text_file, SEED_TOKENS)
    queries = {}

    def grab(module, a, kw):
        hs = kw["hidden_states"][:, -WINDOW:]
        cos, sin = (x[:, -WINDOW:] for x in kw["position_embeddings"])
        q = module.q_proj(hs).view(1, WINDOW, -1, module.head_dim).transpose(1, 2)
        queries[module.layer_idx] = apply_rotary_pos_emb(q, q, cos, sin)[0]

    hooks = [l.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for l in model.model.layers]
    cache = DynamicCache(config=model.config)
    out = model(ids, **cache_kwargs(cache), logits_to_keep=1)
    for h in hooks:
        h.remove()
    seed = {
        "k": [l.keys.clone() for l in cache.layers],
        "v": [l.values.clone() for l in cache.layers],
        "q": [queries[i] for i in range(len(cache.layers))],
        "next": out.logits[:, -1].argmax(-1, keepdim=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seed, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path


def tile(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``x [1, H, T, D]`` repeated to ``n`` tokens; copies after the first perturbed by 10% of
    each channel's standard deviation."""
    T = x.shape[2]
    reps = math.ceil(n / T)
    spread = x.std(2, keepdim=True)
    parts = [x] + [x + 0.1 * spread * torch.randn(x.shape, generator=gen) for _ in range(reps - 1)]
    return torch.cat(parts, 2)[:, :, :n].contiguous()


# -- one worker job ---------------------------------------------------------------------------


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache layer (quanto tensors are flattened)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if not k.startswith("__"))
    return 0


def make_cache(method: str, budget, model, seed, ctx: int):
    """The prompt cache of `ctx` tokens for `method`, built layer by layer."""
    from transformers import DynamicCache, QuantizedCache

    gen = torch.Generator().manual_seed(0)
    layers = len(seed["k"])
    if method == "dynamic":
        cache = DynamicCache(config=model.config)
    elif method.startswith("quanto"):
        cache = QuantizedCache("quanto", model.config, nbits=int(method.split("-")[1]))
    else:
        import rdkv_hf
        from rdkv_hf.attention import compress_layer

        rdkv_hf.patch(model, budget=budget, backend=method.split("-")[1])
        cache = rdkv_hf.RDKVCache(model)
        for i, layer in enumerate(cache.layers):
            k, v = tile(seed["k"][i], ctx, gen), tile(seed["v"][i], ctx, gen)
            layer.update(k, v)
            q = seed["q"][i]
            compress_layer(layer, q, None, q.shape[-1] ** -0.5)
            del k, v
        cache.flush()  # a context under `observe_max` waits for decoded queries (observe): time the packed cache
        return cache, cache.nbytes
    for i in range(layers):
        cache.update(tile(seed["k"][i], ctx, gen), tile(seed["v"][i], ctx, gen), i)
    return cache, sum(tensor_bytes(l) for l in cache.layers)


@torch.no_grad()
def decode_job(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    model, _ = load_smollm()
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, job["context"] + 256)
    seed = torch.load(job["seed"])
    start = time.perf_counter()
    cache, kv_bytes = make_cache(job["method"], job.get("budget"), model, seed, job["context"])
    build_s = time.perf_counter() - start
    del seed["k"], seed["v"]
    tok = seed["next"]
    steps = job["steps"]
    times, cpu, load = [], [], OtherLoad()
    reset_peak_rss()
    for i in range(job["warmup"] + steps):
        if i == job["warmup"]:
            load.start()
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    other = load.stop()
    ms = statistics.median(times[job["warmup"]:]) * 1e3
    summary = cache.summary() if hasattr(cache, "summary") else None
    return dict(
        ms_token=ms, tokens_s=1e3 / ms, cpu_ms_token=statistics.median(cpu[job["warmup"]:]) * 1e3, kv_bytes=kv_bytes, build_s=build_s, other=other,
        peak_mib=rss_mib("VmHWM"), rss_mib=rss_mib(), loadavg=loadavg(),
        bits=summary.prompt_bits_per_element if summary is not None else None,
    )


@torch.no_grad()
def prefill_job(job: dict) -> dict:
    from transformers import DynamicCache

    torch.set_num_threads(job["threads"])
    model, tokenizer = load_smollm()
    ids = text_ids(tokenizer, Path(job["text"]), job["tokens"])
    timers = {}
    if job["method"] == "dynamic":
        make = lambda: DynamicCache(config=model.config)  # noqa: E731
    else:
        import rdkv_hf
        from rdkv_hf import attention
        from rdkv_hf import cache as cache_mod

        rdkv_hf.patch(model, budget=job["budget"])
        _time(attention, "prompt_weights", timers, "scoring")
        _time(cache_mod.Planner, "widths", timers, "allocation")
        _time(cache_mod, "pack_segment", timers, "packing")
        make = lambda: rdkv_hf.RDKVCache(model)  # noqa: E731
    model(ids[:, :256], **cache_kwargs(make()), logits_to_keep=1)  # warm up
    timers.clear()
    base = rss_mib()
    reset_peak_rss()
    load = OtherLoad()
    load.start()
    t0 = time.perf_counter()
    cache = make()
    model(ids, **cache_kwargs(cache), logits_to_keep=1)
    if hasattr(cache, "flush"):  # packed within the prefill, as with `observe=0`
        cache.flush()
    prefill_s = time.perf_counter() - t0
    other = load.stop()
    kv = cache.nbytes if hasattr(cache, "nbytes") else sum(tensor_bytes(l) for l in cache.layers)
    return dict(prefill_s=prefill_s, peak_above_model_mib=rss_mib("VmHWM") - base, kv_bytes=kv, other=other,
                loadavg=loadavg(), **{k: round(v, 3) for k, v in timers.items()})


def _time(owner, name: str, timers: dict, key: str) -> None:
    """Accumulate the wall time of ``owner.name`` into ``timers[key]`` (this worker only)."""
    fn = getattr(owner, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timers[key] = timers.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)


# glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps freed
# blocks in its heap: the same DynamicCache prefill measured 590 to 774 MiB of peak RSS. A fixed
# threshold hands every block above 64 KiB back to the system on free, so RSS follows live tensors.
MMAP_64K = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(job: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- table ----------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(decode_job(job) if job["kind"] == "decode" else prefill_job(job)))
        return
    print(f"machine: {machine()}; threads {args.threads}; loadavg {loadavg()}")
    seed = build_seed(args)
    rows = []
    for ctx in args.contexts:
        base = None
        for method in args.methods:
            for budget in (args.budgets if method.startswith("rdkv") else [None]):
                slow = method == "rdkv-torch" or method.startswith("quanto")
                job = dict(kind="decode", method=method, budget=budget, context=ctx, seed=str(seed), threads=args.threads,
                           steps=args.slow_steps if slow else args.steps, warmup=1 if slow else args.warmup)
                r = dict(method=method if budget is None else f"{method} {budget:g}b", context=ctx, **run_worker(job))
                if method == "dynamic" and "ms_token" in r:
                    base = r
                if "ms_token" in r:
                    r["bytes_token"] = r["kv_bytes"] / ctx
                    if base is not None:
                        r["speedup"] = base["ms_token"] / r["ms_token"]
                        r["kv_ratio"] = base["kv_bytes"] / r["kv_bytes"]
                rows.append(r)
                print_row(r, header=len(rows) == 1)
    if not args.no_prefill:
        print()
        for malloc, env in (("glibc default", None), ("mmap threshold 64K", MMAP_64K)):
            for method, budget in (("dynamic", None), ("rdkv", 2.5)):
                job = dict(kind="prefill", method=method, budget=budget, tokens=args.prefill_tokens, threads=args.threads,
                           text=str(args.text_file))
                r = dict(method=f"prefill {method}" + (f" {budget:g}b" if budget else ""), context=args.prefill_tokens,
                         malloc=malloc, **run_worker(job, env))
                rows.append(r)
                print("  ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in COLUMNS, COLUMNS.index(k) if k in COLUMNS else 0, k))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"machine": machine(), **r})
    print(f"\nwrote {args.csv}")


COLUMNS = ["method", "context", "bits", "kv_bytes", "bytes_token", "kv_ratio", "ms_token", "tokens_s", "speedup", "cpu_ms_token",
           "peak_mib", "rss_mib", "build_s", "other", "loadavg", "malloc", "error"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_row(r: dict, header: bool) -> None:
    cols = [("method", 16), ("context", 7), ("bits", 5), ("bytes_token", 11), ("kv_ratio", 8), ("ms_token", 8),
            ("tokens_s", 8), ("speedup", 7), ("cpu_ms_token", 12), ("peak_mib", 8), ("build_s", 7), ("other", 5), ("loadavg", 14)]
    if header:
        print("  ".join(f"{c:>{w}}" for c, w in cols))
    if "error" in r:
        print(f"{r['method']:>16}  {r['context']:>7}  error: {r['error']}")
        return
    print("  ".join(f"{_fmt(r.get(c, '')):>{w}}" for c, w in cols), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
