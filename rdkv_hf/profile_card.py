"""How a profile looks: its model card, a table (:func:`show`) and a heat map (:func:`plot`) of the
bits each layer and KV head gets at a budget, shared among the layers a cache compresses."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import head_budgets
from .config import DEFAULT_BUDGET, RDKVConfig
from .head_budgets import default_bounds
from .planners.profile import ProfilePlanner


def _layer_bits(profile, budget, integer, bounds, layers):
    """``(layers, k_bits, v_bits)``: the budget shared by `layers` (None: ``compressed_layers``),
    as the cache's planner does; rows of the other layers are 0."""
    layers = profile.compressed_layers if layers is None else sorted({int(i) for i in layers})
    if not layers:  # every layer has a sliding window (Mistral 7B v0.1): the cache compresses none
        head_budgets.ratequant_bits(profile, budget, integer=integer, bounds=bounds)  # still check the arguments
        zeros = torch.zeros(profile.num_layers, profile.num_kv_heads, dtype=torch.long if integer else torch.float64, device="cpu")
        return layers, zeros, zeros
    kb, vb = head_budgets.on_layers(lambda p: head_budgets.ratequant_bits(p, budget, integer=integer, bounds=bounds), profile, layers)
    return layers, kb, vb


def _rdkv_bits(profile, budget: float, layers) -> torch.Tensor | None:
    """``[layers, kv_heads]`` budgets ``rdkv+profile`` gives each head (K and V together) at
    `budget` from the RDKV curves, the default head floor included; None without curves or
    when `budget` is outside their range."""
    if not profile.has_rd_curves or not layers:
        return None
    try:
        planner = ProfilePlanner(RDKVConfig(budget=budget, mode=ProfilePlanner.name), profile, layers)
    except ValueError:
        return None
    return (planner.k_bits + planner.v_bits) / 2


def _shared_by(profile, layers) -> str:
    if not layers:
        return f"none of the {profile.num_layers} layers"
    if len(layers) == profile.num_layers:
        return f"all {profile.num_layers} layers"
    return f"layers {', '.join(map(str, layers))} of {profile.num_layers}"


