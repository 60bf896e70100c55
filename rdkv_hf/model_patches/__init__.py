"""The registry of supported decoder families, keyed by ``config.model_type``: one table of truth.

Most families differ from Llama only in what reaches the shared attention (q/k norms, soft-capping,
sinks, sliding or chunked layers) and are one entry of the generic :class:`Patcher`; a file exists
only where a family differs (``multimodal.py``: the text decoder inside a VLM; ``deepseek_v3.py``:
multi-head latent attention). :func:`supported_architectures` lists the registry for the README's
support matrix and ``rdkv-hf info``; :data:`UNSUPPORTED` names the architectures refused, and why.
A model type the installed Transformers does not have is listed all the same (nothing is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import compat
from .base import EVERY_LAYER, EVERY_UNLESS_SLIDING, FULL_LAYERS, Patcher, full_attention_layers
from .deepseek_v3 import MLAPatcher
from .multimodal import MultimodalPatcher

_MISTRAL_WINDOW = ("every layer; a config with `sliding_window` set (Mistral v0.1 style) makes every layer sliding and RDKV "
                   "compresses nothing (a warning says so)")
_OWN_CACHE_457 = "Transformers 5 or newer (4.57 keeps its own {}, refused with that message)"
_BYPASS_457 = "Transformers 5 or newer (4.57's attention bypasses the attention interface; refused with that message)"

_ENTRIES: tuple[Patcher, ...] = (
    Patcher("llama"),
    Patcher("qwen2", EVERY_UNLESS_SLIDING),
    Patcher("qwen2_moe", EVERY_UNLESS_SLIDING, _BYPASS_457),
    Patcher("qwen3", EVERY_UNLESS_SLIDING),
    Patcher("qwen3_moe", EVERY_UNLESS_SLIDING),
    Patcher("mistral", _MISTRAL_WINDOW),
    Patcher("ministral", FULL_LAYERS),
    Patcher("mixtral", _MISTRAL_WINDOW),
    Patcher("phi3", _MISTRAL_WINDOW, "no profiles: its K and V come from one fused `qkv_proj`", profiles=False),
    Patcher("gemma2", FULL_LAYERS, "soft-capped logits (`attn_logit_softcapping`): a prompt attends in float32, 1024 queries at a "
            "time, not through sdpa (which cannot soft-cap)"),
    Patcher("gemma3_text", FULL_LAYERS),
    MultimodalPatcher("gemma3", "gemma3_text", FULL_LAYERS + " (the text decoder's; image tokens are compressed like text)"),
    Patcher("olmo2"),
    Patcher("granite"),
    Patcher("smollm3", EVERY_UNLESS_SLIDING),
    Patcher("glm4"),
    Patcher("cohere2", FULL_LAYERS),
    Patcher("gpt_oss", FULL_LAYERS, "attention sinks (`s_aux`): every attention (sliding layers' too) runs in float32, a prompt's "
            "1024 queries at a time, not through sdpa (which ignores sinks)"),
    MLAPatcher(
        "deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3Attention", EVERY_LAYER,
        "multi-head latent attention: Transformers 5 caches the latent, which RDKV compresses in absorbed form (K = latent + "
        "roped key, V = latent), so b bits per element hold 1.89 b/16 of the bf16 latent's bytes",
    ),
    Patcher(
        "qwen3_next", "the full-attention layers (one in four); the Gated DeltaNet layers keep their recurrent states",
        _OWN_CACHE_457.format("Qwen3NextDynamicCache"), profiles=False,
    ),
    Patcher("llama4_text", "the full-attention (NoPE) layers; chunked-attention layers keep Transformers' cache"),
    Patcher("falcon_h1", "the attention of every layer; the Mamba beside it keeps its states (in the same cache layer)",
            _OWN_CACHE_457.format("FalconHybridMambaAttentionDynamicCache")),
    Patcher("zamba2", "the attention of the hybrid layers (one shared attention block, a cache layer for each use); Mamba layers keep "
            "their states", _OWN_CACHE_457.format("Zamba2HybridDynamicCache"), profiles=False),
    Patcher("jamba", "the attention layers (one in `attn_layer_period`); Mamba layers keep their states",
            _OWN_CACHE_457.format("HybridMambaAttentionDynamicCache"), profiles=False),
    Patcher("lfm2", "the attention layers; the convolution layers keep their states", _OWN_CACHE_457.format("Lfm2HybridConvCache"),
            profiles=False),
    Patcher("gemma"),
    Patcher("phi"),
    Patcher("starcoder2", _MISTRAL_WINDOW),
    Patcher("stablelm", limits=_BYPASS_457),
    Patcher("olmo"),
    Patcher("olmo3", FULL_LAYERS),
    Patcher("olmoe", limits=_BYPASS_457),
    Patcher("cohere"),
    Patcher("exaone4", FULL_LAYERS),
    Patcher("glm4_moe"),
    Patcher("ernie4_5"),
    Patcher("seed_oss"),
    Patcher("apertus"),
    Patcher("arcee"),
    Patcher("helium"),
    Patcher("hunyuan_v1_dense"),
    Patcher("nemotron", limits=_BYPASS_457),
    MultimodalPatcher("qwen2_5_vl", "qwen2_5_vl_text", EVERY_UNLESS_SLIDING + " (the text decoder's; image tokens are compressed like text)",
                      "profiles from Transformers 5 (4.57's model cannot run a forward from embeddings, which calibration does)",
                      profiles="5"),
    MultimodalPatcher("llava", None, "as its text decoder's family (which must be in this table)",
                      "profiles only where its text decoder's family has them"),
)

PATCHERS: dict[str, Patcher] = {p.model_type: p for p in _ENTRIES}

# Architectures whose cache is not a list of attention layers RDKV can replace: refused with the reason.
UNSUPPORTED: dict[str, str] = {
    "mamba": "a state-space model: its cache holds recurrent states, no keys and values to compress",
    "mamba2": "a state-space model: its cache holds recurrent states, no keys and values to compress",
    "falcon_mamba": "a state-space model: its cache holds recurrent states, no keys and values to compress",
    "rwkv": "a recurrent model: no keys and values to compress",
    "xlstm": "a recurrent model: its cache is its own xLSTMCache, no keys and values to compress",
    "gemma3n": "later layers reuse earlier layers' keys and values (KV sharing), which would read a compressed layer uncompressed",
    "minimax": "its cache is its own MiniMaxCache (lightning attention states), not a list of attention layers",
}


@dataclass(frozen=True)
class Architecture:
    """One row of the support matrix."""

    model_type: str
    compresses: str
    profiles: bool | str  # rdkv_hf.calibrate measures a profile of it (modes rdkv+profile, ratequant); str: from that major release
    limits: str
    installed: bool  # the installed Transformers has this model type


def supported_architectures() -> list[Architecture]:
    """The registry as a table: each model type, which layers RDKV compresses, and its limits."""
    return [Architecture(p.model_type, p.compresses, p.profiles, p.limits, compat.has_model_type(p.model_type)) for p in _ENTRIES]


def support_table(installed: bool = False) -> str:
    """The support matrix as a Markdown table (the README's is this text; `installed` adds a column
    saying whether the installed Transformers has each model type)."""
    head = ["model type", "compressed", "profiles", "limits"] + ([f"in transformers {compat.TRANSFORMERS_VERSION}"] if installed else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in supported_architectures():
        profiles = f"Transformers {a.profiles}+" if isinstance(a.profiles, str) else "yes" if a.profiles else "no"
        cells = [f"`{a.model_type}`", a.compresses, profiles, a.limits or "-"]
        cells += ["yes" if a.installed else "no"] if installed else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Refused, with the reason: " + "; ".join(f"`{t}` ({why})" for t, why in UNSUPPORTED.items()) + "."]
    return "\n".join(lines)


def patcher_for(model) -> Patcher:
    """The patcher of `model`'s ``config.model_type``; raises ``ValueError`` naming an unsupported
    type (and why, for the known ones) with the supported list."""
    config = model.config
    model_type = config.model_type
    supported = f"supported: {sorted(PATCHERS)}"
    if model_type in UNSUPPORTED:
        raise ValueError(f"rdkv_hf cannot compress model_type {model_type!r}: {UNSUPPORTED[model_type]}; {supported}")
    if model_type not in PATCHERS:
        raise ValueError(f"rdkv_hf does not support model_type {model_type!r} yet; {supported}")
    patcher = PATCHERS[model_type]
    if isinstance(patcher, MultimodalPatcher):
        text_type = config.get_text_config(decoder=True).model_type
        text_families = [t for t, p in PATCHERS.items() if not isinstance(p, MultimodalPatcher)]
        if not patcher.serves_decoder(text_type, text_families):
            raise ValueError(f"rdkv_hf supports {model_type!r} with a text decoder of a supported family; this one's is "
                             f"{text_type!r}; {supported}")
    return patcher


def check_profiles(model) -> None:
    """Raise ``ValueError`` when :func:`rdkv_hf.calibrate` cannot measure a profile of `model`'s
    family (the table's "profiles" column); a model type outside the registry is left to try."""
    patcher = PATCHERS.get(model.config.model_type)
    if patcher is None or patcher.profiles_here():
        return
    if isinstance(patcher.profiles, str):
        raise ValueError(f"profiles of {patcher.model_type} need Transformers {patcher.profiles} or newer, found "
                         f"{compat.TRANSFORMERS_VERSION}: pip install -U 'transformers<{compat.MAX_TRANSFORMERS_EXCLUSIVE}'")
    raise ValueError(f"rdkv_hf cannot measure a profile of {patcher.model_type}: calibration needs `self_attn.k_proj` and "
                     "`v_proj` in every layer; patch it without one (mode 'rdkv')")


def compressed_layers(model_or_config) -> tuple[int, ...]:
    """Indices of the layers an RDKV cache (and the eviction baselines) compress in a model (or
    its config): its patcher's choice, the full-attention layers for a model type without one."""
    config = getattr(model_or_config, "config", model_or_config)
    patcher = PATCHERS.get(config.model_type)
    return patcher.compressed_layers(config) if patcher is not None else full_attention_layers(config)


def latent_attention(model_or_config):
    """How RDKV's attention reads the cache of a model whose cache holds a latent (DeepSeek's MLA
    on Transformers 5), None for keys and values."""
    config = getattr(model_or_config, "config", model_or_config)
    patcher = PATCHERS.get(config.model_type)
    return patcher.latent_attention(config) if patcher is not None else None


__all__ = ["PATCHERS", "UNSUPPORTED", "Architecture", "Patcher", "check_profiles", "compressed_layers", "latent_attention", "patcher_for",
           "support_table", "supported_architectures"]
