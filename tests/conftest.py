import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# One tolerance table for float comparisons across the suite.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
    # A wide init makes the logits of a random model peaked, so greedy choices are not near-ties.
    initializer_range=0.2,
)


def tiny_model(arch: str, **overrides):
    """A seeded random model: 'llama', 'qwen3', 'mistral' (no window), 'mistral-sliding' or 'gemma3'
    (sliding window 8, one global layer in three)."""
    torch.manual_seed(0)
    kw = dict(_COMMON, **overrides)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    elif arch == "gemma3":
        kw = dict(kw, num_hidden_layers=3, sliding_window=8, sliding_window_pattern=3, head_dim=16, num_key_value_heads=1)
        kw.setdefault("layer_types", ["sliding_attention", "sliding_attention", "full_attention"])
        kw.pop("sliding_window_pattern")
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    elif arch == "mistral-sliding":
        model = MistralForCausalLM(MistralConfig(sliding_window=4096, **kw))
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(autouse=True)
def compress_short_prompts(request, monkeypatch):
    """The tiny models' prompts are a few dozen tokens: by default (``RDKVConfig.min_tokens``, 512)
    RDKV would keep them whole, and (``observe``, 16) pack them only after 16 decode steps. Tests
    compress them at their forward, unless marked ``library_defaults`` (``test_observe.py`` sets
    ``observe`` itself)."""
    if request.node.get_closest_marker("library_defaults") is None:
        import rdkv_hf.config

        monkeypatch.setattr(rdkv_hf.config, "DEFAULT_MIN_TOKENS", 0)
        monkeypatch.setattr(rdkv_hf.config, "DEFAULT_OBSERVE", 0)


@pytest.fixture
def one_thread():
    """Tiny ops are dominated by thread start-up, and on a shared CPU two threads can be 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer(corpus: list[str], vocab_size: int = 400, special_tokens=("<s>", "</s>"), chat_template=None,
                   add_bos: bool = False):
    """A byte-level BPE tokenizer trained on `corpus` in about a second; the first two special
    tokens are BOS and EOS. `add_bos`: prepend BOS like a base model's (Gemma) tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens))
    backend.train_from_iterator(corpus, trainer)
    bos, eos = special_tokens[:2]
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tok.chat_template = chat_template
    return tok


# A chat template and a corpus for tiny tokenizers of compress-once tests (tests/test_context.py, tests/test_cli.py).
TINY_CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
TINY_CORPUS = ["In the beginning God created the heaven and the earth. What is the code? The code is 48213."] * 20


@pytest.fixture(params=["llama", "qwen3", "mistral", "gemma3"])
def arch(request):
    return request.param


def run_triton_tests_in_interpreter(test_file: str) -> None:
    """Run `test_file`'s ``test_triton_*`` tests in a child pytest under ``TRITON_INTERPRET=1``:
    Triton picks interpreter or compiler when it is imported, and this process imported it already
    (through transformers). Fails unless they all ran and passed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "test_triton_"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(test_file))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.strip().splitlines()[-1], proc.stdout[-2000:]
