"""Decode partials of one packed layer: the candidate CPU implementations side by side.

    python benchmarks/bench_kernels.py                 # 3 heads x 32K tokens, RDKV widths at 2.5 bits
    python benchmarks/bench_kernels.py --tokens 4096 --threads 1

Candidates, all computing ``head_partials_reference``'s (max, sum, acc) for G = 3 query rows:

* ``torch-ref``: the reference, head by head and width group by width group in torch;
* ``torch-chunked``: torch over token chunks of every head at once per width (codes of one chunk
  unpacked to floats, then matmuls);
* ``numba``: a straightforward ``@njit(parallel=True)`` loop nest over (head, chunk) tasks, codes
  unpacked one at a time (numba has no float16 on the CPU: the 16-bit zones are passed as float32
  here, and scales through a lookup table);
* ``cpp``: ``rdkv_hf.kernels.cpu_decode`` (templated widths, vectorized tiles, OpenMP).

Prints first-call time (compile or build included) and the median of later calls, wall and CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdkv_hf import quant  # noqa: E402
from rdkv_hf.allocate import allocate_rdkv  # noqa: E402
from rdkv_hf.attention import head_partials_reference  # noqa: E402
from rdkv_hf.config import RDKVConfig  # noqa: E402
from rdkv_hf.storage import pack_segment  # noqa: E402


def make_layer(R: int, T: int, D: int, budget: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(R, T, D, generator=g) * (torch.rand(D, generator=g) * 3)
    v = torch.randn(R, T, D, generator=g)
    cfg = RDKVConfig(budget=budget)
    bits = torch.full((R,), budget * T * D, dtype=torch.float64)
    vb, kb = allocate_rdkv(torch.rand(R, T, generator=g) ** 8, torch.rand(R, D, generator=g) ** 2,
                           torch.ones(R, T, dtype=torch.bool), bits, bits, cfg.widths, cfg.eps_v, cfg.eps_k)
    return pack_segment(k, v, vb, kb, torch.float16)


def torch_ref(heads, buffers, q):
    parts = [head_partials_reference(h, q[r]) for r, h in enumerate(heads)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])


def torch_chunked(heads, buffers, q, chunk=2048):
    """Online softmax over token chunks; per chunk, one unpack + matmul per width group."""
    R, G, D = q.shape
    out_m, out_l, out_a = [], [], []
    for r, h in enumerate(heads):
        qr = q[r]
        qp = qr if h.k_perm is None else qr[:, h.k_perm.long()]
        m = torch.full((G,), -torch.inf)
        l = torch.zeros(G)
        acc = torch.zeros(G, D)
        for t0 in range(0, h.n, chunk):
            t1 = min(h.n, t0 + chunk)
            logits = torch.zeros(G, t1 - t0)
            c0 = 0
            for grp in h.k_groups:
                qs = qp[:, c0 : c0 + grp.count]
                c0 += grp.count
                if grp.bits == 16:
                    logits += qs @ grp.data[:, t0:t1].float()
                else:
                    k = quant.per_word(grp.bits)
                    w0, w1 = t0 // k, -(-t1 // k)
                    codes = quant.unpack(grp.data[:, w0:w1], grp.bits, (w1 - w0) * k)[:, t0 - w0 * k : t1 - w0 * k].float()
                    logits += (qs * grp.scale.float()) @ codes + (qs @ grp.minimum.float())[:, None]
            mc = torch.maximum(m, logits.amax(1))
            p = torch.exp(logits - mc[:, None])
            f = torch.exp(m - mc)
            l = l * f + p.sum(1)
            acc = acc * f[:, None]
            s0 = 0
            for grp in h.v_groups:
                a, b = max(t0, s0), min(t1, s0 + grp.count)
                if a < b:
                    pg = p[:, a - t0 : b - t0]
                    if grp.bits == 16:
                        acc += pg @ grp.data[a - s0 : b - s0].float()
                    else:
                        codes = quant.unpack(grp.data[a - s0 : b - s0], grp.bits, D).float()
                        acc += (pg * grp.scale[a - s0 : b - s0].float()) @ codes + (pg @ grp.minimum[a - s0 : b - s0].float())[:, None]
                s0 += grp.count
            m = mc
        out_m.append(m), out_l.append(l), out_a.append(acc)
    return torch.stack(out_m), torch.stack(out_l), torch.stack(out_a)


def numba_impl():
    import numba
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def partials(q, heads, groups, words, meta, raw, perm, lut, task_r, task_t0, chunk, out_m, out_l, out_acc):
        G, D = q.shape[1], q.shape[2]
        for i in prange(task_r.shape[0]):
            r, t0 = task_r[i], task_t0[i]
            t1 = min(t0 + chunk, heads[r, 0])
            tn = t1 - t0
            logits = np.zeros((G, tn), np.float32)
            bias = np.zeros(G, np.float32)
            for gi in range(heads[r, 3], heads[r, 4]):
                bits, count, length, wpr, data, mo, start = groups[gi]
                for j in range(count):
                    ch = start + j if heads[r, 5] < 0 else perm[heads[r, 5] + start + j]
                    if bits == 16:
                        for g in range(G):
                            a = q[r, g, ch]
                            for t in range(tn):
                                logits[g, t] += a * raw[data + j * length + t0 + t]
                        continue
                    s, mn = lut[meta[mo + j]], lut[meta[mo + count + j]]
                    k, mask = 32 // bits, (1 << bits) - 1
                    for g in range(G):
                        bias[g] += q[r, g, ch] * mn
                    for t in range(tn):
                        tt = t0 + t
                        c = np.float32((words[data + j * wpr + tt // k] >> ((tt % k) * bits)) & mask)
                        for g in range(G):
                            logits[g, t] += q[r, g, ch] * s * c
            for g in range(G):
                mx = logits[g].max()
                out_m[i, g] = mx + bias[g]
                for t in range(tn):
                    logits[g, t] = np.exp(logits[g, t] - mx)
                out_l[i, g] = logits[g].sum()
            acc = np.zeros((G, D), np.float32)
            for gi in range(heads[r, 1], heads[r, 2]):
                bits, count, length, wpr, data, mo, start = groups[gi]
                for t in range(max(t0, start), min(t1, start + count)):
                    row = t - start
                    if bits == 16:
                        for g in range(G):
                            for d in range(D):
                                acc[g, d] += logits[g, t - t0] * raw[data + row * D + d]
                        continue
                    s, mn = lut[meta[mo + row]], lut[meta[mo + count + row]]
                    k, mask = 32 // bits, (1 << bits) - 1
                    for d in range(D):
                        c = np.float32((words[data + row * wpr + d // k] >> ((d % k) * bits)) & mask)
                        for g in range(G):
                            acc[g, d] += logits[g, t - t0] * (s * c + mn)
            out_acc[i] = acc

    lut = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)

    def run(heads, buffers, q, chunk=960):
        hd = buffers.heads.numpy()
        task_r, task_t0 = [], []
        for r in range(hd.shape[0]):
            for t0 in range(0, int(hd[r, 0]), chunk):
                task_r.append(r)
                task_t0.append(t0)
        task_r, task_t0 = np.array(task_r, np.int64), np.array(task_t0, np.int64)
        G, D = q.shape[1], q.shape[2]
        m = np.empty((len(task_r), G), np.float32)
        l = np.empty_like(m)
        acc = np.empty((len(task_r), G, D), np.float32)
        perm = buffers.perm.numpy().astype(np.int64)
        raw = buffers.raw.float().numpy()
        partials(q.numpy(), hd, buffers.groups.numpy(), buffers.words.numpy(), buffers.meta.view(torch.int16).numpy().view(np.uint16),
                 raw, perm, lut, task_r, task_t0, chunk, m, l, acc)
        m, l, acc = torch.from_numpy(m), torch.from_numpy(l), torch.from_numpy(acc)
        out = []
        for r in range(hd.shape[0]):
            sel = torch.from_numpy(task_r == r)
            M = m[sel].amax(0)
            f = torch.exp(m[sel] - M)
            out.append((M, (l[sel] * f).sum(0), (acc[sel] * f[..., None]).sum(0)))
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]), torch.stack([o[2] for o in out])

    return run, numba.__version__


def cpp(heads, buffers, q):
    from rdkv_hf.kernels import cpu_decode

    return cpu_decode.segment_partials(buffers, q)


def measure(fn, args, reps):
    t0 = time.perf_counter()
    first = fn(*args)
    first_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn(*args)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return first, first_s, statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--budget", type=float, default=2.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--only", nargs="+", default=["torch-ref", "torch-chunked", "numba", "cpp"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    heads, buffers = make_layer(a.heads, a.tokens, a.head_dim, a.budget)
    q = torch.randn(a.heads, 3, a.head_dim) * a.head_dim**-0.5
    print(f"{a.heads} heads x {a.tokens} tokens, D={a.head_dim}, {a.budget} bits: kept {[h.n for h in heads]}; "
          f"{buffers.nbytes / 2**20:.2f} MiB packed; threads {a.threads}; loadavg {open('/proc/loadavg').read().split()[:3]}")
    ref = torch_ref(heads, buffers, q)
    cands = {"torch-ref": torch_ref, "torch-chunked": torch_chunked, "cpp": cpp}
    if "numba" in a.only:
        try:
            run, ver = numba_impl()
            cands["numba"] = run
        except ImportError:
            print("numba not installed: skipped")
    print(f"{'impl':>14} {'first call s':>12} {'wall ms':>9} {'cpu ms':>9} {'max |err|':>10}")
    for name in a.only:
        if name not in cands:
            continue
        out, first, wall, cpu = measure(cands[name], (heads, buffers, q), a.reps if name != "torch-ref" else 2)
        err = max(((out[2] / out[1][..., None]) - (ref[2] / ref[1][..., None])).abs().max().item(), 0.0)
        print(f"{name:>14} {first:12.2f} {wall * 1e3:9.2f} {cpu * 1e3:9.2f} {err:10.2e}", flush=True)


if __name__ == "__main__":
    main()
