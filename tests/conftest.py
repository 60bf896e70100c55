import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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


@pytest.fixture(params=["llama", "qwen3", "mistral", "gemma3"])
def arch(request):
    return request.param
