"""The methods `rdkv-hf eval` compares, and how each one's cache is filled from one shared prompt forward.

* :func:`methods`: the methods (the full cache, Transformers' QuantizedCache with quanto, and one per
  mode of :mod:`rdkv_hf.planners`: RDKV and its profile modes, uniform KIVI-style widths, the
  eviction baselines); :func:`parse_method` reads ``"name"`` or ``"name:key=value:key=value"``.
* :func:`prefill`: one full-precision forward of the prompt that keeps every layer's post-RoPE K/V
  and last queries (:class:`Prefill`).
* :func:`build_cache`: a method's cache after that prompt, compressed exactly as its attention
  would have compressed it (RDKV and the baselines compress each layer right after the layer's
  full-precision prompt attention; ``QuantizedCache`` attends the prompt unquantized).
* :func:`cache_nbytes`: the bytes a cache holds, measured from its stored tensors
  (:func:`rdkv_hf.cache.layer_nbytes` per layer); :func:`compressed_layers` says which layers RDKV
  and the baselines compress (a sliding-window layer keeps Transformers' bounded cache in every
  method).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass

import torch

from ..attention import compress_layer
from ..cache import RDKVCache, RDKVLayer, layer_nbytes
from ..config import RDKVConfig
from ..model_patches import compressed_layers
from ..overrides import AttentionOverride
from ..planners import Planner, make_planner, modes

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    """One way of caching the prompt.

    ``kind`` says how the cache is built: ``"full"`` (DynamicCache), ``"rdkv"`` (RDKVCache in
    RDKVConfig mode ``mode``), ``"eviction"`` (RDKVCache with a baseline planner) or ``"quanto"``
    (Transformers' QuantizedCache). ``budgeted`` methods are swept over the budgets; the others have
    one fixed setting (``width`` bits for uniform and quanto).
    """

    name: str
    label: str
    kind: str
    budgeted: bool
    mode: str | None = None
    width: int | None = None
    needs_profile: bool = False
    options: tuple = ()  # sorted (key, value) pairs from "name:key=value:key=value"

    @property
    def spec(self) -> str:
        """The name with its options, as given on the command line (the key in results)."""
        return ":".join([self.name] + [f"{k}={_format_value(v)}" for k, v in self.options])

    @property
    def display(self) -> str:
        """The label with its options, for tables and plots."""
        if not self.options:
            return self.label
        return self.label + " [" + ", ".join(f"{k}={_format_value(v)}" for k, v in self.options) + "]"


@functools.cache
def methods() -> dict[str, Method]:
    """Every method by name: the full cache, Transformers' QuantizedCache at 2 and 4 bits, and each
    mode of :mod:`rdkv_hf.planners` (a mode with ``fixed_widths`` gives one unbudgeted method per
    width, ``uniform-2`` and ``uniform-4``), in the order of the tables."""
    found = [(0, Method("full", "full cache", "full", budgeted=False))]
    found += [(50, Method(f"quanto-{w}", f"HF QuantizedCache quanto-{w}", "quanto", budgeted=False, width=w)) for w in (2, 4)]
    for name, cls in modes().items():
        kind = "eviction" if cls.evicts_only else "rdkv"
        if cls.fixed_widths:
            found += [(cls.rank, Method(f"{name}-{w}", f"{cls.label} KIVI-{w}", kind, budgeted=False, mode=name, width=w))
                      for w in cls.fixed_widths]
        else:
            found.append((cls.rank, Method(name, cls.label, kind, budgeted=True, mode=name, needs_profile=cls.needs_profile)))
    return {m.name: m for _, m in sorted(found, key=lambda rm: rm[0])}


# Options a method spec may carry ("rdkv:window=64:pool_kernel=7"), by kind. RDKV kinds take
# RDKVConfig knobs (`head_floor` for rdkv+profile only, e.g. "rdkv+profile:head_floor=0" for the
# profile's allocation as is) plus the evaluation-only variants `sinks` and `recent` (see ProtectedPlanner).
_RDKV_OPTIONS = ("window", "pool_kernel", "pool", "carry", "k_share", "head_floor", "widths", "high_precision_dtype", "backend", "sinks",
                 "recent", "observe")
_OPTIONS = {
    "full": (),
    "rdkv": _RDKV_OPTIONS,
    "eviction": ("window", "high_precision_dtype"),
    "quanto": ("q_group_size", "residual_length", "axis_key", "axis_value"),
}


def _format_value(value) -> str:
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "/" in text:  # widths=0/4/16
        return tuple(int(p) for p in text.split("/"))
    return text


def parse_method(spec: str) -> Method:
    """A :class:`Method` from ``"name"`` or ``"name:key=value:key=value"`` (colons, so that a
    comma-separated list of methods stays unambiguous; tuples as ``widths=0/4/16``).

    Raises:
        ValueError: naming the unknown method or option and listing the valid ones.
    """
    known = methods()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method must be a non-empty string, got {spec!r}; valid methods: {', '.join(known)}")
    name, *items = spec.strip().split(":")
    if name not in known:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(known)}")
    method = known[name]
    options = []
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _OPTIONS[method.kind]:
            valid = ", ".join(_OPTIONS[method.kind]) or "none"
            raise ValueError(f"bad option {item!r} for method {name!r}; give key=value with a key among: {valid}")
        options.append((key, _parse_value(value.strip())))
    return dataclasses.replace(method, options=tuple(sorted(options)))


# ---------------------------------------------------------------------------------------------
# The shared prompt forward


@dataclass
class Prefill:
    """What one full-precision forward of a prompt leaves behind, per layer.

    ``keys`` / ``values``: ``[B, kv_heads, T, D]`` post-RoPE, as the attention received them;
    ``queries``: the last ``window`` post-RoPE queries ``[B, heads, window, D]``; ``logits``: ``[vocab]``
    at the last prompt token; ``bf16_bytes``: what a bf16 DynamicCache of the prompt holds (every
    layer, sliding-window layers at their bounded size); ``global_bf16_bytes``: the same for the
    full-attention layers only (``global_layers``), the ones the compressed methods compress.
    """

    keys: list
    values: list
    queries: list
    scalings: list
    logits: torch.Tensor
    tokens: int
    bf16_bytes: int
    seconds: float
    global_layers: tuple = ()
    global_bf16_bytes: int = 0


# During a capture: {"window": n, layer_idx: (query window, key, value, scaling)}, per context.
_captured: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rdkv_eval_capture", default=None)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa, plus a copy of what RDKV's prompt step reads: the last queries, K and V.

    A sliding-window layer's prompt attention (batch 1, no cache) is computed in blocks of
    queries against only the keys their window reaches (:func:`_sliding_prompt_attention`): the
    same attention as sdpa under the sliding mask, without the masked-out products that sdpa
    computes anyway (at 16K tokens and window 512, 16 times fewer).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = _captured.get()
    if captured is not None:
        window = captured["window"]
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        captured[module.layer_idx] = (query[:, :, -window:].clone(), key, value, s)
    sliding = kwargs.get("sliding_window")
    T = query.shape[2]
    if sliding and T > sliding and query.shape[0] == 1 and key.shape[2] == T and not dropout:
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _sliding_prompt_attention(query, key, value, sliding, s), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _sliding_prompt_attention(query, key, value, window: int, scaling: float) -> torch.Tensor:
    """Causal sliding-window attention of a whole prompt: token i attends to tokens
    ``i - window < j <= i`` (Transformers' sliding mask), computed per block of `window` queries
    against the at most ``2 * window - 1`` keys that block can see.

    Args:
        query: ``[1, heads, T, D]``; key, value: ``[1, kv_heads, T, D]`` (GQA groups repeated here).
    Returns:
        ``[1, T, heads, D]``, the layout the attention interface returns.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    T = query.shape[2]
    out = torch.empty_like(query)
    for start in range(0, T, window):
        end, lo = min(T, start + window), max(0, start - window + 1)
        i = torch.arange(start, end, device=query.device)[:, None]
        j = torch.arange(lo, end, device=query.device)[None, :]
        mask = (j <= i) & (j > i - window)
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, lo:end], value[:, :, lo:end], attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


_CAPTURE_ATTENTION = AttentionOverride("rdkv_eval_capture", _capture_attention)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, window: int = 32) -> Prefill:
    """Run the prompt ``input_ids [1, T]`` once in full precision and keep what every method needs."""
    got = {"window": window}
    token = _captured.set(got)
    start = time.perf_counter()
    try:
        with _CAPTURE_ATTENTION(model):
            out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        _captured.reset(token)
    layers = sorted(k for k in got if isinstance(k, int))
    if layers != list(range(model.config.get_text_config(decoder=True).num_hidden_layers)):
        raise RuntimeError(f"the prompt forward reached the attention of layers {layers} only")
    q, k, v, s = zip(*(got[i] for i in layers))
    full = _full_cache(model, k, v)
    bf16 = [layer.keys.numel() * 2 + layer.values.numel() * 2 for layer in full.layers]
    glob = compressed_layers(model)
    return Prefill(list(k), list(v), list(q), list(s), out.logits[0, -1].float(), input_ids.shape[1], sum(bf16),
                   time.perf_counter() - start, glob, sum(bf16[i] for i in glob))


