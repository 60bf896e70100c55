"""The streaming evaluation feeds the decode path in chunks that end where a block falls due; that
must compute what token-by-token decoding computes."""

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.config import RDKVConfig
from rdkv_hf.eval.stream import StreamSettings, chunk_sizes, stream_table


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


def test_stream_table_compares_with_the_full_cache():
    rows = [dict(method="full", ppl=10.0, recall=1.0, pct_bf16=200.0, max_nbytes=1, cap=None),
            dict(method="rdkv-cap", ppl=10.5, recall=1.0, pct_bf16=9.9, max_nbytes=99, cap=100)]
    table = stream_table(rows, StreamSettings("m"))
    assert "| RDKV, decode blocks + cap | 1 | 9.9% | 0.990 | 10.50 | +5.0% | 100% | 100% |" in table


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
