"""The streaming evaluation feeds the decode path in chunks that end where a block falls due; that
must compute what token-by-token decoding computes."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.config import RDKVConfig
from rdkv_hf.eval.prompts import RECALL_ANSWER
from rdkv_hf.eval.stream import StreamSettings, chunk_sizes, run_cell, stream_table


@torch.no_grad()
def _logits(model, ids, prompt, sizes):
    cache = RDKVCache(model)
    out = [model(ids[:, :prompt], **cache_kwargs(cache)).logits[:, -1:]]
    pos = prompt
    for n in sizes:
        out.append(model(ids[:, pos : pos + n], **cache_kwargs(cache)).logits)
        pos += n
    return torch.cat(out, 1)[:, :-1], cache


@pytest.mark.parametrize("cfg", [dict(mode="rdkv", budget=2.5), dict(mode="snapkv", budget=16.0),
                                 dict(mode="rdkv", budget=2.5, residual=5, decode_window=4)])
def test_chunks_that_end_where_a_block_is_due_equal_token_by_token(one_thread, cfg):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    config = RDKVConfig(**cfg, decode_block=8, compress_followups=False)
    rdkv_hf.patch(model, config=config.replace(max_cache_bytes=10**9))
    probe = RDKVCache(model)
    model(ids[:, :20], **cache_kwargs(probe))
    cap = int(rdkv_hf.cache_cap.minimum_bytes(probe.layers[0]) * 1.3)
    rdkv_hf.patch(model, config=config.replace(max_cache_bytes=cap))
    chunked, c1 = _logits(model, ids, 20, chunk_sizes(config, 20, 150))
    single, c2 = _logits(model, ids, 20, [1] * 130)
    torch.testing.assert_close(chunked, single, atol=1e-3, rtol=1e-3)  # float32 sums in another order
    assert c1.nbytes == c2.nbytes and len(c1.layers[0].segments) == len(c2.layers[0].segments)


def test_chunk_sizes_follow_the_blocks():
    cfg = RDKVConfig(decode_block=128)
    assert chunk_sizes(cfg, 64, 64 + 500) == [160, 128, 128, 84]  # keep 32 + a block, then a block at a time
    cfg = RDKVConfig(decode_block=16, residual=40)
    assert chunk_sizes(cfg, 30, 100) == [56 - 30, 16, 16, 12]  # the prompt's 30 tokens stay in the tail


@torch.no_grad()
def _greedy_without_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


@pytest.mark.parametrize("method", ["full", "rdkv"])
def test_a_cell_answers_after_the_stream_and_scores_the_code_as_whole_forwards_do(one_thread, method):
    # the answer's first token is predicted by the stream's last position (it was once the logits of
    # the position before it); the answer after the given first words, and the code's teacher-forced
    # NLL, are what forwards over the whole sequence give (budget 16 is exact, so RDKV's forks too)
    model = tiny_model("llama", vocab_size=512)
    tok = tiny_tokenizer([RECALL_ANSWER + ". In the beginning God created the heaven and the earth."] * 20)
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    settings = StreamSettings("m", prompt_tokens=20, stream_tokens=80, ppl_tokens=10, decode_block=16, budget=16.0,
                              answer_tokens=5)
    rec = run_cell(model, ids, "48213", 95, method, settings, None, tok)
    n = 5
    plain = _greedy_without_cache(model, ids, n)[0, -n:].tolist()
    assert rec["answer_plain"] == tok.decode(plain, skip_special_tokens=True)
    digits = tok("48213", add_special_tokens=False).input_ids
    lead = tok(f"{RECALL_ANSWER} 48213", add_special_tokens=False).input_ids[: -len(digits)]
    given = torch.cat([ids, torch.tensor([lead])], 1)
    assert rec["answer"] == tok.decode(_greedy_without_cache(model, given, n)[0, -n:].tolist(), skip_special_tokens=True)
    whole = torch.cat([given, torch.tensor([digits])], 1)
    logits = model(whole).logits[0, given.shape[1] - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(digits)).item()
    tol = 1e-4 if method == "full" else 1e-3  # RDKV's 16-bit width keeps a float32 model's K/V in float16
    assert rec["digit_nll"] == pytest.approx(nll, abs=tol) and rec["digits"] == len(digits) == 5
    assert rec["digits_right"] == int((logits.argmax(-1) == torch.tensor(digits)).sum())


def test_stream_table_compares_with_the_full_cache():
    rows = [dict(method="full", ppl=10.0, recall=1.0, pct_bf16=200.0, max_nbytes=1, cap=None),
            dict(method="rdkv-cap", ppl=10.5, recall=1.0, pct_bf16=9.9, max_nbytes=99, cap=100, digit_nll=0.25, recall_plain=0.0)]
    table = stream_table(rows, StreamSettings("m"))
    assert "| RDKV, decode blocks + cap | 1 | 9.9% | 0.990 | 10.50 | +5.0% | 100% | 100% | 0.25 | 0% |" in table
    assert "| full cache | 1 | 200.0% | — | 10.00 | +0.0% | 100% | 100% | — | — |" in table  # a record of before


def test_stream_table_compares_a_method_with_the_full_cache_on_its_own_samples():
    full = [dict(method="full", seed=s, ppl=p, recall=r, pct_bf16=100.0, max_nbytes=1, cap=None)
            for s, p, r in ((0, 10.0, 1.0), (1, 30.0, 0.0))]
    rows = full + [dict(method="rdkv-cap", seed=0, ppl=10.5, recall=1.0, pct_bf16=9.9, max_nbytes=99, cap=100),
                   dict(method="snapkv-cap", seed=2, ppl=11.0, recall=1.0, pct_bf16=9.9, max_nbytes=99, cap=100)]
    table = stream_table(rows, StreamSettings("m"))
    assert "| full cache | 2 | 100.0% | — | 20.00 | +0.0% | 50% | 100% |" in table
    assert "| RDKV, decode blocks + cap | 1 | 9.9% | 0.990 | 10.50 | +5.0% | 100% | 100% |" in table  # sample 0 only
    assert "| 11.00 | — | 100% | — |" in table  # no full-cache run of sample 2


def test_eval_command_takes_the_stream_task():
    from rdkv_hf.cli import build_parser

    args = build_parser().parse_args(["eval", "--tasks", "stream,ppl", "--stream-tokens", "2048", "--decode-block", "64",
                                      "--cap-share", "0.2", "--stream-methods", "full,rdkv-cap"])
    assert args.tasks == ("stream", "ppl") and args.stream_tokens == 2048 and args.decode_block == 64
    assert args.cap_share == 0.2 and args.stream_methods == ("full", "rdkv-cap")
    with pytest.raises(ValueError, match="unknown stream method"):
        StreamSettings("m", methods=("full", "kivi"))
