"""Decode speed on a GPU: DynamicCache against RDKV (Triton decode kernel, 2.5 bits) at long contexts.

    python benchmarks/bench_gpu_decode.py                    # 8K and 32K on CUDA, about a minute
    python benchmarks/bench_gpu_decode.py --device cpu --contexts 512 1024 --steps 3   # dry run

Model: a tiny-but-wide synthetic Llama with random weights (4 layers, hidden 2048, 16 query heads and
4 KV heads of dim 128, bf16, sdpa), so that reading the cache, not the weights, is what grows with the
context; ``max_position_embeddings`` is raised to the longest context (speed only, no quality).

For each context one prefill of random tokens (``logits_to_keep=1``) fills the cache: a DynamicCache
with the unpatched model, an :class:`rdkv_hf.RDKVCache` with the model patched at ``--budget`` bits
(RDKV weighs, allocates and packs every layer in that forward). The DynamicCache row is the best of
torch's SDPA kernels for it (flash or memory-efficient, chosen with ``sdpa_kernel``); on CUDA a second
row, "torch's default SDPA", lets torch choose as a user's code does: on Hopper with torch 2.11 that
is cuDNN, which spent about 8 ms of CPU per call in a profile (a new plan for every new cache length),
so that row measures that overhead more than the cache. Then ``--warmup`` greedy decode steps
(Triton compiles on the first) and ``--steps`` timed ones, each between two ``torch.cuda.synchronize``;
``ms/token`` is their median. ``KV bytes`` is what the cache holds after the prompt (codes, scales,
channel orders, raw zones), ``ratio`` the DynamicCache's bytes over the method's, ``speedup`` the
DynamicCache's ms/token over the method's, ``ops/step`` the operators one more decode step dispatches
(views and allocations left out: on a GPU each is at least one kernel launch, what a small-batch step is
bound by; counted the same way on the CPU), ``peak MiB`` the CUDA memory peak during the decode steps.

Prints a markdown table and writes a CSV (``--out-dir``, default ``benchmarks/results/gpu/``).
``--profile`` also runs three decode steps of each method at the first context under
``torch.profiler`` and writes the operators' table (sorted by their own device time, then CPU time)
beside the CSV, to see where a step's time goes.
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import rdkv_hf
from rdkv_hf.compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a dry run of the script)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--steps", type=int, default=20, help="timed decode steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (Triton compiles)")
    p.add_argument("--budget", type=float, default=2.5, help="RDKV bits per cached element")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "cpu", "triton"],
                   help="RDKV decode path (default: triton on CUDA, auto elsewhere)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    p.add_argument("--profile", action="store_true", help="profile 3 decode steps per method at the first context")
    return p.parse_args(argv)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def build_model(args, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(args.contexts) + args.warmup + args.steps + 8,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[args.dtype]).eval()


def kv_bytes(cache) -> int:
    """Bytes a cache holds: RDKVCache counts its packed zones and tail; a DynamicCache its K/V."""
    if isinstance(cache, rdkv_hf.RDKVCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def device_slug(name: str, device: torch.device) -> str:
    """File-name part for a device: the GPU's name (nvidia-h200), or cpu."""
    return re.sub(r"[^a-z0-9]+", "-", (name if device.type == "cuda" else "cpu").lower()).strip("-")