def _full_cache(model, keys, values):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache


# ---------------------------------------------------------------------------------------------
# Building each method's cache from the prefill


class ProtectedPlanner(Planner):
    """Evaluation-only variant of any mode, to measure cheap fixes without changing the defaults:
    the first ``sinks`` / last ``recent`` prompt tokens of every head are kept at 16 bits (their
    weight is raised above every other token's), paid from the same budget."""

    def __init__(self, inner: Planner, sinks: int = 0, recent: int = 0):
        self.inner, self.sinks, self.recent = inner, int(sinks), int(recent)
        self.config, self.profile, self.layers = inner.config, inner.profile, inner.layers

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        if self.sinks or self.recent:
            pos = real.long().cumsum(1)  # 1 for the first real token
            from_end = pos[:, -1:] - pos  # 0 for the last one
            protect = ((pos <= self.sinks) | (from_end < self.recent)) & real
            top = w_tok.amax(-1, keepdim=True).clamp(min=1e-30) * 1e6
            w_tok = torch.where(protect[:, None, :], top, w_tok)
        return self.inner.widths(layer_idx, w_tok, w_ch, real, v_dim)


def uniform_budget(width: int, head_dim: int, tokens: int) -> float:
    """The budget at which ``mode="uniform"`` stores every K and V element at `width` bits: codes
    plus a float16 scale and minimum per V token (over head_dim) and per K channel (over tokens)."""
    return width + 16 / head_dim + 16 / tokens + 1e-9


