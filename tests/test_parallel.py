"""Bigger than one device: tensor parallelism across two CPU processes (gloo, started by torchrun),
accelerate disk offload and a CPU / disk device_map split, each with a profile; per-rank head
budgets and merged summaries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import rdkv_hf
from rdkv_hf.calibration import calibrate
from rdkv_hf.compat import output_cache
from rdkv_hf.config import RDKVConfig
from rdkv_hf.fingerprint import fingerprint
from rdkv_hf.planners import make_planner
from rdkv_hf.summary import CacheSummary, HeadRow

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama (2 KV heads, 4 query heads, 2 layers) saved as a checkpoint, and its profile."""
    root = tmp_path_factory.mktemp("parallel")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    ids = torch.randint(1, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    calibrate(model, ids, progress=False).save_pretrained(root / "profile")
    return root


def _prompt():
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def _cases(profile: str) -> list[dict]:
    """Every mode: at budget 16 (rdkv and uniform keep everything) and compressed: 2.5 bits, 3.5 for
    the modes without eviction (head_dim 16: a V token's scales alone cost 2 bits an element)."""
    cases = [{"name": "unpatched", "settings": None}]
    for mode in ("rdkv", "uniform"):
        cases.append({"name": f"{mode}@16", "settings": {"budget": 16, "mode": mode}})
    for mode in ("rdkv", "rdkv+profile", "ratequant", "uniform"):
        with_profile = {"profile": profile} if mode in ("rdkv+profile", "ratequant") else {}
        budget = 3.5 if mode in ("ratequant", "uniform") else 2.5
        cases.append({"name": f"{mode}@{budget:g}", "settings": {"budget": budget, "mode": mode, **with_profile}})
    cases.append({"name": "rdkv@2.5+observe=2", "settings": {"budget": 2.5, "observe": 2}})  # packed at the 2nd decode step
    return cases


def _run_worker(args: list[str], timeout: int = 300) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_tensor_parallel_ranks_generate_the_single_process_tokens(saved, tmp_path):
    """2 CPU processes (gloo) load the checkpoint with its tensor-parallel plan and patch it in every
    mode: each rank's greedy tokens equal the single-process run's (at budget 16 the unpatched
    model's), each rank holds one of the 2 KV heads with that head's budgets from the global
    allocation, and the summaries gathered on rank 0 equal the single-process summary."""
    ids, mask = _prompt()
    cases = _cases(str(saved / "profile"))
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({"ids": ids.tolist(), "mask": mask.tolist(), "new_tokens": NEW_TOKENS, "cases": cases}))
    worker = str(HERE / "tp_worker.py")
    (tmp_path / "single").mkdir()
    (tmp_path / "tp").mkdir()
    _run_worker([sys.executable, worker, str(saved / "model"), str(spec), str(tmp_path / "single")])
    _run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker,
                 str(saved / "model"), str(spec), str(tmp_path / "tp")])
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "tp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["heads"] is None and [r["heads"] for r in ranks] == [[0, 1], [1, 2]]
    # the weights hash the same gathered from 2 shards as in one process (so the profile matches)
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == single["fingerprint"] == fingerprint(AutoModelForCausalLM.from_pretrained(saved / "model"))
    lines = []
    for case in cases:
        name = case["name"]
        ref = single["cases"][name]
        lines.append(f"{name:>18}: {ref['tokens'][0]}")
        for r, rank in enumerate(ranks):
            got = rank["cases"][name]
            assert got["tokens"] == ref["tokens"], f"{name}: rank {r} generated {got['tokens']}, one process {ref['tokens']}"
            for bits in ("k_bits", "v_bits"):  # this rank's column of the global allocation
                if bits in ref:
                    assert got[bits] == [row[r : r + 1] for row in ref[bits]], (name, bits, r)
        if name.endswith("@16"):
            assert ref["tokens"] == single["cases"]["unpatched"]["tokens"], name
        if case["settings"] is not None:
            merged, alone = ranks[0]["cases"][name]["summary"], ref["summary"]
            assert merged["ranks"] == 2 and alone["ranks"] == 1
            assert merged["rows"] == alone["rows"] and merged["nbytes"] == alone["nbytes"], name
            assert merged["prompt_bits"] == pytest.approx(alone["prompt_bits"], rel=1e-12)
            assert "summary" not in ranks[1]["cases"][name]
    print("\ngreedy tokens of batch row 0 (both ranks and one process alike):\n" + "\n".join(lines))


def _offloaded(model_dir: Path, folder: Path, layer_device: dict):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": d for i, d in layer_device.items()})
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(folder)).eval()


