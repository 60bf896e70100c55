"""`RDKVCache.summary()`: what the cache kept, per layer and KV head, as a table or dicts.

Head indices are global: under tensor parallelism a rank's cache holds a block of the model's KV
heads and its rows are numbered from the block's first head; :meth:`CacheSummary.merge` (and
:func:`rdkv_hf.parallel.gather_summaries`, which collects them) makes one table of all ranks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class HeadRow:
    layer: int
    head: int
    prompt_tokens: int
    kept_tokens: int
    v_widths: dict  # width -> tokens
    k_widths: dict  # width -> channels
    bits_per_element: float  # realized, scales and orders included


@dataclass
class CacheSummary:
    rows: list[HeadRow] = field(default_factory=list)
    nbytes: int = 0
    prompt_bits_per_element: float = 0.0
    bf16_bytes: int = 0  # the same tokens in a bf16 DynamicCache
    layers_compressed: list[int] = field(default_factory=list)
    layers_total: int = 0
    prompt_bytes: int = 0  # packed bytes of the compressed prompt tokens (tails excluded)
    prompt_elements: int = 0  # K and V elements of those tokens before compression
    ranks: int = 1  # processes whose caches this summary covers (tensor parallelism)
    waiting_tokens: int = 0  # tokens a layer keeps in full precision until decoded queries weigh them (RDKVConfig.observe)

    @property
    def compression_ratio(self) -> float:
        return self.bf16_bytes / self.nbytes if self.nbytes else float("nan")

    @classmethod
    def from_cache(cls, cache, batch_index: int = 0) -> CacheSummary:
        """Per-head rows for one batch row (`batch_index`); totals cover the whole cache (an
        :class:`~rdkv_hf.RDKVCache`: its ``rdkv_layers`` hold packed segments)."""
        compressed = set(cache.rdkv_layers)
        out = cls(nbytes=cache.nbytes, layers_compressed=cache.rdkv_layers, layers_total=len(cache.layers))
        first_head = cache.planner.head_offset  # the global index of this cache's first KV head
        prompt_bytes = prompt_elems = 0
        for li, layer in enumerate(cache.layers):
            if not getattr(layer, "is_initialized", False) or layer.keys is None:  # no K/V (linear attention, shared)
                continue
            B, H = layer.keys.shape[:2]
            seen = layer.get_seq_length()
            out.bf16_bytes += B * H * seen * (layer.keys.shape[-1] + layer.values.shape[-1]) * 2
            if li not in compressed:
                continue
            out.waiting_tokens = max(out.waiting_tokens, getattr(layer, "observe_n", 0))
            # Elements of a token as compressed: K's plus V's (a latent layer's absorbed K and V, see cache.py).
            dims = layer.segments[0].buffers.head_dim + layer.segments[0].buffers.v_dim if layer.segments else 0
            for h in range(H):
                v, k, kept, t, nbytes = Counter(), Counter(), 0, 0, 0
                for s in layer.segments:
                    head = s.heads[batch_index * H + h]
                    v.update(head.v_widths())
                    k.update(head.k_widths())
                    kept += head.n
                    t += int(s.real_tokens[batch_index])
                    nbytes += head.nbytes
                bits = 8 * nbytes / (t * dims) if t else 0.0
                out.rows.append(HeadRow(li, first_head + h, t, kept, dict(sorted(v.items())), dict(sorted(k.items())), bits))
            for s in layer.segments:
                prompt_bytes += sum(hd.nbytes for hd in s.heads)
                prompt_elems += int(s.real_tokens.sum()) * H * dims
        out.prompt_bytes, out.prompt_elements = prompt_bytes, prompt_elems
        out.prompt_bits_per_element = 8 * prompt_bytes / prompt_elems if prompt_elems else 0.0
        return out

    @classmethod
    def merge(cls, parts: list[CacheSummary]) -> CacheSummary:
        """One summary of the caches of several tensor-parallel ranks (each holding its own KV
        heads of the same layers): rows in (layer, head) order, bytes added up."""
        if not parts:
            raise ValueError("CacheSummary.merge needs at least one summary")
        layers = {tuple(p.layers_compressed) for p in parts}
        if len(layers) > 1:
            raise ValueError(f"the summaries cover different layers: {sorted(layers)}; merge the ranks of one model's caches")
        heads = [(r.layer, r.head) for p in parts for r in p.rows]
        if len(set(heads)) != len(heads):
            raise ValueError("two summaries hold the same (layer, head); merge the summaries of distinct tensor-parallel ranks")
        prompt_bytes = sum(p.prompt_bytes for p in parts)
        prompt_elements = sum(p.prompt_elements for p in parts)
        return cls(
            rows=sorted((r for p in parts for r in p.rows), key=lambda r: (r.layer, r.head)),
            nbytes=sum(p.nbytes for p in parts),
            prompt_bits_per_element=8 * prompt_bytes / prompt_elements if prompt_elements else 0.0,
            bf16_bytes=sum(p.bf16_bytes for p in parts),
            layers_compressed=list(parts[0].layers_compressed),
            layers_total=parts[0].layers_total,
            prompt_bytes=prompt_bytes,
            prompt_elements=prompt_elements,
            ranks=sum(p.ranks for p in parts),
            waiting_tokens=max(p.waiting_tokens for p in parts),
        )

    def to_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.rows]

    def __str__(self) -> str:
        lines = [
            f"RDKVCache: {self.nbytes / 2**20:.2f} MiB held, {self.compression_ratio:.2f}x smaller than bf16 "
            f"({self.bf16_bytes / 2**20:.2f} MiB); prompt at {self.prompt_bits_per_element:.2f} bits/element; "
            f"{len(self.layers_compressed)}/{self.layers_total} layers compressed" + (f"; {self.ranks} ranks" if self.ranks > 1 else "")
            + (f"; {self.waiting_tokens} tokens wait in full precision for decoded queries (observe; cache.flush() packs them)"
               if self.waiting_tokens else ""),
            f"{'layer':>5} {'head':>4} {'prompt':>7} {'kept':>6} {'bits':>5}  V tokens by width        K channels by width",
        ]
        for r in self.rows:
            vw = " ".join(f"{b}:{n}" for b, n in r.v_widths.items() if n)
            kw = " ".join(f"{b}:{n}" for b, n in r.k_widths.items() if n)
            lines.append(f"{r.layer:>5} {r.head:>4} {r.prompt_tokens:>7} {r.kept_tokens:>6} {r.bits_per_element:>5.2f}  {vw:<24} {kw}")
        return "\n".join(lines)
