"""A model's K/V projection weights, read whole wherever they are.

* :func:`kv_projections`: the ``(k_proj, v_proj)`` modules of every decoder layer; :func:`kv_sources`:
  whatever makes each attention layer's K and V (fingerprints).
* :func:`read_parameter`: the whole value of a parameter, on the CPU, whether it is a plain tensor, a
  ``DTensor`` sharded by tensor parallelism (``tp_plan="auto"``: gathered with ``full_tensor()``, a
  collective that every rank must join) or a weight accelerate offloaded to the CPU or disk (left on
  the ``meta`` device; read through the module's offload hook, as its forward does).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of `model` (where the registry's patcher finds them; ``model.model.layers``
    for a model type outside it)."""
    from .model_patches import PATCHERS

    patcher = PATCHERS.get(getattr(model.config, "model_type", None))
    if patcher is not None:
        layers = patcher.decoder_layers(model)
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def kv_projections(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``[(k_proj, v_proj)]`` of every decoder layer's ``self_attn``."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise ValueError(f"layer {i} of {type(model).__name__} has no self_attn.k_proj / v_proj; this architecture is not supported")
        out.append((attn.k_proj, attn.v_proj))
    return out


# What makes a layer's keys and values, by the attention's layout: separate projections, DeepSeek's
# latent (MLA), one fused projection (Phi-3).
KV_SOURCES = (("k_proj", "v_proj"), ("kv_a_proj_with_mqa", "kv_b_proj"), ("qkv_proj",))


def kv_sources(model) -> list[tuple[str, torch.nn.Module]]:
    """``[(label, module)]``: the modules that make the keys and values of every attention layer, in
    order (``"layer 3 k_proj"``); layers without attention (a hybrid's Mamba or convolution layers)
    add none. Raises ``ValueError`` when no layer has any."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        names = next((n for n in KV_SOURCES if attn is not None and all(hasattr(attn, x) for x in n)), ())
        out.extend((f"layer {i} {name}", getattr(attn, name)) for name in names)
    if not out:
        raise ValueError(f"no layer of {type(model).__name__} has a self_attn with K/V projections ({KV_SOURCES})")
    return out


def head_shape(config) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of a model's (text) config: ``head_dim`` is the width of one head's
    key. An MLA config (DeepSeek) keys a head with ``qk_nope + qk_rope`` channels; its own
    ``head_dim`` names the rope part alone."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_heads = cfg.num_attention_heads
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    if getattr(cfg, "qk_nope_head_dim", None) and getattr(cfg, "qk_rope_head_dim", None):
        return n_kv, int(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    return n_kv, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def read_parameter(module: nn.Module, name: str, where: str = "") -> torch.Tensor | None:
    """The full value of ``module.<name>`` (None if the module has no such tensor), detached, on the CPU.

    Args:
        where: how to name the module in errors (``"layer 3 k_proj"``).
    """
    t = getattr(module, name, None)
    if t is None:
        return None
    if is_dtensor(t):
        return t.full_tensor().detach().to("cpu")  # every rank of the mesh must get here
    if t.device.type != "meta":
        return t.detach().to("cpu")
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(module):
        raise ValueError(
            f"{where or type(module).__name__}.{name} is on the meta device and no accelerate offload hook holds its "
            "values, so the weights cannot be read; load the model with its weights (from_pretrained, or "
            "load_state_dict after building it on meta) before rdkv_hf.patch"
        )
    with align_module_device(module, torch.device("cpu")):  # the offload hook loads it, as for a forward
        return getattr(module, name).detach().to("cpu").clone()


