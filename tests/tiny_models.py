"""A tiny seeded random model of every model type in the support matrix, built from its config
(two to four layers, odd head counts and GQA ratios, vocabulary 128), and what each test needs to
know about it. ``TINY``'s keys are the registry's model types (tests/test_architectures.py checks).

Ids 120-123 are the VLMs' image and delimiter tokens; text prompts draw from 3-99. Mixture-of-experts
models route every token to every expert: a discrete choice of experts would turn bf16 rounding
(RDKV's or anyone's) into a different expert, a jump no noise bound can hold.
"""

import torch
import transformers
from transformers import AutoConfig

from rdkv_hf import compat

_TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=None,
             initializer_range=0.2)  # wide: peaked logits, so greedy choices are not near-ties
_TRANSFORMERS_5 = compat.TRANSFORMERS_VERSION.major >= 5
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
_MOE = dict(num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32)
IMAGE_TOKEN = 120


def _text(**kw):
    return dict(_TEXT, **kw)


def _vision(**kw):
    return dict(dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14), **kw)


def _mrope(section):
    """Qwen2.5-VL's multimodal RoPE sections (sum: head_dim / 2), as each release spells them."""
    if _TRANSFORMERS_5:
        return dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section))
    return dict(rope_scaling=dict(type="mrope", mrope_section=section))


