"""Many questions over one packed context: forks share the packed segments and keep their own
tails; a padded batch of questions answers as the questions asked one by one."""

import pytest
import torch
from conftest import TINY_CHAT, TINY_CORPUS, tiny_model, tiny_tokenizer

import rdkv_hf
from rdkv_hf.cache import held_nbytes
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.context import ask, context_prompt, prefill, question_batch, question_ids

CTX = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
QUESTIONS = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 5, 1)]


def test_forks_share_the_packed_context_and_keep_their_own_tails(one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    cache = prefill(model, CTX)
    context = held_nbytes([cache])
    forks = [cache.fork() for _ in QUESTIONS]
    for fork, q in zip(forks, QUESTIONS):
        assert fork.layers[1].segments[0] is cache.layers[1].segments[0]
        ids = torch.cat([CTX, torch.tensor([q])], 1)
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(fork), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    one = held_nbytes(forks[:1])
    together = held_nbytes(forks)
    print(f"packed context {context} B, one fork {one} B, {len(forks)} forks {together} B")
    assert together < len(forks) * one
    # Exactly: the context once, plus what each fork added (its question's segment and its tail).
    assert together == context + sum(held_nbytes([f]) - context for f in forks)
    # Each its own tail: 5 decoded tokens (and a one-token question, which is not compressed).
    assert [f.layers[0].keys.shape[2] for f in forks] == [5 + (len(q) == 1) for q in QUESTIONS]
    assert cache.get_seq_length() == 60 and cache.layers[0].keys.shape[2] == 0  # the context is untouched
    assert len(cache.layers[0].segments) == 1


def test_fork_repeats_rows_without_copying_segments(one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    cache = prefill(model, CTX)
    batch = cache.fork(4)
    seg, seg4 = cache.layers[0].segments[0], batch.layers[0].segments[0]
    assert seg4.batch == 4 and seg4.buffers.words.data_ptr() == seg.buffers.words.data_ptr()
    assert held_nbytes([cache, batch]) - held_nbytes([cache]) < 1000  # head tables and token ids, no codes
    assert batch.context_ids.shape == (4, 60)
    with pytest.raises(ValueError, match="positive int"):
        cache.fork(0)


def test_a_one_row_cache_refuses_a_batch_with_the_fix(one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    cache = prefill(model, CTX)
    with pytest.raises(ValueError, match=r"holds 1 batch rows and the forward has 3.*cache.fork\(3\)"):
        model(torch.randint(0, 128, (3, 2)), **cache_kwargs(cache))


def test_question_batch_pads_between_the_context_and_each_question():
    ids, mask = question_batch(torch.tensor([[7, 8, 9]]), [[1], [2, 3, 4]], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9, 0, 0, 1], [7, 8, 9, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="one row"):
        question_batch(torch.ones(2, 3, dtype=torch.long), [[1]], 0)
    with pytest.raises(ValueError, match="at least one token"):
        question_batch(torch.ones(1, 3, dtype=torch.long), [[1], []], 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_a_batch_of_questions_answers_as_one_by_one_at_budget_16(arch, one_thread):
    model = rdkv_hf.patch(tiny_model(arch), budget=16, high_precision_dtype="float32")
    model.generation_config.eos_token_id = None  # eight tokens each, whatever they are
    cache = prefill(model, CTX)
    batched = ask(model, cache, QUESTIONS, max_new_tokens=8)
    one_by_one = ask(model, cache, QUESTIONS, batch_size=1, max_new_tokens=8)
    assert batched == one_by_one
    assert len({len(a) for a in batched}) == 1 and len(batched[0]) == 8
    # ... and as the unpatched model answers each question after the whole context in one prompt.
    rdkv_hf.unpatch(model)
    for q, answer in zip(QUESTIONS, batched):
        ids = torch.cat([CTX, torch.tensor([q])], 1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == answer


def test_ask_needs_the_context_ids(one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    cache = prefill(model, CTX)
    cache.context_ids = None
    with pytest.raises(ValueError, match="context's token ids"):
        ask(model, cache, QUESTIONS)




@pytest.mark.parametrize("chat", [True, False])
def test_context_prompt_and_question_ids_make_the_whole_prompt(chat):
    tok = tiny_tokenizer(TINY_CORPUS, special_tokens=("<s>", "</s>", "<|user|>", "<|assistant|>"), chat_template=TINY_CHAT, add_bos=True)
    ids, template = context_prompt(tok, "In the beginning.", chat=chat)
    q = question_ids(tok, template, "What is the code?")
    text = tok.decode(ids + q)
    if chat:
        assert text == "<|user|>In the beginning.\n\nWhat is the code?</s><|assistant|>"
    else:
        assert text == "<s>In the beginning.\n\nQuestion: What is the code?\nAnswer:"
    with pytest.raises(ValueError, match="empty"):
        question_ids(tok, template, "  ")
