"""`rdkv-hf eval` and the demo's prompt on a model with sliding-window layers (a tiny random Gemma 3:
three layers, window 8, layer 2 the only full-attention one): only the global layer is compressed,
and the bytes are split into global and sliding layers."""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import DynamicCache

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.eval import runner as ev

PROMPT, CONT, WINDOW, D = 40, 8, 8, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3")


def ids(seed=0, n=PROMPT + CONT + 1):
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_global_and_sliding_bytes_are_split(model):
    pre = ev.prefill(model, ids()[:, :PROMPT])
    assert ev.compressed_layers(model) == pre.global_layers == (2,)
    # One KV head of 16 dims: K and V of every prompt token in the global layer, the last
    # window - 1 tokens in each sliding layer.
    global_bf16 = PROMPT * D * 2 * 2
    sliding_bf16 = 2 * (WINDOW - 1) * D * 2 * 2
    assert pre.global_bf16_bytes == global_bf16
    assert pre.bf16_bytes == global_bf16 + sliding_bf16
    s = ev.EvalSettings("tiny-gemma", methods=("full", "rdkv"))
    rdkv_hf.patch(model, budget=16)
    try:
        for spec, budget in (("full", None), ("rdkv", 2.5), ("snapkv", 2.5)):
            method = ev.parse_method(spec)
            cache = ev.build_cache(model, pre, method, budget)
            rec = ev._record(s, "ppl", method, budget, PROMPT, 0, pre, ev.layer_nbytes(cache), 0.0)
            assert rec["sliding_nbytes"] == 2 * sliding_bf16  # float32 model: the same in every method
            assert rec["nbytes"] == rec["global_nbytes"] + rec["sliding_nbytes"] == ev.cache_nbytes(cache)
            assert rec["global_layers"] == [2] and rec["n_layers"] == 3
            assert rec["pct_global_bf16"] == pytest.approx(100 * rec["global_nbytes"] / global_bf16)
            assert rec["bits_per_element"] == pytest.approx(16 * rec["global_nbytes"] / global_bf16)
            if spec == "full":
                assert rec["global_nbytes"] == 2 * global_bf16 and rec["pct_global_bf16"] == 200.0
            else:
                assert isinstance(cache.layers[2], rdkv_hf.cache.RDKVLayer)
                assert rec["global_nbytes"] == cache.layers[2].nbytes
                tables = sum(seg.table_nbytes for seg in cache.layers[2].segments)  # not part of the budget
                assert 16 * (rec["global_nbytes"] - tables) / global_bf16 <= 2.5 + 1e-9
    finally:
        rdkv_hf.unpatch(model)


def test_shared_prefill_matches_the_patched_model(model):
    x = ids(1)
    pre = ev.prefill(model, x[:, :PROMPT])
    rdkv_hf.patch(model, budget=2.5, compress_followups=False)
    try:
        with torch.no_grad():
            shared = ev.build_cache(model, pre, ev.parse_method("rdkv"), 2.5)
            got = model(x[:, PROMPT:], **cache_kwargs(shared)).logits
            direct = RDKVCache(model)
            model(x[:, :PROMPT], **cache_kwargs(direct))
            ref = model(x[:, PROMPT:], **cache_kwargs(direct)).logits
    finally:
        rdkv_hf.unpatch(model)
    assert ev.layer_nbytes(shared) == ev.layer_nbytes(direct)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = model(x[:, PROMPT:], **cache_kwargs(ev.build_cache(model, pre, ev.parse_method("full"), None))).logits
        cache = DynamicCache(config=model.config)
        model(x[:, :PROMPT], **cache_kwargs(cache))
        torch.testing.assert_close(full, model(x[:, PROMPT:], **cache_kwargs(cache)).logits, atol=1e-5, rtol=1e-5)


