"""DeepSeek-V3: multi-head latent attention (MLA), where K and V have different widths.

Transformers 4.57 caches per-head keys ``[B, H, T, qk_nope + qk_rope]`` and values ``[B, H, T,
v_head_dim]``: the generic path serves them (``D_k != D_v`` through the layout and the kernels).
Transformers 5 caches the latent instead, ``c [B, 1, T, kv_lora_rank]`` as keys and the roped key
``k_rope [B, 1, T, qk_rope_head_dim]`` as values, and expands per-head K and V after the cache
(``expand_kv``). RDKV then attends the latent in its absorbed form (DeepSeek-V2, appendix C): with
``kv_b_proj`` split per head into ``W_UK [qk_nope, r]`` and ``W_UV [v_head_dim, r]``,

    q_nope . (W_UK c) = (W_UK^T q_nope) . c        out_h = W_UV (sum_t p_t c_t)

so ``K = [c, k_rope]`` (``r + qk_rope`` channels) and ``V = c`` (``r`` elements) are one KV head
shared by every query head. RDKV compresses that K and V, so a budget of b bits per element
stores ``b * (2r + qk_rope)`` bits a token, against ``16 * (r + qk_rope)`` for the bf16 latent
(DeepSeek-V3: 1.89x b / 16 of it; its summary's ratio is against the latent).
"""

from __future__ import annotations

import importlib

import torch

from .. import compat
from .base import Patcher


class LatentMLA:
    """How RDKV's attention reads a DeepSeek MLA latent cache (see the module docstring)."""

    def __init__(self, text_config):
        self.nope, self.rope = text_config.qk_nope_head_dim, text_config.qk_rope_head_dim
        self.v_dim, self.rank = text_config.v_head_dim, text_config.kv_lora_rank

    def _up(self, module) -> torch.Tensor:
        """``[H, qk_nope + v_head_dim, r]`` float32: ``kv_b_proj`` per head (W_UK rows, then W_UV)."""
        w = module.kv_b_proj.weight
        if not w.is_floating_point() or w.dim() != 2:
            raise ValueError(f"kv_b_proj of layer {module.layer_idx} holds {w.dtype} weights; RDKV's latent attention needs "
                             "floating-point ones (load the model without weight quantization)")
        return w.float().view(-1, self.nope + self.v_dim, self.rank)

    def query(self, module, query: torch.Tensor) -> torch.Tensor:
        """``[B, H, q, qk_nope + qk_rope]`` -> absorbed ``[B, H, q, r + qk_rope]`` float32."""
        q_nope, q_rope = query.float().split([self.nope, self.rope], dim=-1)
        return torch.cat([torch.einsum("bhqn,hnr->bhqr", q_nope, self._up(module)[:, : self.nope]), q_rope], dim=-1)

    def keys_values(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent tail as attended: ``K = [c, k_rope]`` and ``V = c``."""
        return torch.cat([layer.keys, layer.values], dim=-1), layer.keys

    def output(self, module, out: torch.Tensor) -> torch.Tensor:
        """``[B, H, q, r]`` attended latent -> ``[B, H, q, v_head_dim]`` float32."""
        return torch.einsum("bhqr,hvr->bhqv", out.float(), self._up(module)[:, self.nope :])


class MLAPatcher(Patcher):
    """A DeepSeek-style MLA family; `attention_class` is its attention module, ``module:Class``."""

    def __init__(self, model_type: str, attention_class: str, compresses: str, limits: str = ""):
        super().__init__(model_type, compresses, limits, profiles=False)  # no k_proj / v_proj: no profiles
        self.attention_class = attention_class

    def latent_attention(self, config):
        module, name = self.attention_class.split(":")
        if not compat.caches_mla_latent(getattr(importlib.import_module(module), name)):
            return None  # per-head K and V: the generic path
        return LatentMLA(config.get_text_config(decoder=True))
