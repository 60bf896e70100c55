"""Packing that waits for the first decoded tokens: their queries weigh a forward's tokens too.

With ``RDKVConfig.observe = k`` (16 by default: ``RDKVConfig.waits_for``), a forward that would
pack its tail (a prompt, or a follow-up with ``compress_followups``; at most ``observe_max`` tokens)
leaves those tokens in full precision and keeps what its last ``window`` queries' attention says of
them, as sums (:class:`~rdkv_hf.scoring.WindowSums`). Each later forward adds its own queries'
attention; after the k-th decode step, or at the first multi-token forward (after its queries are
added), the waiting tokens are packed, weighed by all of those queries. Until then the model
attends to them in full precision, and they stay the oldest tokens of the tail (later tokens are
appended after them).

Why: the prompt's last queries stand in for the queries of the answer; an answer's first tokens
show what the rest of it reads (``benchmarks/results/short-prompts.md`` measures it).

The state lives on the layer as plain tensors, so beam search reorders it and a fork clones it with
the rest; ``observe_n`` (tokens waiting, 0: none) and ``observe_steps`` (decode steps seen) are ints.
"""

from __future__ import annotations

import torch

from .decode_blocks import named_nbytes, select_named
from .scoring import WindowSums, prompt_sums, weights_from_sums

STATE = ("observe_mass", "observe_seen", "observe_qsq", "observe_nq", "observe_real")


def init_state(layer) -> None:
    """Nothing waiting (a new or reset layer, or just packed)."""
    for name in STATE:
        setattr(layer, name, None)
    layer.observe_n = 0
    layer.observe_steps = 0


def waiting(layer) -> bool:
    """Whether the layer holds tokens waiting for decoded queries."""
    return getattr(layer, "observe_n", 0) > 0


def start(layer, sums, n: int) -> None:
    """Leave the oldest `n` tail tokens waiting, with `sums` (:class:`~rdkv_hf.scoring.WindowSums`
    over at least those `n`) of the forward that would have packed them."""
    layer.observe_mass, layer.observe_seen = sums.mass[..., :n], sums.seen[:, :n]
    layer.observe_qsq, layer.observe_nq, layer.observe_real = sums.qsq, sums.nq, sums.real[:, :n]
    layer.observe_n, layer.observe_steps = n, 0


def after_forward(layer, query: torch.Tensor, mask, scaling: float, lse, softcap=None, sinks=None) -> int:
    """Add this forward's queries to the sums of the waiting tokens and pack them when due (after
    ``config.waits_for`` decode steps, or at once after a multi-token forward).

    Args: as :func:`~rdkv_hf.scoring.prompt_sums` takes them, ``query [B, Hq, q, D]`` the
        forward's queries, its `mask` over the tail and `lse` when :func:`~rdkv_hf.attention.attend`
        computed it.
    Returns:
        how many tokens it packed (0: they still wait); they were the oldest of the tail.
    """
    n, kv = layer.observe_n, layer.keys.shape[2]
    sums = prompt_sums(query, layer.keys, mask, scaling, kv, layer.config, lse, softcap, sinks)
    # Out of place: the state may come from a forward under torch.inference_mode and this one not.
    layer.observe_mass = layer.observe_mass + sums.mass[..., :n]
    layer.observe_seen = layer.observe_seen + sums.seen[:, :n]
    layer.observe_qsq = layer.observe_qsq + sums.qsq
    layer.observe_nq = layer.observe_nq + sums.nq
    q = query.shape[2]
    layer.observe_steps += q == 1
    if q == 1 and layer.observe_steps < layer.config.waits_for:
        return 0
    return pack(layer)


def pack(layer) -> int:
    """Pack the waiting tokens now, weighed by the queries seen so far; returns how many."""
    n = layer.observe_n
    if not n:
        return 0
    kv = layer.keys.shape[2]
    sums = WindowSums(layer.observe_mass, layer.observe_seen, layer.observe_qsq, layer.observe_nq, layer.observe_real)
    w_tok, w_ch, real = weights_from_sums(sums, layer.keys[:, :, :n], layer.config)
    init_state(layer)
    layer.compress_tail(kv, w_tok, w_ch, real, keep_last=kv - n)
    return n


def select_state(layer, index: torch.Tensor) -> None:
    """Reorder the sums with the batch (beam search, repeats)."""
    select_named(layer, STATE, index)


def state_nbytes(layer) -> int:
    """Bytes of the sums kept for the waiting tokens."""
    return named_nbytes(layer, STATE)
