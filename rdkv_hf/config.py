"""RDKVConfig: every knob of the compression, validated on creation.

Measured data (sensitivities, distortion curves, epsilon tables) lives in a profile, never here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

DEFAULT_BUDGET = 2.5  # bits per element, when neither `budget` nor `tokens` is given
# Tokens a compressing forward must pack before it packs any (`min_tokens`): short chats stay whole
# (benchmarks/results/short-prompts.md). Read when an RDKVConfig is made.
DEFAULT_MIN_TOKENS = 512
# Decoded queries a packing forward waits for (`observe`, when None): an answer's first queries say
# what the rest of it reads (benchmarks/results/short-prompts.md). Read when a layer asks.
DEFAULT_OBSERVE = 16
# How much a decoded block's key novelty weighs (`decode_novelty`), in mean token weights per SD.
DEFAULT_NOVELTY = 4.0
BACKENDS = ("auto", "torch", "cpu", "triton")

# RDKV's fallback epsilon tables (relative distortion of one unit at b bits), from the reference code.
# eps(0) = 1 (evicted) and eps(16) = 0 (kept as is) are fixed sentinels.
DEFAULT_EPS_V = {0: 1.0, 2: 0.312, 4: 0.0138, 8: 4.8e-5, 16: 0.0}
DEFAULT_EPS_K = {0: 1.0, 2: 0.277, 4: 0.011, 8: 6.1e-5, 16: 0.0}
DEFAULT_WIDTHS = (0, 2, 4, 8, 16)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_eps(name: str, eps: dict, widths: tuple) -> dict:
    eps = {int(b): float(e) for b, e in eps.items()}
    missing = [b for b in widths if b not in eps]
    if missing:
        raise ValueError(f"`{name}` needs a distortion for every width in {widths}; missing {missing}")
    vals = [eps[b] for b in sorted(widths)]
    if any(e < 0 for e in vals) or any(a < b for a, b in zip(vals, vals[1:])):
        raise ValueError(f"`{name}` must be non-negative and non-increasing in the width, got {eps}")
    return eps


@dataclass(frozen=True)
class RDKVConfig:
    """How the prompt's KV cache is compressed.

    Measured effects of these knobs are in ``benchmarks/results/knobs.md``.

    Args:
        budget: average bits stored per cached prompt K/V element, counting scales, zero points and
            indices; 16 keeps everything. Give either `budget` or `tokens`.
        tokens: RDKV's budget as FP16-equivalent tokens per KV head (``budget = 16 * tokens / T``).
        mode: how the budget is spent, a mode of :mod:`rdkv_hf.planners`: ``"rdkv"`` (token/channel
            widths from attention, equal head budgets), ``"rdkv+profile"`` (head budgets from a
            profile, RDKV inside each head), ``"ratequant"`` (one width per head from a profile, no
            eviction), ``"uniform"`` (one width everywhere, no eviction), or an eviction baseline
            (``"snapkv"``, ``"adakv"``, ``"streamingllm"``).
        profile: a Hub repo id or local directory of an :class:`~rdkv_hf.RDKVProfile` (None: no
            profile, or one given as an object to :func:`rdkv_hf.patch`).
        window: number of last prompt queries whose attention weighs the tokens.
        pool_kernel: pooling kernel over the token weights (odd).
        pool: ``"avg"`` (SnapKV's average pooling) or ``"max"`` (each token gets the largest weight
            within ``pool_kernel // 2`` tokens, so the tokens next to an attended one are kept too).
        carry: after pooling, each token weighs at least ``carry`` times the token before it
            (``w[t] = max(w[t], carry * w[t-1])``), so the tokens after an attended one fade instead
            of dropping: decoding copies a span token by token (a number's digits) while the window
            queries attend mostly to its start. ``0`` turns it off.
        k_share: share of each head's budget spent on K (RDKV's r_K).
        head_floor: ``"rdkv+profile"`` only: every KV head's K and V budget is at least this share
            of `budget`, so that no head is evicted whole on the strength of curves measured on short
            calibration text. ``0`` gives the profile's allocation unchanged.
        widths: allowed widths of V tokens and K channels (0 = evicted, 16 = kept as is).
        eps_v, eps_k: distortion of one V token / K channel at each width, relative to eviction.
        high_precision_dtype: storage of the 16-bit zone; ``None`` keeps the model's dtype when it
            is 16-bit and uses float16 otherwise ("float32" is for exactness tests only: it costs
            twice the nominal 16 bits).
        backend: decode attention path, ``"auto"``, ``"torch"`` (reference), ``"cpu"`` or ``"triton"``.
        compress_followups: also compress the tokens of multi-token forwards after the first one
            (a follow-up turn, chunked prefill; the tokens decoded before it are compressed with it);
            otherwise they stay in full precision.
        residual: the newest this many tokens of every compressing forward stay in full precision
            in the tail, outside the budget (as ``residual_length`` in Transformers'
            ``QuantizedCache``); a prompt no longer than it is not compressed. ``nbytes`` counts them.
        min_tokens: a compressing forward packs its tail only when that is at least this many tokens
            beyond `residual`; fewer stay in full precision (None: ``DEFAULT_MIN_TOKENS``, 512). At 2.5
            bits a 20-300-token chat changes most greedy answers and packing it saves a few hundred
            KiB (``benchmarks/results/short-prompts.md``); 0 compresses every prompt. The tail keeps
            growing with decoded tokens until a later multi-token forward (a follow-up) or a
            decode block packs it.
        observe: the first this many decoded tokens' queries join the window that weighs a forward's
            tokens before they are packed (``rdkv_hf.observe``): the forward leaves them in full
            precision and the `observe`-th decode step after it packs them, weighed by the forward's
            last `window` queries and those decoded ones (an answer's first queries say what the
            rest of it reads). 0 packs at the forward itself. None (the default): ``DEFAULT_OBSERVE``
            (16, chosen in ``benchmarks/results/short-prompts.md``), or 0 under ``max_cache_bytes``
            and on a latent (MLA) cache, which refuse an explicit value. A multi-token forward that
            comes first packs them after adding its own queries. Memory: until then the forward's
            K/V stays whole in every layer, where packing at once holds one layer's at a time; so a
            forward packing more than `observe_max` tokens packs at once. A ``generate()`` of at
            most `observe` new tokens leaves them waiting (``summary()`` says so);
            ``RDKVCache.flush()`` packs them at once (``save_pretrained`` and ``fork`` do).
        observe_max: the most tokens a forward leaves waiting for decoded queries (2,048: longer
            prompts, where memory matters most, pack at their forward as they always did).
        decode_block: compress decoded tokens too, in blocks of this many tokens (None: decoded
            tokens stay in full precision). Once the full-precision tail holds ``decode_block``
            tokens beyond its newest ``max(decode_window, residual)``, the oldest ``decode_block``
            are weighed by the attention of the ``decode_window`` queries that came after them and
            packed at `budget` as a segment of their own (``rdkv_hf.decode_blocks``). Needs `budget`
            in bits, not `tokens`.
        decode_window: how many queries after a block weigh it (None: `window`, as for the prompt,
            at most ``decode_block``); at most ``decode_block``.
        decode_novelty: how much a decoded block's keys weigh besides its queries' attention, for
            the queries yet to come (None: ``DEFAULT_NOVELTY``, 4, chosen in
            ``benchmarks/results/long_generation/``; 0: attention alone). A token whose key points
            away from its block's mean key gains ``decode_novelty`` times the block's mean weight per
            standard deviation (``rdkv_hf.allocate.add_novelty``), so a fact no nearby query read
            keeps its bits for the question that comes later. RDKV modes (the eviction baselines
            score tokens their own way).
        max_cache_bytes: a hard cap on the bytes of the whole cache (every layer; codes, scales,
            tables, the tail and the decode state included). When packing would pass it, the cache
            re-allocates what it holds (``rdkv_hf.cache_cap``): older tokens lose bits or are evicted,
            the tail and the newest block are kept. Needs ``decode_block``; a cap below what the
            protected part needs is an error naming that minimum.
    """

    budget: float | None = DEFAULT_BUDGET
    tokens: int | None = None
    mode: str = "rdkv"
    profile: str | None = None
    window: int = 32
    pool_kernel: int = 5
    pool: str = "avg"
    carry: float = 0.8
    k_share: float = 0.5
    head_floor: float = 0.25
    widths: tuple = DEFAULT_WIDTHS
    eps_v: dict = field(default_factory=lambda: dict(DEFAULT_EPS_V))
    eps_k: dict = field(default_factory=lambda: dict(DEFAULT_EPS_K))
    high_precision_dtype: str | None = None
    backend: str = "auto"
    compress_followups: bool = True
    residual: int = 0
    min_tokens: int | None = None
    observe: int | None = None
    observe_max: int = 2048
    decode_block: int | None = None
    decode_window: int | None = None
    decode_novelty: float | None = None
    max_cache_bytes: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.tokens is not None:
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
                raise ValueError(f"`tokens` must be a positive int (FP16-equivalent tokens per head), got {self.tokens!r}")
            set_("budget", None)
        elif self.budget is None:
            raise ValueError("give `budget` (bits per element) or `tokens` (FP16-equivalent tokens per head)")
        else:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise TypeError(f"`budget` must be a number of bits, got {type(self.budget).__name__}")
            if not 0 < self.budget <= 16:
                raise ValueError(f"`budget` must be in (0, 16] bits per element, got {self.budget}")
            set_("budget", float(self.budget))
        from .planners import planner_class

        planner_class(self.mode)  # a registered mode (each one checks its own needs when built)
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"`window` must be a positive int, got {self.window!r}")
        if isinstance(self.pool_kernel, bool) or not isinstance(self.pool_kernel, int) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"`pool_kernel` must be a positive odd int, got {self.pool_kernel!r}")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"`pool` must be 'avg' or 'max', got {self.pool!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"`residual` must be a number of tokens >= 0 (0: compress every prompt token), got {self.residual!r}")
        if self.min_tokens is None:
            set_("min_tokens", DEFAULT_MIN_TOKENS)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"`min_tokens` must be a number of tokens >= 0 (0: compress every prompt), got {self.min_tokens!r}")
        if isinstance(self.carry, bool) or not isinstance(self.carry, (int, float)) or not 0 <= self.carry < 1:
            raise ValueError(f"`carry` must be in [0, 1) (0 turns it off), got {self.carry!r}")
        set_("carry", float(self.carry))
        if isinstance(self.k_share, bool) or not isinstance(self.k_share, (int, float)):
            raise TypeError(f"`k_share` must be a number in (0, 1) (the share of the budget spent on K), got {self.k_share!r}")
        if not 0 < self.k_share < 1:
            raise ValueError(f"`k_share` must be in (0, 1) (the share of the budget spent on K), got {self.k_share}")
        set_("k_share", float(self.k_share))
        if isinstance(self.head_floor, bool) or not isinstance(self.head_floor, (int, float)) or not 0 <= self.head_floor < 1:
            raise ValueError(
                f"`head_floor` must be a share of the budget in [0, 1), got {self.head_floor!r}; "
                "0 turns the floor off, 0.25 is the default"
            )
        set_("head_floor", float(self.head_floor))
        widths = tuple(sorted({int(b) for b in self.widths}))
        bad = [b for b in widths if b != 16 and not 0 <= b <= 8]
        if bad or 16 not in widths:
            raise ValueError(f"`widths` must be drawn from 0..8 and include 16, got {self.widths}")
        set_("widths", widths)
        set_("eps_v", _check_eps("eps_v", self.eps_v, widths))
        set_("eps_k", _check_eps("eps_k", self.eps_k, widths))
        if self.high_precision_dtype is not None and self.high_precision_dtype not in _DTYPES:
            raise ValueError(f"`high_precision_dtype` must be one of {sorted(_DTYPES)} or None, got {self.high_precision_dtype!r}")
        for name in ("observe", "observe_max"):
            value = getattr(self, name)
            if value is None and name == "observe":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a number of tokens >= 0, got {value!r}")
        if self.observe and self.max_cache_bytes is not None:
            raise ValueError(
                f"`observe`={self.observe} keeps a forward's tokens in full precision for that many decode steps, which "
                "`max_cache_bytes` forbids between forwards; leave observe=None (0 under a cap) or set 0"
            )
        self._check_decode()

    @property
    def waits_for(self) -> int:
        """Decoded queries a packing forward waits for: `observe`, or when None ``DEFAULT_OBSERVE``
        (0 under ``max_cache_bytes``, which holds between forwards)."""
        if self.observe is not None:
            return self.observe
        return 0 if self.max_cache_bytes is not None else DEFAULT_OBSERVE

    def observes(self, tokens: int) -> bool:
        """Whether a forward packing `tokens` tokens waits for decoded queries first (:attr:`waits_for`)."""
        return self.waits_for > 0 and tokens <= self.observe_max

    def _check_decode(self) -> None:
        """`decode_block`, `decode_window` and `max_cache_bytes` (see the class docstring)."""
        def positive_int(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low} or None, got {value!r}")

        if self.decode_block is None:
            for name in ("decode_window", "decode_novelty", "max_cache_bytes"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` applies to compressed decoding: set `decode_block` too (e.g. decode_block=128)")
            return
        from .planners import planner_class

        positive_int("decode_block", self.decode_block, 2)
        if self.tokens is not None:
            raise ValueError("`decode_block` packs decoded blocks at `budget` bits per element; give `budget`, not `tokens`")
        if self.decode_window is not None:
            positive_int("decode_window", self.decode_window)
            if self.decode_window > self.decode_block:
                raise ValueError(
                    f"`decode_window`={self.decode_window} exceeds `decode_block`={self.decode_block}: a block is weighed by "
                    "queries of the block after it; lower `decode_window` or raise `decode_block`"
                )
        if self.decode_novelty is not None:
            v = self.decode_novelty
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"`decode_novelty` must be a number >= 0 (0: attention alone) or None, got {v!r}")
            object.__setattr__(self, "decode_novelty", float(v))
            if v and not planner_class(self.mode).uses_novelty:
                raise ValueError(
                    f"`decode_novelty` applies to the RDKV modes; mode={self.mode!r} weighs decoded tokens its own way: "
                    "leave decode_novelty=None"
                )
        if self.max_cache_bytes is not None:
            positive_int("max_cache_bytes", self.max_cache_bytes)
            if not planner_class(self.mode).holds_cap:
                raise ValueError(
                    f"mode={self.mode!r} never evicts a token nor lowers a width, so it cannot hold `max_cache_bytes`; "
                    "use mode='rdkv' or 'rdkv+profile' (or an eviction mode) under a cap"
                )

    @property
    def novelty(self) -> float:
        """The key-novelty weight decoded blocks are packed with (``decode_novelty``, or ``DEFAULT_NOVELTY``)."""
        return DEFAULT_NOVELTY if self.decode_novelty is None else self.decode_novelty

    @property
    def block_window(self) -> int:
        """The queries that weigh a decode block (``decode_window``, or `window` up to the block)."""
        if self.decode_block is None:
            return 0
        return self.decode_window or min(self.window, self.decode_block)

    def keep_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of the 16-bit zone for a model running in `model_dtype`."""
        if self.high_precision_dtype is not None:
            return _DTYPES[self.high_precision_dtype]
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def split_kv(self, bits):
        """``(k_bits, v_bits)``: a head's average `bits` over K and V, split by ``k_share``."""
        return 2 * self.k_share * bits, 2 * (1 - self.k_share) * bits

    def budget_bits(self, prompt_tokens: int) -> float:
        """Average bits per element for a head that saw `prompt_tokens` tokens."""
        if self.tokens is not None:
            return min(16.0, 16.0 * self.tokens / max(prompt_tokens, 1))
        return self.budget

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        d["eps_v"] = {str(k): v for k, v in self.eps_v.items()}
        d["eps_k"] = {str(k): v for k, v in self.eps_k.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RDKVConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RDKV settings {unknown}; known ones are {sorted(known)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)

    def replace(self, **changes) -> RDKVConfig:
        return dataclasses.replace(self, **changes)