@pytest.mark.parametrize("mode", ["rdkv+profile", "ratequant"])
def test_disk_offloaded_model_with_a_profile_generates_the_in_memory_tokens(saved, tmp_path, mode):
    """Layer 1 offloaded to disk (its weights on meta, read through accelerate's hook): the profile
    matches, and the patched model generates what the model in memory does with the same settings;
    each layer's packed cache lives where its layer ran."""
    ids, mask = _prompt()
    settings = dict(budget=2.5 if mode == "rdkv+profile" else 3.5, mode=mode, profile=str(saved / "profile"))
    ref_model = AutoModelForCausalLM.from_pretrained(saved / "model", dtype=torch.float32).eval()
    rdkv_hf.patch(ref_model, **settings)
    ref = ref_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)

    model = _offloaded(saved / "model", tmp_path / "offload", {0: "cpu", 1: "disk"})
    assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    assert fingerprint(model) == fingerprint(ref_model)
    rdkv_hf.patch(model, **settings)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = output_cache(out)
    for i in cache.rdkv_layers:  # disk-offloaded layers run on the CPU here (the execution device)
        layer = cache.layers[i]
        assert layer.segments and {layer.segments[0].buffers.words.device, layer.keys.device} == {torch.device("cpu")}


def test_device_map_split_keeps_each_layer_cache_on_its_layer_device(saved, tmp_path):
    """A CPU / disk split patched at budget 16 generates what it does unpatched, and each layer's packed
    segments and tail live on the device its layer executes on (the GPU suite splits across GPUs)."""
    ids, mask = _prompt()
    model = _offloaded(saved / "model", tmp_path / "offload", {0: "disk", 1: "cpu"})
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    rdkv_hf.patch(model, budget=16)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    cache = output_cache(out)
    for i in cache.rdkv_layers:
        attn = model.model.layers[i].self_attn
        hook = getattr(attn.k_proj, "_hf_hook", None)
        device = getattr(hook, "execution_device", None) or attn.k_proj.weight.device
        layer = cache.layers[i]
        assert {t.device for t in (layer.segments[0].buffers.words, layer.segments[0].buffers.raw, layer.keys)} == {torch.device(device)}


def test_a_rank_gets_its_block_of_the_global_head_budgets(saved):
    """Per-head budgets are allocated over all KV heads and sliced to a rank's block: the blocks put
    together are the single-process allocation, whose mean is the budget."""
    from rdkv_hf.profile import RDKVProfile

    prof = RDKVProfile.from_pretrained(saved / "profile")
    for mode in ("rdkv+profile", "ratequant"):
        cfg = RDKVConfig(budget=2.5 if mode == "rdkv+profile" else 4.0, mode=mode, profile="p")
        whole = make_planner(cfg, prof)
        blocks = [make_planner(cfg, prof, heads=(h, h + 1)) for h in range(prof.num_kv_heads)]
        for name in ("k_bits", "v_bits"):
            assert torch.equal(torch.cat([getattr(b, name) for b in blocks], 1), getattr(whole, name))
        if mode == "rdkv+profile":
            assert torch.cat([whole.k_bits, whole.v_bits]).mean().item() == pytest.approx(2.5)
        assert [b.head_offset for b in blocks] == [0, 1]
        with pytest.raises(ValueError, match="holds 2 KV heads, but the planner has budgets for 1 .*KV heads \\[1, 2\\).*every rank"):
            blocks[1].check_heads(0, 2, blocks[1].k_bits)
    with pytest.raises(ValueError, match="`heads` must be a range"):
        make_planner(RDKVConfig(budget=2.5), heads=(1, 1))
    with pytest.raises(ValueError, match="holds KV heads \\[1, 3\\) but the profile has 2"):
        make_planner(RDKVConfig(budget=2.5, mode="rdkv+profile", profile="p"), prof, heads=(1, 3))


def _summary(heads, nbytes, prompt_bytes, elements):
    rows = [HeadRow(0, h, 10, 5, {2: 5}, {0: 1, 4: 7}, 2.0) for h in heads]
    return CacheSummary(rows=rows, nbytes=nbytes, bf16_bytes=100, layers_compressed=[0], layers_total=1,
                        prompt_bytes=prompt_bytes, prompt_elements=elements,
                        prompt_bits_per_element=8 * prompt_bytes / elements)


def test_summaries_of_ranks_merge_into_one_table():
    merged = CacheSummary.merge([_summary([1], 30, 20, 40), _summary([0], 50, 60, 40)])
    assert [r.head for r in merged.rows] == [0, 1] and merged.nbytes == 80 and merged.bf16_bytes == 200
    assert merged.prompt_bits_per_element == pytest.approx(8 * 80 / 80) and merged.ranks == 2
    assert "2 ranks" in str(merged)
    with pytest.raises(ValueError, match="same \\(layer, head\\)"):
        CacheSummary.merge([_summary([0], 1, 1, 1), _summary([0], 1, 1, 1)])
    from rdkv_hf.parallel import gather_summaries

    one = _summary([0], 1, 1, 1)
    assert gather_summaries(one) is one  # without torch.distributed: the one summary
