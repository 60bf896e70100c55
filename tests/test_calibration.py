import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import rdkv_hf
from rdkv_hf.calibration import EPS_WIDTHS, calibrate, fit_exponential
from rdkv_hf.compat import cache_kwargs, output_cache
from rdkv_hf.head_budgets import ratequant_bits
from rdkv_hf.quant import fake_quantize


def calib_ids(n=4, T=48, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """Offline stand-in for a tokenizer: one id per character, modulo the tiny vocab."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.fixture(scope="module")
def llama_profile():
    model = tiny_model("llama")
    return model, calibrate(model, calib_ids(), batch_size=3, progress=False)


def reference_sensitivity(model, ids):
    """dLoss/d(k_proj, v_proj outputs) by forward hooks: the paper's definition, computed apart."""
    outs = []

    def hook(module, args, output):
        output.retain_grad()
        outs.append(output)

    handles = [m.register_forward_hook(hook) for layer in model.model.layers for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1).sum()
    loss.backward()
    for h in handles:
        h.remove()
    H, D = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    B, T = ids.shape
    norms = [o.grad.reshape(B, T, H, D).square().sum((0, 1, 3)) / (B * T) for o in outs]
    return torch.stack(norms[0::2]), torch.stack(norms[1::2])


def test_profile_tensors_are_sane(llama_profile):
    _, prof = llama_profile
    L, H = 2, 2
    for name in ("sens_k", "sens_v", "alpha_k", "alpha_v", "beta_k", "beta_v", "r2_k", "r2_v", "power_k", "power_v"):
        t = getattr(prof, name)
        assert t.shape == (L, H) and torch.isfinite(t).all(), name
    assert (prof.sens_k > 0).all() and (prof.sens_v > 0).all()
    assert (prof.alpha_k > 0).all() and (prof.alpha_v > 0).all()
    assert (prof.beta_k > 1).all() and (prof.beta_v > 1).all()
    # min-max quantization loses about 2 bits of error energy (x4-x6) per extra bit
    assert (prof.beta_k > 3).all() and (prof.beta_v < 7).all()
    assert (prof.r2_k > 0.95).all() and (prof.r2_v <= 1).all()
    assert prof.dist_k.shape == (L, H, 5)
    assert (prof.dist_k.diff(dim=-1) < 0).all() and (prof.dist_v.diff(dim=-1) < 0).all()
    assert prof.calibration["n_seqs"] == 4 and prof.calibration["seq_len"] == 48
    assert prof.calibration["widths"] == [2, 3, 4, 5, 6]


def test_sensitivity_equals_gradient_at_the_projection_outputs(llama_profile):
    # RoPE is a rotation, so the post-RoPE gradient norm the calibration reads from the cache equals
    # the norm at k_proj's output, where the paper defines it.
    model, prof = llama_profile
    ids = calib_ids()
    for p in model.parameters():
        p.requires_grad_(False)
    ref_k, ref_v = reference_sensitivity(model, ids)
    torch.testing.assert_close(prof.sens_k, ref_k.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(prof.sens_v, ref_v.float(), rtol=1e-4, atol=0)


def test_distortion_and_eps_match_a_direct_measurement(llama_profile):
    model, prof = llama_profile
    ids = calib_ids()
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    for layer in range(2):
        k, v = cache.layers[layer].keys, cache.layers[layer].values  # [B, H, T, D]
        for j, b in enumerate([2, 3, 4, 5, 6]):
            rel_k = (k - fake_quantize(k, b, dim=2)).square().sum((0, 2, 3)) / k.square().sum((0, 2, 3))
            rel_v = (v - fake_quantize(v, b, dim=-1)).square().sum((0, 2, 3)) / v.square().sum((0, 2, 3))
            torch.testing.assert_close(prof.dist_k[layer, :, j], rel_k, rtol=1e-4, atol=0)
            torch.testing.assert_close(prof.dist_v[layer, :, j], rel_v, rtol=1e-4, atol=0)
        for j, b in enumerate(EPS_WIDTHS):
            eps_v = (v - fake_quantize(v, b, dim=-1)).square().sum() / v.square().sum()
            eps_k = ((k - fake_quantize(k, b, dim=2)).square().mean(2) / k.var(2, unbiased=False)).mean()
            torch.testing.assert_close(prof.eps_v[layer, j], eps_v, rtol=1e-4, atol=0)
            torch.testing.assert_close(prof.eps_k[layer, j], eps_k, rtol=1e-4, atol=0)
        torch.testing.assert_close(prof.power_k[layer], k.square().mean((0, 2, 3)), rtol=1e-5, atol=0)
    torch.testing.assert_close(prof.eps_k_global, prof.eps_k.mean(0))
    ek, ev = prof.eps_tables()
    assert ek[0] == 1.0 and ek[16] == 0.0 and 1 > ek[2] > ek[4] > ek[8] > 0
    assert 1 > ev[2] > ev[4] > ev[8] > 0


def test_fit_recovers_an_exact_exponential():
    widths = [2, 3, 4, 5, 6]
    b = torch.tensor(widths, dtype=torch.float64)
    dist = torch.stack([1.7 * 4.2 ** -b, 0.3 * 5.1 ** -b])
    alpha, beta, r2 = fit_exponential(dist, widths)
    torch.testing.assert_close(alpha, torch.tensor([1.7, 0.3], dtype=torch.float64))
    torch.testing.assert_close(beta, torch.tensor([4.2, 5.1], dtype=torch.float64))
    torch.testing.assert_close(r2, torch.ones(2, dtype=torch.float64))
    noisy = dist * torch.tensor([[1.0, 1.5, 0.7, 1.2, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert fit_exponential(noisy, widths)[2][0] < 0.999


@pytest.mark.parametrize("arch", ["qwen3", "mistral-sliding"])
def test_other_architectures(arch):
    model = tiny_model(arch)
    prof = calibrate(model, calib_ids(n=2, T=40), progress=False)
    assert prof.fingerprint["model_type"] == model.config.model_type
    assert prof.fingerprint["head_dim"] == (16 if arch == "qwen3" else 16)
    assert (prof.sens_k > 0).all() and (prof.beta_v > 1).all()
    kb, vb = ratequant_bits(prof, 2.5)
    assert int(kb.sum() + vb.sum()) == round(2.5 * 2 * 2 * 2)


@pytest.mark.parametrize("arch,layers", [("llama", [0, 1]), ("gemma3", [2]), ("mistral-sliding", [])])
def test_compressed_layers_are_the_full_attention_ones(arch, layers):
    prof = calibrate(tiny_model(arch), calib_ids(n=1, T=24), progress=False)
    assert prof.compressed_layers == layers


def test_batching_does_not_change_the_result(llama_profile):
    model, prof = llama_profile
    again = calibrate(model, calib_ids(), batch_size=4, progress=False)
    torch.testing.assert_close(again.sens_k, prof.sens_k, rtol=1e-4, atol=0)
    torch.testing.assert_close(again.dist_v, prof.dist_v, rtol=1e-5, atol=0)


def test_model_state_is_restored():
    model = tiny_model("llama")
    model.train()
    model.lm_head.weight.requires_grad_(True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    calibrate(model, calib_ids(n=1, T=16), progress=False)
    assert model.training
    assert model.lm_head.weight.requires_grad
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_strings_and_default_text_go_through_the_tokenizer():
    model = tiny_model("llama")
    texts = ["In the beginning God created the heaven and the earth. " * 20, "And the earth was without form. " * 20]
    prof = calibrate(model, texts, tokenizer=CharTokenizer(), n_seqs=3, seq_len=32, progress=False)
    assert prof.calibration["n_seqs"] == 3 and "texts" in prof.calibration["source"]
    prof = calibrate(model, tokenizer=CharTokenizer(), n_seqs=2, seq_len=24, seed=1, progress=False)
    assert "calib" in prof.calibration["source"] and prof.calibration["seed"] == 1


@pytest.mark.parametrize(
    "texts,kwargs,match",
    [
        (None, {}, "tokenizer"),
        (["too short"], dict(tokenizer=CharTokenizer(), n_seqs=2, seq_len=64), "fewer than"),
        (torch.zeros(2, 8), {}, "LongTensor"),
        (calib_ids(), dict(widths=[4]), "widths"),
        (calib_ids(), dict(batch_size=0), "batch_size"),
        ("a string", dict(tokenizer=CharTokenizer()), "list of strings"),
    ],
)
def test_bad_arguments_are_named(texts, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(tiny_model("llama"), texts, progress=False, **kwargs)


def test_a_patched_model_is_refused():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.raises(ValueError, match="unpatch"):
        calibrate(model, calib_ids(n=1, T=16), progress=False)


def test_rdkv_curves_match_the_cache_on_the_first_layer(llama_profile):
    """Layer 0 sees the same input with any cache, so its measured curve is the error a patched
    model makes there: prompt = the first 3/4 of the sequence, compressed; the rest attends to it."""
    import rdkv_hf
    from rdkv_hf.calibration import RD_BUDGETS, RD_PROMPT, RD_QUERY_STRIDE, RD_SEQS

    model, prof = llama_profile
    ids = calib_ids()[:RD_SEQS]  # the calibration sequences the curves are measured on
    P = int(ids.shape[1] * RD_PROMPT)
    H, g, D = 2, 2, 16

    def layer0_outputs():
        got = []
        hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        return got, hook

    err = torch.zeros(H, len(RD_BUDGETS), dtype=torch.float64)
    with torch.no_grad():
        got, hook = layer0_outputs()
        model(ids)
        hook.remove()
        exact = got[0][:, P::RD_QUERY_STRIDE]  # the queries measured
        for j, b in enumerate(RD_BUDGETS):
            rdkv_hf.patch(model, budget=b, compress_followups=False)
            cache = rdkv_hf.RDKVCache(model)
            model(ids[:, :P], **cache_kwargs(cache))
            got, hook = layer0_outputs()
            model(ids[:, P:], **cache_kwargs(cache))
            hook.remove()
            rdkv_hf.unpatch(model)
            diff = (got[0][:, ::RD_QUERY_STRIDE] - exact).reshape(ids.shape[0], -1, H, g, D).square()
            err[:, j] = diff.sum((0, 1, 3, 4)).double() / (ids.shape[0] * exact.shape[1] * g * D)
    assert torch.allclose(prof.rd_dist[0].double(), err, rtol=1e-3, atol=1e-9)
    assert (prof.rd_dist[:, :, -1] < prof.rd_dist[:, :, 0]).all() and (prof.sens_o > 0).all()


def test_rdkv_curves_cover_only_compressed_layers():
    model = tiny_model("gemma3")
    prof = calibrate(model, calib_ids(n=2, T=40), progress=False)
    assert prof.compressed_layers == [2]
    assert (prof.rd_dist[:2] == 0).all() and (prof.rd_dist[2] > 0).all() and (prof.sens_o[2] > 0).all()


def test_rdkv_curves_use_only_the_first_sequences(monkeypatch):
    """The curves come from the first RD_SEQS sequences, also when that count ends inside a batch."""
    import sys

    model = tiny_model("llama")
    ids = calib_ids(n=4)
    monkeypatch.setattr(sys.modules["rdkv_hf.calibration"], "RD_SEQS", 2)
    four = calibrate(model, ids, batch_size=3, progress=False)
    two = calibrate(model, ids[:2], progress=False)
    assert torch.allclose(four.rd_dist, two.rd_dist, rtol=1e-5) and torch.allclose(four.sens_o, two.sens_o, rtol=1e-5)
    assert four.calibration["rd_seqs"] == 2 and not torch.allclose(four.sens_k, two.sens_k)