def build_cache(model, pre: Prefill, method: Method, budget: float | None, profile=None):
    """The cache `method` holds after the prompt of `pre` (continuations stay uncompressed)."""
    opts = dict(method.options)
    if method.kind == "full":
        return _full_cache(model, pre.keys, pre.values)
    if method.kind == "quanto":
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model.config, nbits=method.width, **opts)
        for i, (k, v) in enumerate(zip(pre.keys, pre.values)):
            cache.update(k, v, i)
        return cache
    if method.width is not None:  # a fixed width (uniform KIVI-2): the budget that stores it
        budget = uniform_budget(method.width, pre.keys[0].shape[-1], pre.tokens)
    cache = RDKVCache(model.config, planner=method_planner(method, budget, profile, layers=compressed_layers(model)))
    _fill_rdkv(cache, pre)
    return cache


def method_planner(method: Method, budget: float, profile=None, layers=None) -> Planner:
    """The planner of a method that runs on RDKV's cache (its modes and the eviction baselines);
    raises ``ValueError`` if the budget does not suit it. Follow-ups (a continuation) stay in full
    precision. Only the profile methods get the profile: plain ``rdkv`` keeps RDKVConfig's tables.
    The prompt is packed at its forward (``observe=0``) unless the method sets ``observe``: with the
    library's default (16) an answer shorter than that would read the prompt in full precision, and
    its score would not measure the compression.
    """
    opts = dict(method.options)
    opts.setdefault("observe", 0)
    variant = {k: opts.pop(k) for k in ("sinks", "recent") if k in opts}
    if "head_floor" in opts and method.mode != "rdkv+profile":
        raise ValueError(f"`head_floor` applies to method 'rdkv+profile' only, not {method.name!r}")
    if method.needs_profile and profile is None:
        raise ValueError(f"method {method.name!r} needs a profile; pass `profile=` or drop the method")
    cfg = RDKVConfig(budget=budget, mode=method.mode, compress_followups=False, **opts)
    planner = make_planner(cfg, profile if method.needs_profile else None, layers)
    return ProtectedPlanner(planner, **variant) if variant else planner


def check_cell(method: Method, budget, profile=None, model=None) -> str | None:
    """Why `method` cannot run at `budget` (e.g. RateQuant below its cheapest width), or None.

    With `model`, also why it cannot run on that model (Transformers' QuantizedCache refuses models
    with sliding-window layers, such as Gemma 3)."""
    if method.kind == "quanto" and model is not None:
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if len(compressed_layers(model)) < n_layers:
            return "Transformers' QuantizedCache supports only models whose layers are all full attention"
    if method.kind != "rdkv" or method.width is not None:
        return None
    try:
        method_planner(method, budget, profile)
    except ValueError as err:
        return str(err)
    return None


def _fill_rdkv(cache: RDKVCache, pre: Prefill) -> None:
    """Compress each layer as ``attention.rdkv_attention_forward`` does after the prompt's attention."""
    for i, layer in enumerate(cache.layers):
        k, v = pre.keys[i], pre.values[i]
        layer.update(k, v)
        if not isinstance(layer, RDKVLayer):
            continue
        cfg = layer.config
        if cfg.window > pre.queries[i].shape[2]:
            raise ValueError(f"`window`={cfg.window} exceeds the {pre.queries[i].shape[2]} queries the prefill kept; raise its window")
        compress_layer(layer, pre.queries[i], None, pre.scalings[i])


def cache_nbytes(cache) -> int:
    """Bytes a cache holds, all layers (see :func:`layer_nbytes`)."""
    return sum(layer_nbytes(cache))
