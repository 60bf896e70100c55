"""The identity of a model for a profile (and a saved cache): its architecture, shapes and hashes
of its K/V projection weights.

The weights are read through whatever holds them (:func:`rdkv_hf.weights.read_parameter`): a
tensor-parallel model's sharded weights are gathered whole, an offloaded model's are read through
accelerate's offload hook, so a model hashes the same on one device, across any number of ranks and
split or offloaded by ``device_map``.

Two hashes, each of the weights rounded to a 16-bit format, identify the weights at the precision
a model may be loaded in:

* ``weights_sha256`` (bfloat16): a float32 and a bfloat16 load of the same checkpoint agree (a
  bfloat16 load rounds each weight as this hash does);
* ``weights_sha256_fp16`` (float16): a float32 and a float16 load of the same checkpoint agree.

A float16 load does not round like a bfloat16 one, so each load is identified by the hash at its own
precision (:func:`same_weights`). Norms, which weights that differ can share (rows permuted, signs
flipped), identify nothing and are not compared.
"""

from __future__ import annotations

import hashlib

import torch

from .weights import head_shape, kv_projections, kv_sources, read_parameter

FINGERPRINT_KEYS = ("model_type", "architecture", "num_layers", "num_kv_heads", "head_dim", "weights_sha256")
HASHES = {"weights_sha256": torch.bfloat16, "weights_sha256_fp16": torch.float16}  # key -> the rounding it hashes


def fingerprint(model) -> dict:
    """Identity of a model for a profile: architecture, shapes and the hashes of its K/V projections.

    Each hash is the first 16 hex chars of a sha256 over the K and V projection weights (and biases)
    of every attention layer, in order (:func:`~rdkv_hf.weights.kv_sources`: a latent model's
    ``kv_a_proj_with_mqa`` and ``kv_b_proj``, a fused ``qkv_proj``), rounded to the hash's 16-bit
    format (:data:`HASHES`). Under tensor parallelism every rank must call it (the shards are gathered).
    """
    cfg = model.config.get_text_config(decoder=True)  # a VLM's shapes are its text decoder's
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    hashes = {key: hashlib.sha256() for key in HASHES}
    for label, module in kv_sources(model):
        for name in ("weight", "bias"):
            t = read_parameter(module, name, where=label)
            if t is None:
                continue
            for key, dtype in HASHES.items():
                r = t.to(dtype).contiguous()
                hashes[key].update(f"{name}{tuple(r.shape)}".encode())
                hashes[key].update(r.view(torch.int16).numpy().tobytes())
    n_kv, head_dim = head_shape(cfg)
    return {
        "model_type": model.config.model_type,
        "architecture": archs[0],
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        **{key: h.hexdigest()[:16] for key, h in hashes.items()},
    }


def same_shape(a: dict, b: dict) -> bool:
    """Whether two fingerprints describe the same architecture and shapes."""
    return all(str(a.get(k)) == str(b.get(k)) for k in FINGERPRINT_KEYS[:-1])


def same_weights(a: dict, b: dict) -> bool:
    """Whether two fingerprints hash the same weights at a 16-bit precision both recorded (profiles
    saved before ``weights_sha256_fp16`` hold only the bfloat16 hash)."""
    return any(a.get(key) is not None and a.get(key) == b.get(key) for key in HASHES)


def weight_norms(model) -> torch.Tensor:
    """``[layers, 2]`` Frobenius norms of each layer's K and V projection weights (float64 sums).
    Profiles record them for reference; they do not identify the weights (see :func:`same_weights`)."""
    return torch.tensor(
        [[read_parameter(m, "weight", where=f"layer {i}").double().norm().item() for m in pair] for i, pair in enumerate(kv_projections(model))],
        dtype=torch.float32, device="cpu",
    )


def describe(fp: dict) -> str:
    keys = FINGERPRINT_KEYS + tuple(k for k in HASHES if k not in FINGERPRINT_KEYS and fp.get(k) is not None)
    return ", ".join(f"{k}={fp.get(k)}" for k in keys)
