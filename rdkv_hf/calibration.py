"""Measure an :class:`~rdkv_hf.RDKVProfile` for a model: sensitivities and distortion fits.

One forward and one backward per batch of calibration sequences give everything:

- **Sensitivity** (RateQuant §3.2): ``w[l, h] = mean over sequences and positions of
  ||dL/dK[l, h, t]||^2`` (and the same for V), ``L`` the mean next-token cross-entropy of one
  sequence. The gradients are taken at the K and V that attention reads, i.e. the tensors returned by
  the cache's ``update`` (post-RoPE K, and post-``k_norm`` for Qwen3). For Llama and Mistral this
  equals the gradient norm at the ``k_proj`` / ``v_proj`` outputs, because RoPE is a rotation.
- **Distortion curves** (RateQuant §3.4): the relative MSE ``D(b) = sum (x - Q_b(x))^2 / sum x^2``
  of the min-max fake quantizer of :mod:`rdkv_hf.quant` at each width (K per channel over the tokens
  of one sequence, V per token), per (layer, KV head), fitted as ``ln D = ln alpha - b ln beta``.
  Relative MSE makes ``alpha`` unit-free; the profile keeps the mean square of each head
  (``power_k``, ``power_v``) so that the allocation can weigh absolute errors (``alpha * power``).
- **RDKV distortion curves** (eviction-aware, for ``rdkv+profile``): each sequence's first
  ``RD_PROMPT`` share of tokens is compressed by RDKV itself (the default :class:`RDKVConfig` at each
  budget of ``RD_BUDGETS``, equal head budgets, quantized as the cache quantizes) and the attention
  outputs of every ``RD_QUERY_STRIDE``-th remaining query are compared with the exact ones: ``rd_dist[l, h, j]`` is the
  mean squared error of the outputs of KV head ``h``'s query group at budget ``RD_BUDGETS[j]``, and
  ``sens_o[l, h]`` the mean squared gradient of the loss at those outputs. ``sens_o * rd_dist`` is
  the loss increase the allocation across heads minimizes (quantization-only curves ignore that
  RDKV evicts inside each head). Only the layers a cache compresses are measured, on the first
  ``RD_SEQS`` sequences. The curves vary more between sequences than between the queries of one,
  hence many sequences and a query stride (``benchmarks/results/knobs.md``).
- **RDKV epsilon tables** (RDKV App. B) at widths 2, 4, 8 per layer: ``eps_V = sum (V - V^)^2 /
  sum V^2`` (per-token quantization) and ``eps_K`` = mean over channels of the per-channel MSE over
  the per-channel variance (per-channel quantization).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .compat import cache_kwargs
from .overrides import AttentionOverride
from .quant import minmax, step_size
from .state import patch_state

if TYPE_CHECKING:
    from .profile import RDKVProfile

logger = logging.getLogger(__name__)

EPS_WIDTHS = (2, 4, 8)
RD_BUDGETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # bits per element of the RDKV curves
RD_PROMPT = 0.75  # share of each calibration sequence compressed for them; the rest are the queries
RD_QUERY_STRIDE = 2  # every other one of those queries is measured
RD_SEQS = 8  # on the first sequences only


def calibrate(
    model: nn.Module,
    texts: torch.Tensor | Sequence[str] | None = None,
    *,
    tokenizer=None,
    n_seqs: int = 16,
    seq_len: int = 512,
    widths: Iterable[int] = range(2, 7),
    seed: int = 0,
    batch_size: int = 4,
    model_id: str | None = None,
    progress: bool = True,
) -> RDKVProfile:
    """Calibrate `model` and return its :class:`~rdkv_hf.RDKVProfile`.

    Every layer is measured; the profile's ``compressed_layers`` records the full-attention layers,
    the ones a cache compresses (all of them unless the model has sliding-window layers).

    Args:
        model: a Transformers causal LM (Llama, Qwen3, Mistral, ...), float32 preferred; it is not
            modified (parameters get ``requires_grad=False`` for the run and are restored).
        texts: the calibration data: ``None`` (`n_seqs` random windows of `seq_len` tokens of the
            shipped "calib" text, needs `tokenizer`), a ``[n, T]`` LongTensor of token ids (used as
            is), or a list of strings (tokenized with `tokenizer`, joined, and cut into `n_seqs`
            random non-overlapping windows of `seq_len` tokens).
        tokenizer: the model's tokenizer, for ``texts=None`` or strings.
        widths: integer widths (at least 2 distinct, 1..8) of the distortion fits.
        seed: picks the windows.
        batch_size: sequences per forward/backward.
        model_id: Hub id of the model, recorded in the profile's model card.
        progress: show a tqdm bar.
    """
    from .fingerprint import fingerprint, weight_norms
    from .model_patches import check_profiles, compressed_layers
    from .profile import RDKVProfile

    for name, value, least in (("n_seqs", n_seqs, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"calibrate() takes a Transformers model, got {type(model).__name__}")
    widths = sorted({int(b) for b in widths})
    if len(widths) < 2 or not all(1 <= b <= 8 for b in widths):
        raise ValueError(f"`widths` must hold at least 2 distinct integers in 1..8, got {widths}")
    if patch_state(model) is not None:
        raise ValueError("`model` is patched by rdkv_hf; calibrate the original model (call rdkv_hf.unpatch(model) first)")
    check_profiles(model)
    ids, source = _calibration_ids(texts, tokenizer, n_seqs, seq_len, seed)
    fp = fingerprint(model)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        logger.warning("calibrating a %s model; float32 gives more accurate gradients and fits", dtype)

    start = time.perf_counter()
    stats = _Stats(fp["num_layers"], fp["num_kv_heads"], widths, rd_layers=compressed_layers(model))
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        from tqdm.auto import tqdm

        batches = list(ids.split(batch_size))
        for batch in tqdm(batches, desc="rdkv_hf calibrate", unit="batch", disable=not progress):
            _run_batch(model, batch, stats)
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info("calibrated %d x %d tokens in %.1f s", ids.shape[0], ids.shape[1], seconds)

    fits = stats.fits()
    calibration = {
        "n_seqs": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "source": source,
        "seed": seed,
        "widths": widths,
        "eps_widths": list(EPS_WIDTHS),
        "rd_seqs": min(RD_SEQS, int(ids.shape[0])),
        "rd_prompt": RD_PROMPT,
        "rd_query_stride": RD_QUERY_STRIDE,
        "loss": stats.loss / stats.n_seqs,
        "seconds": round(seconds, 2),
        "model_id": model_id,
        "dtype": str(dtype).replace("torch.", ""),
    }
    return RDKVProfile(
        fingerprint=fp,
        quantizer=dict(RDKVProfile.DEFAULT_QUANTIZER),
        calibration=calibration,
        weight_norms=weight_norms(model),
        compressed_layers=list(compressed_layers(model)),  # Gemma 3: the full-attention layers only
        **fits,
    )


def _calibration_ids(texts, tokenizer, n_seqs: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """``([n, T] token ids, description of the source)``."""
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.dtype != torch.long or texts.shape[1] < 2 or texts.shape[0] < 1:
            raise ValueError(f"token ids must be a [n_seqs, seq_len] LongTensor with seq_len >= 2, got {texts.dtype} {tuple(texts.shape)}")
        return texts, "input_ids"
    if n_seqs < 1 or seq_len < 2:
        raise ValueError(f"`n_seqs` must be >= 1 and `seq_len` >= 2, got {n_seqs} and {seq_len}")
    if tokenizer is None:
        raise ValueError("pass `tokenizer=` (the model's tokenizer) to calibrate on text, or token ids as `texts` ([n, T] LongTensor)")
    if texts is None:
        from .text import token_chunks

        return token_chunks(tokenizer, n_seqs, seq_len, split="calib", seed=seed), "rdkv_hf.text:calib (King James Bible)"
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("`texts` must be None, a [n, T] LongTensor of token ids or a list of strings")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long, device="cpu")
    slack = len(ids) - n_seqs * seq_len
    if slack < 0:
        raise ValueError(
            f"the texts hold {len(ids)} tokens, fewer than n_seqs x seq_len = {n_seqs} x {seq_len}; "
            "give more text or lower `n_seqs` / `seq_len`"
        )
    from .text import random_chunks

    return random_chunks(ids, n_seqs, seq_len, seed), f"texts ({len(texts)} strings)"


class _Stats:
    """Running sums over the calibration batches, all per (layer, KV head) unless noted.

    They live on the CPU in float64 (bookkeeping: a few numbers per head); each batch's sums are
    reduced on the model's device first."""

    def __init__(self, layers: int, heads: int, widths: list[int], rd_layers=()):
        self.widths = widths
        self.rd_layers = tuple(rd_layers)
        self.all_widths = sorted(set(widths) | set(EPS_WIDTHS))
        W, E = len(self.all_widths), len(EPS_WIDTHS)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device="cpu")  # noqa: E731
        self.grad_k, self.grad_v = z(layers, heads), z(layers, heads)  # sum over tokens of ||g||^2
        self.sq_k, self.sq_v = z(layers, heads), z(layers, heads)  # sum of x^2
        self.sse_k, self.sse_v = z(layers, heads, W), z(layers, heads, W)  # sum of squared errors
        self.eps_k_sum = z(layers, E)  # sum over channels of MSE_c / var_c
        self.channels = z(layers)
        self.tokens = 0  # token positions seen (sequences x length)
        self.elements = 0  # elements of one head's K (or V): tokens x head_dim
        self.n_seqs = 0
        self.loss = 0.0
        self.rd_sse = z(layers, heads, len(RD_BUDGETS))  # sum of squared attention-output errors
        self.grad_o = z(layers, heads)  # sum of squared output gradients, same positions
        self.rd_count = z(layers)  # output elements of one head's query group summed over

    def add(self, layer: int, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor):
        """k, v, gk, gv: ``[batch, kv_heads, tokens, head_dim]`` float32."""
        dims = (0, 2, 3)
        # float32 sums per head (pairwise summation) are accurate to ~1e-6; float64 accumulates them.
        cpu = lambda t: t.to("cpu", torch.float64)  # noqa: E731
        self.grad_k[layer] += cpu(gk.square().sum(dims))
        self.grad_v[layer] += cpu(gv.square().sum(dims))
        self.sq_k[layer] += cpu(k.square().sum(dims))
        self.sq_v[layer] += cpu(v.square().sum(dims))
        var_c = k.var(dim=2, unbiased=False)  # [B, H, D]
        floor = var_c.mean().clamp(min=1e-30) * 1e-12
        err_k = quant_errors(k, self.all_widths, dim=2)  # K: one (scale, min) per channel
        err_v = quant_errors(v, self.all_widths, dim=-1)  # V: one (scale, min) per token
        for j, b in enumerate(self.all_widths):
            self.sse_k[layer, :, j] += cpu(err_k[j].sum(dims))
            self.sse_v[layer, :, j] += cpu(err_v[j].sum(dims))
            if b in EPS_WIDTHS:
                ratio = err_k[j].mean(2) / var_c.clamp(min=floor)  # [B, H, D]
                self.eps_k_sum[layer, EPS_WIDTHS.index(b)] += cpu(ratio.sum(dtype=torch.float64))
        self.channels[layer] += var_c.numel()

    def fits(self) -> dict:
        """The profile's tensors: sensitivities, fits, powers, curves and epsilon tables."""
        cols = [self.all_widths.index(b) for b in self.widths]
        eps_cols = [self.all_widths.index(b) for b in EPS_WIDTHS]
        out = {"sens_k": self.grad_k / self.tokens, "sens_v": self.grad_v / self.tokens}
        for kind, sse, sq in (("k", self.sse_k, self.sq_k), ("v", self.sse_v, self.sq_v)):
            dist = sse[..., cols] / sq.clamp(min=1e-300)[..., None]  # [L, H, W] relative MSE
            alpha, beta, r2 = fit_exponential(dist, self.widths)
            out.update({f"alpha_{kind}": alpha, f"beta_{kind}": beta, f"r2_{kind}": r2, f"dist_{kind}": dist})
            out[f"power_{kind}"] = sq / self.elements
        eps_v = self.sse_v[..., eps_cols].sum(1) / self.sq_v.sum(1).clamp(min=1e-300)[:, None]
        eps_k = self.eps_k_sum / self.channels.clamp(min=1)[:, None]
        out.update(eps_k=eps_k, eps_v=eps_v, eps_k_global=eps_k.mean(0), eps_v_global=eps_v.mean(0))
        count = self.rd_count.clamp(min=1)[:, None]
        out.update(rd_budgets=torch.tensor(RD_BUDGETS, dtype=torch.float64, device="cpu"), rd_dist=self.rd_sse / count[..., None],
                   sens_o=self.grad_o / count)
        return {name: t.float() for name, t in out.items()}


