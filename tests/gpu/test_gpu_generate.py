"""Compressed generation on the device: budget 2.5, every packed tensor on the model's device, the
Triton decode path giving the torch reference's tokens (also with decoded blocks under a byte cap),
and a model split across two GPUs."""

import copy

import pytest
import torch

import rdkv_hf
from rdkv_hf import RDKVCache, cache_cap
from rdkv_hf.compat import cache_kwargs, output_cache

from .conftest import BACKEND, DRY_RUN, assert_cache_on, needs_triton, tiny_model

BUDGET = 2.5


def _full_layers(model):
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


def _prompt(device, batch=2, length=40, pad=7, seed=4):
    """Random ids ``[batch, length]`` with the last row left-padded by `pad`, and the mask."""
    ids = torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(ids)
    ids[-1, :pad], mask[-1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compressed_generate_stays_on_device_within_budget(arch, device, dtype, sampling):
    model = tiny_model(arch).to(device, dtype)
    ids, mask = _prompt(device)
    rdkv_hf.patch(model, budget=BUDGET, backend=BACKEND)
    torch.manual_seed(0)
    kw = dict(do_sample=True, top_k=10) if sampling else dict(do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, return_dict_in_generate=True, **kw)
    assert out.sequences.shape == (2, 48) and out.sequences.device == ids.device
    cache = output_cache(out)
    assert isinstance(cache, RDKVCache) and cache.rdkv_layers == _full_layers(model)
    assert assert_cache_on(cache, ids.device) == len(cache.rdkv_layers)
    summary = cache.summary()
    assert 0 < summary.prompt_bits_per_element <= BUDGET
    keep = model.dtype if dtype != torch.float32 else torch.float16
    assert all(cache.layers[i].segments[0].buffers.raw.dtype == keep for i in cache.rdkv_layers)
    assert all(cache.layers[i].keys.shape[-2] == 7 for i in cache.rdkv_layers)  # decoded tokens only


@needs_triton
def test_triton_decode_generates_the_torch_reference_tokens(arch, device):
    """The same packed prompt cache decoded by the Triton kernel and by the torch reference."""
    model = tiny_model(arch).to(device)
    ids, mask = _prompt(device, seed=5)
    seqs = {}
    for backend in ("torch", "triton"):
        rdkv_hf.patch(model, budget=BUDGET, backend=backend)
        seqs[backend] = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(seqs["triton"], seqs["torch"])


@pytest.mark.parametrize("capped", [False, True], ids=["blocks", "cap"])
def test_decoded_blocks_and_the_cap_on_the_device(arch, device, capped, monkeypatch):
    """Generated tokens packed in blocks of 16 (under a byte cap, re-allocated to fit) on the device:
    the decode path's tokens are the torch reference's, every segment is on the device, the cap holds."""
    repacked = []  # parts the cap re-packed at new widths (a tighter cap evicts the old part whole)
    repack = cache_cap._repack
    monkeypatch.setattr(cache_cap, "_repack", lambda *args: repacked.append(args[0]) or repack(*args))
    model = tiny_model(arch).to(device)
    ids, mask = _prompt(device, seed=8)
    settings = dict(budget=BUDGET, decode_block=16)
    if capped:
        rdkv_hf.patch(model, **settings, max_cache_bytes=10**9)
        probe = RDKVCache(model)
        model(ids, attention_mask=mask, **cache_kwargs(probe))
        settings["max_cache_bytes"] = int(1.3 * cache_cap.minimum_bytes(probe.layers[probe.rdkv_layers[0]]))
    seqs, caches, repacks = {}, {}, {}
    for backend in dict.fromkeys(("torch", BACKEND)):
        rdkv_hf.patch(model, **settings, backend=backend)
        repacked.clear()
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=120, min_new_tokens=120,
                             pad_token_id=0, return_dict_in_generate=True)
        seqs[backend], caches[backend], repacks[backend] = out.sequences, output_cache(out), len(repacked)
    assert torch.equal(seqs[BACKEND], seqs["torch"])
    cache = caches[BACKEND]
    decoded = [s for i in cache.rdkv_layers for s in cache.layers[i].segments if s.decoded]
    assert decoded, "no decoded block was packed"
    assert assert_cache_on(cache, ids.device) >= len(decoded)
    if capped:
        assert cache.nbytes <= settings["max_cache_bytes"] and repacks[BACKEND], "the cap never re-packed a part"


def _two_devices():
    """The two devices to split a model across (the CPU twice in the dry run: the split and the
    checks still run, through the same device_map code)."""
    if DRY_RUN:
        return [torch.device("cpu")] * 2
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"needs 2 CUDA devices to split a model's layers, found {n}")
    return [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_layers_split_across_two_devices():
    from accelerate import dispatch_model

    d0, d1 = _two_devices()
    base = tiny_model("llama", num_hidden_layers=4)
    ref_model = copy.deepcopy(base).to(d0)
    ids, mask = _prompt(d0, seed=6)
    rdkv_hf.patch(ref_model, budget=BUDGET, backend=BACKEND)
    ref = ref_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)

    layer_dev = {0: d0, 1: d0, 2: d1, 3: d1}
    device_map = {"model.embed_tokens": str(d0), "model.rotary_emb": str(d0), "model.norm": str(d1), "lm_head": str(d1)}
    device_map.update({f"model.layers.{i}": str(d) for i, d in layer_dev.items()})
    model = dispatch_model(base, device_map=device_map)
    assert [l.self_attn.k_proj.weight.device for l in model.model.layers] == list(layer_dev.values())
    rdkv_hf.patch(model, budget=BUDGET, backend=BACKEND)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0, return_dict_in_generate=True)
    cache = output_cache(out)
    assert cache.rdkv_layers == [0, 1, 2, 3]
    assert assert_cache_on(cache, layer_dev) == 4
    assert 0 < cache.summary().prompt_bits_per_element <= BUDGET
    assert torch.equal(out.sequences.to(d0), ref)


def test_layer_offloaded_to_the_cpu_with_a_profile(tmp_path, device):
    """One GPU and a layer accelerate offloads to the CPU (its weights on meta between forwards, run
    on the GPU): the profile check reads the offloaded weights, the patched model generates what it
    does in memory with the same settings, and every layer's cache is on the GPU."""
    from transformers import AutoModelForCausalLM

    from rdkv_hf.calibration import calibrate

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    calibrate(base, torch.randint(1, 128, (3, 40), generator=torch.Generator().manual_seed(0)), progress=False).save_pretrained(tmp_path / "profile")
    settings = dict(budget=BUDGET, profile=str(tmp_path / "profile"), backend=BACKEND)
    ids, mask = _prompt(device, seed=7)
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).to(device).eval()
    rdkv_hf.patch(ref_model, **settings)
    ref = ref_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)

    gpu = str(device) if device.type == "cuda" else "cpu"
    device_map = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.layers.0": gpu, "model.layers.1": "cpu",
                  "model.norm": gpu, "lm_head": gpu}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32, device_map=device_map).eval()
    if device.type == "cuda":
        assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"  # offloaded, runs on the GPU
    rdkv_hf.patch(model, **settings)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert assert_cache_on(output_cache(out), ids.device) == 2