def test_eval_reports_global_shares_and_skips_quanto(model, tmp_path, caplog):
    s = ev.EvalSettings("tiny-gemma", tasks=("ppl", "distortion"), methods=("full", "rdkv", "snapkv", "quanto-2"),
                        budgets=(0.4, 1.6), windows=1, ppl_length=PROMPT, continuation=CONT)
    recs = ev.evaluate(model, None, s, tmp_path, window_ids=[ids()], progress=False)
    assert {r["method"] for r in recs} == {"full", "rdkv", "snapkv"}
    assert "skipping quanto-2" in caplog.text
    pre = ev.prefill(model, ids()[:, :PROMPT])
    rdkv_hf.patch(model, budget=16)
    try:
        for r in recs:
            if r["method"] != "full":  # the packed tokens within the budget; the tables on top
                cache = ev.build_cache(model, pre, ev.parse_method(r["method"]), r["budget"])
                tables = sum(seg.table_nbytes for seg in cache.layers[2].segments)
                assert r["global_nbytes"] == cache.layers[2].nbytes
                assert 100 * (r["global_nbytes"] - tables) / r["global_bf16_bytes"] <= 100 * r["budget"] / 16 + 1e-9
                assert r["pct_bf16"] > r["pct_global_bf16"]  # the sliding layers are not compressed
    finally:
        rdkv_hf.unpatch(model)
    table = (tmp_path / "table.md").read_text()
    assert "% of global bf16" in table and "layers 2" in table and "sliding" in table
    assert "QuantizedCache supports only models whose layers are all full attention" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"global_nbytes", "sliding_nbytes", "pct_global_bf16"} <= set(data["cells"][0])


def test_eval_settings_accept_budgets_below_one_bit():
    s = ev.EvalSettings("x", budgets=(0.4, 1.6))
    assert s.budgets == (0.4, 1.6)
    assert ev.check_cell(ev.parse_method("rdkv"), 0.4) is None


@pytest.mark.parametrize("T,window", [(37, 8), (64, 16), (9, 8)])
def test_blocked_sliding_prompt_attention_equals_the_masked_one(T, window):
    from rdkv_hf.eval.methods import _sliding_prompt_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, h, T, 16, generator=g) for h in (4, 2, 2))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (j > i - window)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(_sliding_prompt_attention(q, k, v, window, 0.3), ref, atol=1e-6, rtol=1e-5)


def test_prefill_logits_and_kv_match_the_plain_model(model):
    x = ids(2)[:, :PROMPT]
    pre = ev.prefill(model, x)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(x, **cache_kwargs(cache)).logits[0, -1]
    torch.testing.assert_close(pre.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre.keys[2], cache.layers[2].keys, atol=1e-5, rtol=1e-5)


def test_ruler_cells_of_a_base_model_use_raw_prompts(tmp_path):
    from rdkv_hf.eval import tasks

    tok = tiny_tokenizer([tasks.NOISE] * 20)
    assert tok.chat_template is None
    model = tiny_model("gemma3", vocab_size=len(tok))
    s = ev.EvalSettings("tiny-gemma", tasks=("ruler",), methods=("full", "rdkv", "streamingllm"), budgets=(1.6,),
                        lengths=(500,), ruler_tasks=("niah_single",), samples=1)
    recs = ev.evaluate(model, tok, s, tmp_path, progress=False)
    assert len(recs) == 3 and all(r["chat"] is False for r in recs)
    sample = tasks.niah_single(tok, 500, 0, chat=False)
    assert all(r["prompt_tokens"] == sample.n_prompt_tokens for r in recs)
    table = (tmp_path / "table.md").read_text()
    assert "Prompts: raw text (no chat template)" in table and "% of global bf16 | total % of bf16" in table


def test_cli_eval_uses_the_gemma_long_context_defaults(monkeypatch, tmp_path):
    from rdkv_hf import cli
    from rdkv_hf.eval import models

    seen = {}

    def fake_evaluate(model, tokenizer, settings, out, profile=None):
        seen["settings"] = settings
        (tmp_path / "table.md").write_text("table")

    monkeypatch.setattr(models, "load_model", lambda name: (None, None))
    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    assert cli.main(["eval", "--model", "gemma3-270m", "--no-profile", "--out", str(tmp_path), "--samples", "3"]) == 0
    s = seen["settings"]
    assert s.lengths == (4096, 8192, 16384) and s.ppl_length == 8192 and s.budgets == (0.4, 1.6, 2.5)
    assert s.haystack == "text" and s.windows == 2 and s.samples == 3
    cli.main(["eval", "--model", "smollm2-135m", "--no-profile", "--out", str(tmp_path)])
    assert seen["settings"].lengths == ev.DEFAULT_LENGTHS and seen["settings"].haystack == "noise"
