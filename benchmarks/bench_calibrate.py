"""Calibration time of SmolLM2-135M-Instruct, next to what its forward and backward cost on this machine.

    python benchmarks/bench_calibrate.py                    # 16 x 512 (the default) and 4 x 512, about 2 min
    python benchmarks/bench_calibrate.py --n-seqs 16 --repeat 2

`rdkv_hf.calibrate` needs one forward and one backward (the loss gradient down to every layer's K
and V) over the calibration tokens. The table puts its time beside:

- the machine's float32 matmul rate (a 2048 x 576 x 1536 product: the shape of SmolLM2's MLP);
- a forward without gradients, and a forward + backward to the inputs, over the same tokens;
- the matmul floor of that forward + backward: its matmul FLOPs (every linear layer twice, attention
  three times) at the measured rate. No implementation of the sensitivity as specified (mean squared
  gradient over all the calibration tokens) can be faster than this on the machine.

`other` is the CPU cores that other processes (and the hypervisor) took during the row (from
/proc/stat): rows above ~0.1 were slowed down by them. Timings on this shared VM vary by 30% or more
from hour to hour, so the floor is measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import OtherLoad, loadavg, machine  # noqa: E402


def matmul_gflops(reps: int = 20) -> float:
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * 2048 * 576 * 1536 / (time.perf_counter() - t) / 1e9


def matmul_flops(model, n_seqs: int, seq_len: int) -> float:
    """Matmul FLOPs of a forward + input-gradient backward: linears twice, causal attention three times."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = n_seqs * seq_len
    attn_fwd = n_seqs * cfg.num_hidden_layers * cfg.num_attention_heads * 2 * 2 * head_dim * seq_len * (seq_len + 1) / 2
    return 2 * (2 * linear * tokens) + 3 * attn_fwd


def forward_backward(model, ids: torch.Tensor, batch_size: int, backward: bool) -> None:
    for batch in ids.split(batch_size):
        if not backward:
            with torch.no_grad():
                model(batch, use_cache=False)
            continue
        embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    load = OtherLoad()
    load.start()
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t, load.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-seqs", type=int, nargs="+", default=[16, 4], help="calibration sequences (default: 16 and 4)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=1, help="calibrations per size (the table shows each)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import rdkv_hf
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.text import token_chunks

    model, tok = load_model("smollm2-135m")
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    print(f"machine: {machine()}, {args.threads} threads, load average {loadavg()}")
    rows = []
    for n in args.n_seqs:
        ids = token_chunks(tok, n, args.seq_len, split="calib", seed=0)
        rate = matmul_gflops()
        floor = matmul_flops(model, n, args.seq_len) / (rate * 1e9)
        fwd, other_f = timed(forward_backward, model, ids, 4, False)
        fb, other_b = timed(forward_backward, model, ids, 4, True)
        rows.append((f"{n} x {args.seq_len}", "matmul floor of forward + backward", floor, None, f"at {rate:.0f} GFLOP/s"))
        rows.append((f"{n} x {args.seq_len}", "forward, no gradients", fwd, other_f, ""))
        rows.append((f"{n} x {args.seq_len}", "forward + backward to the inputs", fb, other_b, ""))
        for _ in range(args.repeat):
            sec, other = timed(rdkv_hf.calibrate, model, ids, progress=False)
            rows.append((f"{n} x {args.seq_len}", "rdkv_hf.calibrate", sec, other, f"{sec / floor:.2f}x the floor"))
    print()
    print("| tokens | what | seconds | other cores | note |")
    print("|---|---|---|---|---|")
    for tokens, what, sec, other, note in rows:
        print(f"| {tokens} | {what} | {sec:.1f} | {'' if other is None else f'{other:.2f}'} | {note} |")


if __name__ == "__main__":
    main()
