"""The planner base: how one cache turns a layer's token and channel weights into widths."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..allocate import add_novelty

if TYPE_CHECKING:
    from ..config import RDKVConfig

_REGISTRY: dict[str, type[Planner]] = {}


def registered() -> dict[str, type[Planner]]:
    return dict(_REGISTRY)


class Planner:
    """Turns weights into widths for one cache.

    A subclass with a ``name`` is a mode (``RDKVConfig(mode=name)``); it checks its settings in
    ``__init__`` and implements :meth:`widths`. Its ``config`` is the one the cache runs with (the
    mode set to its name, and any knob the mode fixes, such as the baselines' ``carry=0``).

    Args:
        config: the :class:`~rdkv_hf.RDKVConfig`.
        profile: an :class:`~rdkv_hf.RDKVProfile` (modes with ``needs_profile``; others ignore it).
        layers: indices of the layers this planner compresses (None: all); a profile's head
            budgets are shared among those layers only (Gemma 3: its full-attention layers).
        heads: the global KV heads ``[start, stop)`` the cache holds (a tensor-parallel rank's
            block, :func:`rdkv_hf.parallel.kv_head_range`); None: all of them. Budgets across heads
            are allocated over all heads, then sliced to this block (:meth:`own_heads`), so the
            mean budget holds over the whole model, not on each rank.
    """

    name: ClassVar[str | None] = None  # the mode this class implements (None: not a mode)
    label: ClassVar[str] = ""  # for tables and plots
    needs_profile: ClassVar[bool] = False
    takes_tokens: ClassVar[bool] = True  # a budget given as `tokens` per head (else only `budget` in bits)
    evicts_only: ClassVar[bool] = False  # keeps tokens at 16 bits or evicts them (the eviction baselines)
    holds_cap: ClassVar[bool] = True  # can re-allocate under `max_cache_bytes` (evicts or lowers widths)
    uses_novelty: ClassVar[bool] = False  # adds `decode_novelty`'s key prior to a decoded block's weights
    cap_layer_share: ClassVar[float] = 0.0  # mixes the layers' cap weights (rdkv_hf.cache_cap.share_across_layers)
    fixed_widths: ClassVar[tuple[int, ...]] = ()  # the evaluation runs it at these widths, not over budgets
    rank: ClassVar[int] = 100  # its place in the evaluation's tables

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            other = _REGISTRY.get(name)
            if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"two planners claim mode {name!r}: {other.__qualname__} and {cls.__qualname__}")
            _REGISTRY[name] = cls

    def __init__(self, config: RDKVConfig, profile=None, layers=None, heads: tuple[int, int] | None = None):
        if self.name is not None and config.mode != self.name:
            config = config.replace(mode=self.name)
        if self.needs_profile and profile is None:
            raise ValueError(f"mode={self.name!r} needs a profile: patch(model, budget=..., profile=repo_id_or_dir)")
        if not self.takes_tokens and config.budget is None:
            raise ValueError(f"mode={self.name!r} takes `budget` in bits per element, not `tokens`")
        self.config = config
        self.profile = profile if self.needs_profile else None
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        if heads is not None:
            start, stop = (int(h) for h in heads)
            if not 0 <= start < stop:
                raise ValueError(f"`heads` must be a range [start, stop) of KV heads with 0 <= start < stop, got {heads!r}")
            heads = (start, stop)
        self.heads = heads

    @property
    def head_offset(self) -> int:
        """The global index of the cache's first KV head (0 without tensor parallelism)."""
        return 0 if self.heads is None else self.heads[0]

    def own_heads(self, bits: torch.Tensor) -> torch.Tensor:
        """``[layers, kv_heads]`` budgets of all heads -> the columns of the heads this cache holds."""
        if self.heads is None:
            return bits
        start, stop = self.heads
        if stop > bits.shape[1]:
            raise ValueError(f"this rank holds KV heads [{start}, {stop}) but the profile has {bits.shape[1]}")
        return bits[:, start:stop].contiguous()

    def check_heads(self, layer_idx: int, heads: int, budgets: torch.Tensor) -> None:
        """Raise unless a layer's `heads` KV heads are the ones `budgets` ``[layers, kv_heads]`` cover."""
        if budgets.shape[1] != heads:
            where = "all KV heads" if self.heads is None else f"KV heads [{self.heads[0]}, {self.heads[1]})"
            raise ValueError(
                f"layer {layer_idx} holds {heads} KV heads, but the planner has budgets for {budgets.shape[1]} ({where}); "
                "a tensor-parallel model must be patched on every rank after it is loaded with its plan, so that "
                "each rank gets the budgets of its own heads"
            )

    def keep_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of the 16-bit zone for a model running in `model_dtype`."""
        return self.config.keep_dtype(model_dtype)

    def widths(self, layer_idx: int, w_tok: torch.Tensor, w_ch: torch.Tensor, real: torch.Tensor, v_dim: int | None = None):
        """Widths of the tokens of one forward of layer `layer_idx`.

        Args:
            w_tok: ``[B, kv_heads, T]`` token weights; w_ch: ``[B, kv_heads, D]`` channel weights.
            real: ``[B, T]`` bool, non-padding tokens.
            v_dim: elements of one V token (None: ``D``, K's channels; DeepSeek's MLA differs).
        Returns:
            ``(v_bits [B, kv_heads, T], k_bits [B, kv_heads, D])`` long widths (0 evicts).
        """
        raise NotImplementedError

    def block_weights(self, w_tok: torch.Tensor, keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``[B, kv_heads, T]`` the weights a decoded block (``decode_block``) is packed by: its
        queries' attention, plus :func:`~rdkv_hf.allocate.add_novelty`'s prior in modes that
        ``uses_novelty``. `keys`: ``[B, kv_heads, T, D]`` the block's; `real`: ``[B, T]``."""
        if not self.uses_novelty:
            return w_tok
        return add_novelty(w_tok, keys, real, self.config.novelty)

    def cap_weights(self, w_tok: torch.Tensor, real: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[B, kv_heads, T]`` the weights kept with packed tokens for re-allocation under a byte
        cap (``rdkv_hf.cache_cap``): a token of higher weight keeps more bits. RDKV's own weights
        by default; `positions` ``[T]`` are the tokens' places in the sequence."""
        return w_tok

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def rows(real: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real [B * heads, T], tokens [B * heads] float64)``: the real tokens of every (row, head)."""
    B, T = real.shape
    real_rows = real[:, None, :].expand(B, heads, T).reshape(B * heads, T)
    return real_rows, real_rows.sum(1).double()