def quant_errors(x: torch.Tensor, widths, dim: int):
    """Squared errors of :func:`rdkv_hf.quant.fake_quantize` of `x` at each width, sharing the work.

    Same arithmetic as :func:`rdkv_hf.quant.quantize` (float16-rounded minimum and scale, through
    :func:`_dequant`), but the minimum and maximum are computed once for all widths.

    Returns:
        a list of ``(x - fake_quantize(x, b, dim))**2`` tensors shaped like `x`, one per width.
    """
    lo, hi = minmax(x, dim)
    out = []
    for b in widths:
        levels = (1 << b) - 1
        out.append(_dequant(x, lo.float(), step_size(lo, hi, levels).float(), levels).sub_(x).square_())
    return out


def fit_exponential(dist: torch.Tensor, widths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares fit of ``ln D = ln alpha - b ln beta`` along the last dim.

    Args:
        dist: ``[..., W]`` distortions (> 0) at `widths` (``W >= 2`` values).
    Returns:
        ``(alpha, beta, r2)``, each ``[...]``; ``r2`` is the R^2 of the fit in log space (1 when
        the points are collinear, including the degenerate case of no spread).
    """
    b = torch.as_tensor(list(widths), dtype=torch.float64, device=dist.device)
    y = dist.double().clamp(min=1e-300).log()
    bc = b - b.mean()
    yc = y - y.mean(-1, keepdim=True)
    slope = (yc * bc).sum(-1) / bc.square().sum()
    intercept = y.mean(-1) - slope * b.mean()
    resid = y - (intercept[..., None] + slope[..., None] * b)
    ss_tot = yc.square().sum(-1)
    r2 = torch.where(ss_tot > 0, 1 - resid.square().sum(-1) / ss_tot.clamp(min=1e-300), torch.ones_like(ss_tot))
    return intercept.exp(), (-slope).exp(), r2


def _run_batch(model, ids: torch.Tensor, stats: _Stats) -> None:
    """One forward and backward over ``ids [batch, tokens]``; adds to `stats`."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def capture(key_states, value_states, layer_idx, *args, **kwargs):
        # What attention reads is what gets quantized: keep those tensors and their gradients.
        k, v = update(key_states, value_states, layer_idx, *args, **kwargs)
        k.retain_grad()
        v.retain_grad()
        seen[layer_idx] = (k, v)
        return k, v

    cache.update = capture  # this cache object only
    device = next(model.parameters()).device
    ids = ids.to(device)
    # The parameters do not need gradients; the activations do, from the embeddings on.
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    B, T = ids.shape
    n = max(0, min(B, RD_SEQS - stats.n_seqs))  # rows of this batch among the first RD_SEQS sequences
    attn: dict[int, tuple] = {}  # layer -> (queries, attention output, scaling) for the RDKV curves
    with _capturing_attention(model, attn, stats.rd_layers if n else ()):
        out = model(inputs_embeds=embeds, **cache_kwargs(cache), use_cache=True)
    # Sum over sequences of each sequence's mean next-token loss: per-sequence gradients. The last
    # position predicts nothing (-100); flattening the whole logits tensor avoids a copy.
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    token_loss = F.cross_entropy(out.logits.reshape(B * T, -1).float(), targets.reshape(-1), reduction="none")
    loss = token_loss.view(B, T).sum(1).div(T - 1).sum()
    del out, token_loss
    loss.backward()
    if len(seen) != stats.grad_k.shape[0]:
        raise RuntimeError(f"expected K/V of {stats.grad_k.shape[0]} layers from the cache, saw {sorted(seen)}")
    for layer, (k, v) in seen.items():
        if k.grad is None or v.grad is None:
            raise RuntimeError(f"no gradient reached the K/V of layer {layer}")
        if k.shape[1] != stats.grad_k.shape[1]:
            raise RuntimeError(f"layer {layer} has {k.shape[1]} KV heads, the config says {stats.grad_k.shape[1]}")
        stats.add(layer, k.detach().float(), v.detach().float(), k.grad.float(), v.grad.float())
    for layer in stats.rd_layers if n else ():
        q, o, scaling, softcap, sinks = attn[layer]
        if o.grad is None:
            raise RuntimeError(f"no gradient reached the attention output of layer {layer}")
        k, v = seen[layer]
        _add_rd_curves(stats, layer, q[:n], k[:n].detach().float(), v[:n].detach().float(), o[:n].detach().float(),
                       o.grad[:n].float(), scaling, softcap, sinks)
    stats.tokens += B * T
    stats.elements += B * T * seen[0][0].shape[-1]
    stats.n_seqs += B
    stats.loss += loss.item()


# What the capturing attention keeps during one calibration forward: (store, wanted layers), per context.
_capture: contextvars.ContextVar[tuple[dict, set] | None] = contextvars.ContextVar("rdkv_calibration_capture", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa (the model's own eager where it soft-caps or has sinks, which sdpa lacks), keeping for
    the wanted layers the post-RoPE queries and the attention output (its gradient retained):
    ``store[layer] = (query, output, scaling, softcap, sinks)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is None and sinks is None:
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the modeling file's: it serves both
        out, weights = eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    capture = _capture.get()
    if capture is not None and module.layer_idx in capture[1]:
        if out.requires_grad:
            out.retain_grad()
        capture[0][module.layer_idx] = (query.detach().float(), out, scaling if scaling is not None else query.shape[-1] ** -0.5,
                                        softcap, None if sinks is None else sinks.detach().float())
    return out, weights


_CAPTURE_ATTENTION = AttentionOverride("rdkv_calibrate_capture", _capture_attention)


@contextlib.contextmanager
def _capturing_attention(model, store: dict, layers):
    """Run the model's attention through sdpa, keeping for `layers` the post-RoPE queries and the
    attention output (with its gradient retained): ``store[layer] = (query, output, scaling)``."""
    token = _capture.set((store, set(layers)))
    try:
        with _CAPTURE_ATTENTION(model):
            yield store
    finally:
        _capture.reset(token)


@torch.no_grad()
def _add_rd_curves(stats: _Stats, layer: int, q, k, v, o, go, scaling: float, softcap=None, sinks=None) -> None:
    """Compress the first ``RD_PROMPT`` of the tokens as the cache would at each of ``RD_BUDGETS``
    and add the output errors of the later queries (and their output gradients) to `stats`.

    The cache's own steps do the work: RDKV's token and channel weights and allocation (equal head
    budgets, as mode ``"rdkv"``), :func:`~rdkv_hf.storage.pack_segment` and
    :func:`~rdkv_hf.attention.attend` over the packed prompt and the uncompressed rest, all budgets
    in one batch of ``len(RD_BUDGETS) * B`` rows.

    q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, T, D]``; o, go: ``[B, T, Hq, D]`` output and its gradient;
    softcap, sinks: the layer's logit cap and ``[Hq]`` sink logits (None: none).
    """
    from .allocate import allocate_rdkv
    from .attention import attend
    from .config import RDKVConfig
    from .scoring import prompt_weights
    from .storage import Segment, pack_segment

    B, Hq, T, D = q.shape
    H = k.shape[1]
    P = int(T * RD_PROMPT)
    if P < 1 or P >= T:
        raise ValueError(f"calibration sequences of {T} tokens are too short for the RDKV curves; raise `seq_len`")
    g = Hq // H
    rows = torch.arange(P, T, RD_QUERY_STRIDE, device=q.device)  # the queries measured
    C, Cq = T - P, len(rows)
    exact = o[:, rows].transpose(1, 2)  # [B, Hq, Cq, D]
    stats.grad_o[layer] += go[:, rows].square().reshape(B, Cq, H, g, D).sum((0, 1, 3, 4)).to("cpu", torch.float64)
    stats.rd_count[layer] += B * Cq * g * D
    cfg0 = RDKVConfig()
    w_tok, w_ch, real = prompt_weights(q[:, :, :P], k[:, :, :P], None, scaling, P, cfg0, softcap=softcap, sinks=sinks)
    # All budgets at once: R = len(RD_BUDGETS) copies of the (batch, head) rows, each with its budget.
    R = len(RD_BUDGETS)
    bits = torch.tensor(RD_BUDGETS, dtype=torch.float64, device=q.device).repeat_interleave(B * H)
    real_rows = real[:, None, :].expand(B, H, P).reshape(B * H, P).repeat(R, 1)
    k_avg, v_avg = cfg0.split_kv(bits * real_rows.sum(1).double() * D)
    v_bits, k_bits = allocate_rdkv(
        w_tok.reshape(B * H, P).repeat(R, 1), w_ch.reshape(B * H, D).repeat(R, 1), real_rows,
        v_avg, k_avg, cfg0.widths, cfg0.eps_v, cfg0.eps_k,
    )
    rep = lambda x: x.repeat(R, 1, 1, 1)  # noqa: E731  [B, ...] -> [R * B, ...], budget-major
    heads, buffers = pack_segment(rep(k[:, :, :P]).reshape(R * B * H, P, D), rep(v[:, :, :P]).reshape(R * B * H, P, D),
                                  v_bits, k_bits, cfg0.keep_dtype(torch.float32))
    segment = Segment(heads, R * B, H, real.sum(1).repeat(R).cpu(), buffers)
    # Each measured query sees the packed prompt and the rest of the sequence up to itself.
    causal = torch.arange(C, device=q.device)[None, :] <= (rows - P)[:, None]  # [Cq, C]
    out, _ = attend(rep(q[:, :, rows]), [segment], rep(k[:, :, P:]), rep(v[:, :, P:]),
                    causal.expand(R * B, 1, Cq, C), scaling, backend="auto", softcap=softcap, sinks=sinks)
    err = (out.float().reshape(R, B, H, g, Cq, D) - exact.reshape(1, B, H, g, Cq, D)).square().sum((1, 3, 4, 5))  # [R, H]
    stats.rd_sse[layer] += err.T.to("cpu", torch.float64)


def _dequant(x, lo, scale, levels):
    """Min-max fake quantization of `x` with float32 minimum `lo`, `scale` and `levels` (broadcast)."""
    q = torch.round((x - lo) / scale).clamp_(min=0)
    return torch.minimum(q, torch.as_tensor(levels, dtype=q.dtype, device=q.device)) * scale + lo