def show(profile, budget: float = DEFAULT_BUDGET, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> str:
    """A readable table: per layer and KV head, RateQuant's K and V bits at `budget`, beta, R^2,
    sensitivity, and (profiles with RDKV curves) the head budget ``rdkv+profile`` uses.

    `layers`: the layers sharing the budget (default ``compressed_layers``, as the cache); the
    others get one line, without bits.
    """
    default = layers is None
    layers, kb, vb = _layer_bits(profile, budget, integer, bounds, layers)
    rd = _rdkv_bits(profile, budget, layers)
    lo, hi = bounds or default_bounds(budget)
    fmt = "{:d}" if integer else "{:.2f}"
    fp = profile.fingerprint
    lines = [
        f"RDKV profile {profile.name_or_path or ''} ({fp['architecture']}, {profile.num_layers} layers x "
        f"{profile.num_kv_heads} KV heads, head_dim {fp['head_dim']}, weights {fp['weights_sha256']})".replace("  ", " "),
        f"budget {budget} bits ({'greedy' if integer else 'closed form'}, bounds [{lo}, {hi}]) shared by "
        f"{_shared_by(profile, layers)}: mean K {kb[layers].double().mean():.3f}, mean V {vb[layers].double().mean():.3f}"
        if layers else f"budget {budget} bits: no layer is compressed",
        f"{'layer':>5} {'head':>4} {'K bits':>6} {'V bits':>6} {'beta_K':>7} {'beta_V':>7} {'R2_K':>6} {'R2_V':>6} {'sens_K':>9} {'sens_V':>9}"
        + (f" {'RDKV':>6}" if rd is not None else ""),
    ]
    why = "not compressed (sliding window)" if default else "not compressed (not in `layers`)"
    for layer in range(profile.num_layers):
        if layer not in layers:
            lines.append(f"{layer:>5} {'-':>4} {why}")
            continue
        for h in range(profile.num_kv_heads):
            i = (layer, h)
            lines.append(
                f"{layer:>5} {h:>4} {fmt.format(kb[i].item()):>6} {fmt.format(vb[i].item()):>6} "
                f"{profile.beta_k[i]:>7.3f} {profile.beta_v[i]:>7.3f} {profile.r2_k[i]:>6.3f} {profile.r2_v[i]:>6.3f} "
                f"{profile.sens_k[i]:>9.3g} {profile.sens_v[i]:>9.3g}" + (f" {rd[i].item():>6.2f}" if rd is not None else "")
            )
    if rd is not None:
        lines.append(f"RDKV: the budget `rdkv+profile` gives each head (K and V together) at {budget} bits, from the RDKV curves")
    return "\n".join(lines)


def plot(profile, budget: float, path, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> Path:
    """Save a PNG heat map (layers x KV heads) of the K and V bits at `budget`, side by side.

    `layers`: as in :meth:`show`; the other layers are grey.
    """
    try:
        # A bare Figure renders with Agg and leaves pyplot's global backend alone.
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("RDKVProfile.plot needs matplotlib: `pip install matplotlib`") from err
    import numpy as np

    layers, kb, vb = _layer_bits(profile, budget, integer, bounds, layers)
    lo, hi = bounds or default_bounds(budget)
    off = np.array([layer not in layers for layer in range(profile.num_layers)])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
    fig = Figure(figsize=(3.5 + 1.2 * profile.num_kv_heads, 2.0 + 0.25 * profile.num_layers), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, bits, title in zip(axes[0], (kb, vb), ("K bits", "V bits")):
        grid = np.ma.masked_array(bits.double().numpy(), mask=np.repeat(off[:, None], profile.num_kv_heads, 1))
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{title}, mean {bits[layers].double().mean():.2f}", fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(profile.num_kv_heads))
        if len(layers) * profile.num_kv_heads <= 400:
            for layer in layers:
                for h in range(profile.num_kv_heads):
                    b = bits[layer, h].item()
                    color = "w" if b < (lo + hi) / 2 else "k"
                    ax.text(h, layer, f"{b:g}" if integer else f"{b:.1f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=axes[0].tolist(), label="bits")
    title = f"{profile.fingerprint['architecture']}: RateQuant widths at {budget} bits"
    if off.any():
        title += f"\nshared by {_shared_by(profile, layers)}; grey: not compressed"
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
    return path


def model_card(profile, repo_id: str) -> str:
    """The README.md of a saved profile: front matter, what it is, how to use it, a fit table."""
    fp, cal = profile.fingerprint, profile.calibration
    base = cal.get("model_id")
    front = ["---", "library_name: rdkv_hf", "tags:", "- rdkv_hf", "- kv-cache", "- kv-cache-quantization", "- ratequant", "- rdkv"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    layers, kb, vb = _layer_bits(profile, DEFAULT_BUDGET, True, None, None)
    ek, ev = profile.eps_tables()
    r2 = torch.cat([profile.r2_k.flatten(), profile.r2_v.flatten()])
    rows = []
    for layer in range(profile.num_layers):
        bits = (" ".join(str(int(b)) for b in t[layer]) if layer in layers else "-" for t in (kb, vb))
        rows.append(
            f"| {layer} | {profile.beta_k[layer].mean():.2f} | {profile.beta_v[layer].mean():.2f} "
            f"| {profile.r2_k[layer].min():.3f} | {profile.r2_v[layer].min():.3f} "
            f"| {_fmt(profile.sens_k[layer].mean().item())} | {_fmt(profile.sens_v[layer].mean().item())} "
            f"| {' | '.join(bits)} |"
        )
    rd = _rdkv_bits(profile, DEFAULT_BUDGET, layers)
    rd_text = ("" if rd is None else " It also holds RDKV curves: per head, the attention-output error of RDKV's\n"
               "own compression (eviction and quantization) at 0.25 to 8 bits and the loss gradient at those outputs,\n"
               "from which `rdkv+profile` sets each head's budget.")
    if rd is not None:
        rows = [row + f" {' '.join(f'{b:.1f}' for b in rd[i].tolist()) if i in layers else '-'} |" for i, row in enumerate(rows)]
    rd_col, rd_sep, rd_col_text = ("", "", "") if rd is None else (
        f" RDKV bits @{DEFAULT_BUDGET:g} |", "---|",
        f", and RDKV bits the\nbudget of each head (K and V together) in `rdkv+profile` at {DEFAULT_BUDGET:g} bits")
    rd_cal = ""
    if rd is not None and "rd_seqs" in cal:
        stride = cal["rd_query_stride"]
        rd_cal = (f"\nRDKV curves: the first {cal['rd_seqs']} sequences, the first {cal['rd_prompt']:.0%} of each compressed, "
                  f"{'every one' if stride == 1 else f'one in {stride}'} of the other queries measured.")
    compressed = ""
    if not layers:
        compressed = "\nEvery layer has a sliding window: the cache keeps them all uncompressed.\n"
    elif len(layers) < profile.num_layers:
        compressed = (
            f"\nThe cache compresses layers {', '.join(map(str, layers))} only ({len(layers)} of {profile.num_layers}, "
            "full attention) and shares\nthe budget among them; the other layers keep the model's sliding-window cache, uncompressed.\n"
        )
    body = f"""
# RDKV profile: {base or fp['architecture']}

A measured profile for `rdkv_hf` KV-cache compression of
`{fp['architecture']}` ({fp['num_layers']} layers x {fp['num_kv_heads']} KV heads, head_dim {fp['head_dim']},
K/V weights sha256 `{fp['weights_sha256']}`). It holds per KV head RateQuant sensitivities
(mean squared loss gradient at K and V) and distortion fits `D(b) = alpha * beta^-b` of the
`{profile.quantizer.get('name')}` quantizer (K per {profile.quantizer.get('k_axis')}, V per {profile.quantizer.get('v_axis')}),
and RDKV epsilon tables per layer.{rd_text}{' Weights: ' + cal['weights'] + '.' if cal.get('weights') else ''}
{compressed}
## Usage

```python
import rdkv_hf

model = rdkv_hf.patch(model, budget={DEFAULT_BUDGET:g}, profile="{repo_id}")
```

## Calibration

{cal.get('n_seqs')} sequences x {cal.get('seq_len')} tokens of {cal.get('source')}, seed {cal.get('seed')},
fits over widths {cal.get('widths')} ({cal.get('seconds')} s, mean loss {_fmt(float(cal.get('loss', float('nan'))))}).{rd_cal}
R^2 of the fits: {r2.min():.3f} to {r2.max():.3f}; beta_K {profile.beta_k.min():.2f} to {profile.beta_k.max():.2f},
beta_V {profile.beta_v.min():.2f} to {profile.beta_v.max():.2f}.

Global epsilon tables (relative distortion at 2, 4, 8 bits):
eps_K = {ek[2]:.4g}, {ek[4]:.4g}, {ek[8]:.3g}; eps_V = {ev[2]:.4g}, {ev[4]:.4g}, {ev[8]:.3g}.

## Fits per layer

Means over the KV heads of a layer (R^2: the worst head); the bits are the greedy RateQuant widths
per head at a mean of {DEFAULT_BUDGET:g} code bits over the compressed layers ("-": not compressed){rd_col_text}.

| layer | beta_K | beta_V | R^2 K | R^2 V | sens K | sens V | K bits @{DEFAULT_BUDGET:g} | V bits @{DEFAULT_BUDGET:g} |{rd_col}
|---|---|---|---|---|---|---|---|---|{rd_sep}
""" + "\n".join(rows) + "\n"
    return "\n".join(front) + "\n" + body


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"