def best_sdpa():
    """The DynamicCache baseline's attention: flash or memory-efficient SDPA (not cuDNN, whose per-shape
    planning dominates a decode step on Hopper), the math kernel only where neither runs."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def profile_path(args, slug: str, method: str, ctx: int, wanted: bool) -> Path | None:
    return args.out_dir / f"profile-{slug}-{method}-{ctx}.txt" if wanted else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(model, tok: torch.Tensor, cache, device: torch.device, path: Path, steps: int = 3) -> None:
    """Three more decode steps under torch.profiler; the operators' table (own device time first,
    then own CPU time) to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            out = model(tok, **cache_kwargs(cache))
            tok = out.logits[:, -1:].argmax(-1)
        sync(device)
    table = prof.key_averages()
    sorts = (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {steps} decode steps, sorted by {key}\n{table.table(sort_by=key, row_limit=25)}\n" for key in sorts))
    print(f"wrote {path}")


class OperatorCount(TorchDispatchMode):
    """Counts the operators a block dispatches, leaving out views and allocations: on a GPU each
    one left is at least one kernel launch, what a decode step at small batch is bound by."""

    FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(model, tok: torch.Tensor, cache) -> int:
    """Operators (:class:`OperatorCount`) of one more decode step."""
    with OperatorCount() as counter:
        model(tok, **cache_kwargs(cache))
    return counter.count


def run_one(model, ids: torch.Tensor, cache, args, device: torch.device, profile_to: Path | None = None) -> dict:
    """Prefill `ids` into `cache`, then time greedy decode steps; bytes, times and memory (and the
    profile of three more steps to `profile_to`)."""
    sync(device)
    t0 = time.perf_counter()
    out = model(ids, logits_to_keep=1, **cache_kwargs(cache))
    if hasattr(cache, "flush"):  # a prompt under `observe_max` would wait for 16 decoded queries (observe)
        cache.flush()
    sync(device)
    prefill_s = time.perf_counter() - t0
    nbytes = kv_bytes(cache)
    tok = out.logits[:, -1:].argmax(-1)
    del out
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(tok, **cache_kwargs(cache))
        tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times[args.warmup :])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    ops = count_operators(model, tok, cache)
    if profile_to is not None:
        profile_steps(model, tok, cache, device, profile_to)
    return dict(kv_bytes=nbytes, ms_per_token=ms, prefill_s=prefill_s, peak_mib=peak, ops_per_step=ops)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu for a dry run")
    backend = args.backend or ("triton" if device.type == "cuda" else "auto")
    env = dict(torch=torch.__version__, transformers=transformers.__version__, triton=triton_version(),
               device=device_name(device), git=git_sha())
    print(f"# GPU decode benchmark: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
          f"triton {env['triton']}, git {env['git']}")
    print(f"# synthetic Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads "
          f"of {args.hidden // args.heads}, {args.dtype}; {args.steps} timed steps after {args.warmup} warm-up")

    model = build_model(args, device)
    rdkv_name = f"RDKV {args.budget:g} bits ({backend})"
    rows = []
    with torch.inference_mode():
        # Untimed: CUDA/cuBLAS start-up and Triton's first compilation stay out of the first row.
        warm = torch.randint(args.vocab, (1, 256), generator=torch.Generator().manual_seed(args.seed)).to(device)
        quick = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
        run_one(model, warm, DynamicCache(config=model.config), quick, device)
        with rdkv_hf.patched(model, budget=args.budget, backend=backend):
            run_one(model, warm, rdkv_hf.RDKVCache(model), quick, device)
        slug = device_slug(env["device"], device)
        for i, ctx in enumerate(args.contexts):
            profile = args.profile and i == 0
            first = len(rows)  # this context's rows start here
            ids = torch.randint(args.vocab, (1, ctx), generator=torch.Generator().manual_seed(args.seed + ctx)).to(device)
            rdkv_hf.unpatch(model)
            with best_sdpa():
                dyn = run_one(model, ids, DynamicCache(config=model.config), args, device, profile_path(args, slug, "dynamic", ctx, profile))
            rows.append(dict(method="DynamicCache", context=ctx, prompt_bits=8.0 * model.dtype.itemsize, **dyn))
            if device.type == "cuda":
                default = run_one(model, ids, DynamicCache(config=model.config), args, device)
                rows.append(dict(method="DynamicCache, torch's default SDPA", context=ctx, prompt_bits=8.0 * model.dtype.itemsize, **default))
            rdkv_hf.patch(model, budget=args.budget, backend=backend)
            cache = rdkv_hf.RDKVCache(model)
            res = run_one(model, ids, cache, args, device, profile_path(args, slug, "rdkv", ctx, profile))
            # a prompt shorter than `min_tokens` stays whole, in the model's dtype (the summary says 0 bits)
            res["prompt_bits"] = cache.summary().prompt_bits_per_element or 8.0 * model.dtype.itemsize
            rows.append(dict(method=rdkv_name, context=ctx, **res))
            rdkv_hf.unpatch(model)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for r in rows[first:]:
                r["kv_bytes_per_token"] = r["kv_bytes"] / ctx
                r["ratio"] = dyn["kv_bytes"] / r["kv_bytes"]
                r["tokens_per_s"] = 1000 / r["ms_per_token"]
                r["speedup"] = dyn["ms_per_token"] / r["ms_per_token"]
                r.update(env)

    print()
    print("| method | context | KV bytes | KV bytes/token | bits/element | ratio | ms/token | tokens/s | speedup | ops/step | prefill s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:,.0f}"  # nan off CUDA
        print(f"| {r['method']} | {r['context']:,} | {r['kv_bytes']:,} | {r['kv_bytes_per_token']:,.0f} | {r['prompt_bits']:.2f} | "
              f"{r['ratio']:.2f}x | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['ops_per_step']} | "
              f"{r['prefill_s']:.2f} | {peak} |")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"decode-{slug}.csv"
    fields = ["method", "context", "kv_bytes", "kv_bytes_per_token", "ratio", "prompt_bits", "ms_per_token", "tokens_per_s",
              "speedup", "ops_per_step", "prefill_s", "peak_mib", "torch", "transformers", "triton", "device", "git"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
