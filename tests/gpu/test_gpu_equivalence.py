"""Budget 16 on the device: the patched model is the unpatched one.

float32 (16-bit zone kept in float32): token for token, greedy, a left-padded batch and beam search.
bfloat16 (16-bit zone in the model's bf16): teacher-forced decode logits no further from unpatched
sdpa than unpatched eager attention is (the noise of a different but correct attention), with a
floor of one bf16 step of the logits' scale.
"""

import pytest
import torch
from transformers import DynamicCache

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs, output_cache

from .conftest import BACKEND, assert_cache_on, tiny_model

EXACT = dict(budget=16, high_precision_dtype="float32", backend=BACKEND)


def _ids(shape, seed, device):
    return torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _case(name, device):
    """``(input ids, generate() keywords)`` of one decoding mode."""
    if name == "greedy":
        return _ids((1, 37), 1, device), {}
    if name == "padded":
        ids = _ids((2, 29), 2, device)
        mask = torch.ones_like(ids)
        ids[1, :9], mask[1, :9] = 0, 0  # left padding
        return ids, dict(attention_mask=mask)
    if name == "beam":
        return _ids((1, 25), 3, device), dict(num_beams=3)
    raise ValueError(name)


@pytest.mark.parametrize("case", ["greedy", "padded", "beam"])
def test_budget_16_fp32_is_token_for_token(arch, device, case):
    model = tiny_model(arch).to(device)
    ids, kw = _case(case, device)
    ref = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0, **kw)
    rdkv_hf.patch(model, **EXACT)
    out = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True, **kw)
    cache = output_cache(out)
    assert isinstance(cache, RDKVCache) and cache.rdkv_layers
    assert assert_cache_on(cache, ids.device) == len(cache.rdkv_layers)  # one segment a layer: the prompt
    assert out.sequences.device == ids.device
    assert torch.equal(out.sequences, ref)


def _teacher_forced(model, cache, ids, given):
    """Logits ``[steps + 1, vocab]`` float32: the prompt's last, then one per given token fed alone."""
    logits = [model(ids, **cache_kwargs(cache)).logits[0, -1]]
    for t in range(given.shape[1]):
        logits.append(model(given[:, t : t + 1], **cache_kwargs(cache)).logits[0, -1])
    return torch.stack(logits).float()


def test_budget_16_bf16_logits_within_attention_noise(arch, device):
    model = tiny_model(arch).to(device, torch.bfloat16)
    ids, given = _ids((1, 41), 4, device), _ids((1, 16), 5, device)
    with torch.inference_mode():
        sdpa = _teacher_forced(model, DynamicCache(config=model.config), ids, given)
        model.set_attn_implementation("eager")
        eager = _teacher_forced(model, DynamicCache(config=model.config), ids, given)
        model.set_attn_implementation("sdpa")
        rdkv_hf.patch(model, budget=16, backend=BACKEND)
        cache = RDKVCache(model)
        got = _teacher_forced(model, cache, ids, given)
    layer = cache.layers[cache.rdkv_layers[0]]
    assert len(layer.segments) == 1 and layer.segments[0].buffers.raw.dtype == torch.bfloat16
    assert layer.keys.shape[-2] == given.shape[1]  # the decoded tokens: the full-precision tail
    noise = (eager - sdpa).abs().max().item()
    bound = max(1.25 * noise, 2**-7 * sdpa.abs().max().item())
    err = (got - sdpa).abs().max().item()
    assert err <= bound, f"max|rdkv - sdpa| = {err:.4g} > {bound:.4g} (max|eager - sdpa| = {noise:.4g})"