# model_type -> (model class, config kwargs)
TINY = {
    "llama": ("LlamaForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "qwen2": ("Qwen2ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3, shared_expert_intermediate_size=32, **_MOE)),
    "qwen3": ("Qwen3ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=3, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _text(num_attention_heads=5, num_key_value_heads=1, head_dim=8, **_MOE)),
    "mistral": ("MistralForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=None)),
    "ministral": ("MinistralForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, **_SLIDING)),
    "mixtral": ("MixtralForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                            num_experts_per_tok=2, sliding_window=None)),
    "phi3": ("Phi3ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, sliding_window=None)),
    # softcap 2: the tiny model's logits are capped for real (Gemma 2's own 50 would hardly bend them)
    "gemma2": ("Gemma2ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=2.0,
                                          final_logit_softcapping=30.0, query_pre_attn_scalar=16, **_SLIDING)),
    "gemma3_text": ("Gemma3ForCausalLM", _text(num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                                               sliding_window=8, layer_types=["sliding_attention"] * 2 + ["full_attention"])),
    "gemma3": ("Gemma3ForConditionalGeneration", dict(
        text_config=_text(num_attention_heads=3, num_key_value_heads=1, head_dim=16, **_SLIDING),
        vision_config=_vision(), mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=121, eoi_token_index=122)),
    "olmo2": ("Olmo2ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3)),
    "granite": ("GraniteForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, attention_multiplier=0.2,
                                            embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)),
    "smollm3": ("SmolLM3ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, no_rope_layer_interval=2)),
    "glm4": ("Glm4ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "cohere2": ("Cohere2ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, **_SLIDING)),
    "gpt_oss": ("GptOssForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                           num_experts_per_tok=2, **_SLIDING)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3, q_lora_rank=16, kv_lora_rank=16,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=2,
                                                   num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                                   moe_intermediate_size=32, n_shared_experts=1)),
    "qwen3_next": ("Qwen3NextForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                                 layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                                 linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                                 linear_conv_kernel_dim=4, shared_expert_intermediate_size=32, **_MOE)),
    "llama4_text": ("Llama4ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size_mlp=64,
                                               intermediate_size=32, num_local_experts=1, num_experts_per_tok=1, attention_chunk_size=8,
                                               no_rope_layer_interval=2, interleave_moe_layer_step=1)),
    "falcon_h1": ("FalconH1ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, mamba_d_ssm=32, mamba_n_heads=4,
                                             mamba_d_head=8, mamba_d_state=8, mamba_d_conv=4, mamba_expand=1, mamba_chunk_size=8,
                                             key_multiplier=0.5)),
    "zamba2": ("Zamba2ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3, num_hidden_layers=4, mamba_d_state=8,
                                          layers_block_type=["linear_attention" if _TRANSFORMERS_5 else "mamba", "hybrid"] * 2,
                                          n_mamba_heads=4, mamba_expand=1,
                                          chunk_size=8, use_mamba_kernels=False, adapter_rank=8)),
    "jamba": ("JambaForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1,
                                        num_experts=2, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                                        mamba_d_state=8, mamba_expand=1, use_mamba_kernels=False)),
    "lfm2": ("Lfm2ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, layer_types=["conv", "full_attention"])),
    "gemma": ("GemmaForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1, head_dim=16)),
    "phi": ("PhiForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3)),
    "starcoder2": ("Starcoder2ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, sliding_window=None)),
    "stablelm": ("StableLmForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3)),
    "olmo": ("OlmoForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3)),
    "olmo3": ("Olmo3ForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3, **_SLIDING)),
    "olmoe": ("OlmoeForCausalLM", _text(num_attention_heads=3, num_key_value_heads=3, num_experts=2, num_experts_per_tok=2)),
    "cohere": ("CohereForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2)),
    "exaone4": ("Exaone4ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, **_SLIDING)),
    "glm4_moe": ("Glm4MoeForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8, n_routed_experts=2,
                                             num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                                             topk_group=1)),
    "ernie4_5": ("Ernie4_5ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "seed_oss": ("SeedOssForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "apertus": ("ApertusForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2)),
    "arcee": ("ArceeForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2)),
    "helium": ("HeliumForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM", _text(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "nemotron": ("NemotronForCausalLM", _text(num_attention_heads=3, num_key_value_heads=1)),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", dict(
        text_config=_text(num_attention_heads=3, num_key_value_heads=1, **_mrope([2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=28, fullatt_block_indexes=[0]),
        image_token_id=IMAGE_TOKEN, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)),
    "llava": ("LlavaForConditionalGeneration", dict(
        text_config=dict(_text(num_attention_heads=3, num_key_value_heads=1), model_type="llama"),
        vision_config=dict(_vision(projection_dim=32), model_type="clip_vision_model"), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full")),
}

# Attended by Transformers' eager only (its sdpa has no soft-capping, and ignores sinks).
EAGER_REFERENCE = {"gemma2", "gpt_oss"}
# Refused before Transformers 5 (4.57 keeps the hybrids' caches in classes of their own; its Qwen2-MoE,
# StableLM, OLMoE and Nemotron attention does not call the attention interface).
NEEDS_TRANSFORMERS_5 = {"qwen2_moe", "qwen3_next", "falcon_h1", "zamba2", "jamba", "lfm2", "stablelm", "olmoe", "nemotron"}


def tiny_arch(model_type: str, dtype=torch.float32):
    """The seeded tiny model of `model_type` in eval mode, attending with its reference
    implementation (sdpa; eager for :data:`EAGER_REFERENCE`)."""
    cls_name, kwargs = TINY[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = getattr(transformers, cls_name)(config)
    if model_type == "gpt_oss":  # sinks of about e^1 tokens' mass (the default init leaves them near 0)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(1.0, 1.0)
    model.set_attn_implementation("eager" if model_type in EAGER_REFERENCE else "sdpa")
    return model.to(dtype).eval()


def image_inputs(model_type: str, text_ids: torch.Tensor) -> dict | None:
    """Generate kwargs for a prompt with one 28x28 image before `text_ids` ``[1, T]`` (None for a
    text-only model type)."""
    g = torch.Generator().manual_seed(5)
    if model_type in ("gemma3", "llava"):
        n = 4 if model_type == "gemma3" else 5  # Gemma 3: mm_tokens_per_image; CLIP: 2x2 patches and the class token
        image = torch.full((1, n), IMAGE_TOKEN)
        if model_type == "gemma3":
            image = torch.cat([torch.tensor([[121]]), image, torch.tensor([[122]])], 1)
        return dict(input_ids=torch.cat([image, text_ids], 1), pixel_values=torch.randn(1, 3, 28, 28, generator=g))
    if model_type == "qwen2_5_vl":  # 2x2 patches of 14 pixels, merged 2x2 into one token
        image = torch.tensor([[122, IMAGE_TOKEN, 123]])
        return dict(input_ids=torch.cat([image, text_ids], 1), pixel_values=torch.randn(4, 3 * 2 * 14 * 14, generator=g),
                    image_grid_thw=torch.tensor([[1, 2, 2]]))
    return None
