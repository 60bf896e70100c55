"""Models bigger than one device: weights read through whatever holds them, the KV heads of a
tensor-parallel rank, and the summaries of all ranks in one table.

* Weights are read whole wherever they are (:func:`rdkv_hf.weights.read_parameter`): gathered from
  the ranks' shards, or read through accelerate's offload hook.
* :func:`kv_head_range`: the global KV heads ``[start, stop)`` this process holds. Transformers'
  tensor parallelism shards ``k_proj`` / ``v_proj`` by output rows ("colwise"), so each rank holds a
  contiguous block of KV heads and its attention and cache see only those. ``None`` when the process
  holds every head (one device, ``device_map`` splits, offload).
* :func:`gather_summaries`: every rank's :class:`~rdkv_hf.summary.CacheSummary` (global head
  indices) merged into one on rank 0.

Collectives: ``patch()`` (through the profile fingerprint) and :func:`gather_summaries` must be called
on every rank of the tensor-parallel group, as loading and ``generate()`` already are.
"""

from __future__ import annotations

from torch import nn

from .summary import CacheSummary
from .weights import head_shape, is_dtensor, kv_projections


def _row_block(weight, where: str) -> tuple[int, int] | None:
    """``[start, stop)`` of the output rows of `weight` (``[out, in]``) this process holds, None
    for all of them."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(weight.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None
    mesh = weight.device_mesh
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in (0, -2):
        raise ValueError(
            f"{where} is a DTensor placed {placements} on a {mesh.ndim}-D mesh; rdkv_hf supports K/V projections "
            "sharded by output rows ('colwise' in the tensor-parallel plan) over one mesh dimension"
        )
    rows = weight.shape[0]
    size, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // size)  # torch.chunk's split, which Shard follows
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    local = weight.to_local().shape[0]
    if local != stop - start:
        raise ValueError(f"{where}: rank {rank} of {size} holds {local} rows, expected {stop - start} of {rows} (torch.chunk's split)")
    return start, stop


def kv_head_range(model) -> tuple[int, int] | None:
    """The global KV heads ``[start, stop)`` this process holds under tensor parallelism; None when
    it holds all of them (or `model` is a config). Raises ``ValueError`` for a sharding that splits
    a head, differs between layers, or is a plain tensor rdkv_hf cannot place."""
    if not isinstance(model, nn.Module) or not any(is_dtensor(p) for p in model.parameters()):
        return None  # not tensor parallel (nor an architecture whose K/V projections are read here)
    n_heads, head_dim = head_shape(model.config)
    blocks = set()
    for i, (k_proj, v_proj) in enumerate(kv_projections(model)):
        for label, proj in (("k_proj", k_proj), ("v_proj", v_proj)):
            where = f"layer {i} {label}.weight"
            w = proj.weight
            if w.shape[0] != n_heads * head_dim:  # a DTensor reports its global shape
                raise ValueError(
                    f"{where} has {w.shape[0]} output rows, but the config says {n_heads} KV heads x {head_dim}; a "
                    "tensor-parallel shard held as a plain tensor ('local_colwise') is not supported, use 'colwise'"
                )
            block = _row_block(w, where)
            if block is None:
                blocks.add((0, n_heads))
                continue
            start, stop = block
            if start % head_dim or stop % head_dim:
                raise ValueError(f"{where}: this rank holds rows [{start}, {stop}), which split a KV head of {head_dim} rows; "
                                 f"use a tensor-parallel size that divides the {n_heads} KV heads")
            blocks.add((start // head_dim, stop // head_dim))
    if len(blocks) > 1:
        raise ValueError(f"the K/V projections of this model hold different KV heads on this rank: {sorted(blocks)}")
    block = blocks.pop() if blocks else (0, n_heads)
    return None if block == (0, n_heads) else block


def gather_summaries(cache_or_summary, dst: int = 0, group=None) -> CacheSummary | None:
    """Every tensor-parallel rank's summary merged into one on rank `dst` (None on the others).

    Each rank holds its own block of KV heads, so the rows (global head indices) are concatenated
    and the bytes added up. Call it on every rank of `group` (default: the whole world); without
    ``torch.distributed`` initialized it returns the one summary as is.

    Args:
        cache_or_summary: an :class:`~rdkv_hf.RDKVCache` or its ``summary()``.
        dst: the global rank that gets the merged summary.
    """
    summary = cache_or_summary if isinstance(cache_or_summary, CacheSummary) else cache_or_summary.summary()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return summary
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(summary, gathered, dst=dst, group=group)
    return CacheSummary.merge(gathered) if gathered is not None else None
