"""One rank of the tensor-parallel test (tests/test_parallel.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODEL_DIR CASES_JSON OUT_DIR

Loads the saved model with its tensor-parallel plan, runs every case of CASES_JSON (greedy generate
of a prompt, unpatched or patched with the case's settings) and writes ``OUT_DIR/rank<r>.json``:
the model's fingerprint (its K/V weights gathered from the shards), this rank's KV heads, and per
case the generated tokens, the rank's per-head budgets and on rank 0 the summaries of all ranks
gathered into one. Also ``python tests/tp_worker.py ...`` without torchrun:
the single-process run the ranks are compared with (``rank0.json``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import rdkv_hf
from rdkv_hf import compat
from rdkv_hf.fingerprint import fingerprint
from rdkv_hf.parallel import kv_head_range
from rdkv_hf.state import patch_state


def run(model_dir: str, cases_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    kwargs = compat.tensor_parallel_kwargs() if distributed else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    rank = torch.distributed.get_rank() if distributed else 0
    spec = json.loads(Path(cases_file).read_text())
    ids = torch.tensor(spec["ids"])
    mask = torch.tensor(spec["mask"])
    results = {"rank": rank, "heads": kv_head_range(model), "fingerprint": fingerprint(model), "cases": {}}
    for case in spec["cases"]:
        settings = case["settings"]
        if settings is None:
            rdkv_hf.unpatch(model)
        else:
            # the prompt is short: compress it anyway, at its forward unless a case says `observe`
            rdkv_hf.patch(model, **{"min_tokens": 0, "observe": 0, **settings})
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=spec["new_tokens"], pad_token_id=0,
                                 return_dict_in_generate=True)
        got = {"tokens": out.sequences[:, ids.shape[1]:].tolist()}
        if settings is not None:
            planner = patch_state(model).planner
            for name in ("k_bits", "v_bits"):
                if hasattr(planner, name):
                    got[name] = getattr(planner, name).tolist()
            merged = rdkv_hf.gather_summaries(compat.output_cache(out))
            if merged is not None:
                got["summary"] = {"rows": merged.to_dicts(), "nbytes": merged.nbytes, "ranks": merged.ranks,
                                  "prompt_bits": merged.prompt_bits_per_element, "table": str(merged)}
        results["cases"][case["name"]] = got
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:4])
