"""Compress a long prompt and look at what RDKV kept, per layer and KV head.

Transformers 5.24 and later take the cache as `cache=`; earlier releases as `past_key_values=`.
"""

import torch

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.eval.models import load_model
from rdkv_hf.eval.prompts import recall_prompt

model, tokenizer = load_model("smollm2-135m")
input_ids, answer = recall_prompt(tokenizer, n_tokens=2000, seed=3)

rdkv_hf.patch(model, budget=2.5)
cache = RDKVCache(model)
with torch.no_grad():
    model(input_ids, cache=cache, logits_to_keep=1)   # prefill
cache.flush()  # pack now: a prompt of up to 2,048 tokens waits for the answer's first 16 queries (observe)

summary = cache.summary()
print(summary)                       # a table: kept tokens, V and K widths, realized bits
rows = summary.to_dicts()            # the same as dicts, e.g. for pandas
kept = sum(r["kept_tokens"] for r in rows) / len(rows)
print(f"\nkept {kept:.0f} of {input_ids.shape[1]} tokens per head on average; "
      f"{summary.compression_ratio:.1f}x smaller than a bf16 cache")
