"""The identity of a model for a profile (and a saved cache): its architecture, shapes and a hash
of its K/V projection weights."""

from __future__ import annotations

import hashlib

import torch

FINGERPRINT_KEYS = ("model_type", "architecture", "num_layers", "num_kv_heads", "head_dim", "weights_sha256")


def kv_projections(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``[(k_proj, v_proj)]`` of every decoder layer (``self_attn`` of the layers where the
    registry's patcher finds them; ``model.model.layers`` for a model type outside it)."""
    from .model_patches import PATCHERS

    patcher = PATCHERS.get(getattr(model.config, "model_type", None))
    if patcher is not None:
        layers = patcher.decoder_layers(model)
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise ValueError(f"layer {i} of {type(model).__name__} has no self_attn.k_proj / v_proj; this architecture is not supported")
        out.append((attn.k_proj, attn.v_proj))
    return out


def fingerprint(model) -> dict:
    """Identity of a model for a profile: architecture, shapes and a hash of its K/V projections.

    The hash is the first 16 hex chars of a sha256 over the K and V projection weights (and biases)
    of every layer, rounded to bfloat16, so a float32 and a bfloat16 load of the same checkpoint agree.
    """
    cfg = model.config.get_text_config(decoder=True)  # a VLM's shapes are its text decoder's
    n_heads = cfg.num_attention_heads
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    h = hashlib.sha256()
    for k_proj, v_proj in kv_projections(model):
        for module in (k_proj, v_proj):
            for name in ("weight", "bias"):
                t = getattr(module, name, None)
                if t is None:
                    continue
                t = t.detach().to("cpu", torch.bfloat16).contiguous()
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(t.view(torch.int16).numpy().tobytes())
    return {
        "model_type": model.config.model_type,
        "architecture": archs[0],
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads),
        "weights_sha256": h.hexdigest()[:16],
    }


def weight_norms(model) -> torch.Tensor:
    """``[layers, 2]`` Frobenius norms of each layer's K and V projection weights (float64 sums)."""
    return torch.tensor(
        [[m.weight.detach().double().norm().item() for m in pair] for pair in kv_projections(model)],
        dtype=torch.float32, device="cpu",
    )


def describe(fp: dict) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in FINGERPRINT_KEYS)
