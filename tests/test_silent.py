"""Nothing silently wrong: each test is one way a plausible result used to hide a wrong cache.

Each of these failed on the code before its fix (rdkv_hf 98e4ada with transformers 5.23, through the
fallbacks below for names that did not exist then), and passes now.
"""

import copy
import threading
import warnings

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache

try:
    from rdkv_hf.compat import cache_kwargs, output_cache
except ImportError:  # an rdkv_hf from before the fixes: how these tests were shown to fail there
    def cache_kwargs(cache):
        return {"past_key_values": cache}

    def output_cache(out):
        return out.past_key_values


def _greedy(model, ids, n=12, **kw):
    return model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)


def _ids(seed, B=1, T=37):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


EXACT = dict(budget=16, high_precision_dtype="float32")


def test_generation_config_use_cache_false_runs_without_a_cache():
    """1. use_cache=False in the generation config: no RDKV cache may be handed to generate()."""
    model = tiny_model("llama")
    model.generation_config.use_cache = False
    ids = _ids(1)
    ref = _greedy(model, ids)
    rdkv_hf.patch(model, **EXACT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(_greedy(model, ids), ref)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=2, use_cache=False, **cache_kwargs(RDKVCache(model)))


@pytest.mark.parametrize("observe", [0, 3])
def test_threads_generating_on_one_patched_model_equal_the_sequential_run(observe):
    """2. Four threads x several prompts at once, compressed (2.5 bits; with ``observe`` the prompts
    are packed during the answers): each equals its sequential run."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5, observe=observe)
    prompts = [_ids(10 + i, T=30 + 7 * i) for i in range(8)]
    sequential = [_greedy(model, p) for p in prompts]
    results, errors = {}, []

    def work(i):
        try:
            for j in range(i, len(prompts), 4):
                results[j] = _greedy(model, prompts[j])
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(results[j], sequential[j]) for j in range(len(prompts)))


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    """4. copy.deepcopy: the copy's generate must run the copy."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.neg_()
    ids = _ids(2)
    assert not torch.equal(_greedy(clone, ids), _greedy(model, ids))
    assert rdkv_hf.is_patched(clone) and rdkv_hf.unpatch(clone) is clone
    assert rdkv_hf.is_patched(model) and not rdkv_hf.is_patched(clone)


def test_nested_patched_blocks_restore_the_outer_settings():
    """5. The inner block's exit must leave the outer block's settings in place."""
    model = tiny_model("llama")
    ids = _ids(3)
    with rdkv_hf.patched(model, budget=4.0):
        with rdkv_hf.patched(model, budget=2.0):
            pass
        assert rdkv_hf.is_patched(model)
        out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert output_cache(out).rdkv_config.budget == 4.0
    assert not rdkv_hf.is_patched(model)


def test_left_padding_does_not_change_what_a_row_keeps():
    """6. A padded row is compressed as the same prompt alone (the padding's zeros used to be pooled in)."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.0)
    alone = _ids(4, T=40)
    batch = torch.cat([_ids(5, T=48), torch.cat([torch.zeros(1, 8, dtype=torch.long), alone], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    single, padded = RDKVCache(model), RDKVCache(model)
    with torch.no_grad():
        model(alone, **cache_kwargs(single))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded row
        model(batch, attention_mask=mask, position_ids=positions, **cache_kwargs(padded))
    for i in single.rdkv_layers:
        H = model.config.num_key_value_heads
        for h in range(H):
            a, b = single.layers[i].segments[0].heads[h], padded.layers[i].segments[0].heads[H + h]
            assert (a.n, a.v_widths(), a.k_widths()) == (b.n, b.v_widths(), b.k_widths())
            for x, y in zip(a.dequantize(), b.dequantize()):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_budget_and_tokens_together_are_refused():
    """7. patch(budget=..., tokens=...) used to drop `budget` silently."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"`budget`.*`tokens`.*not both"):
        rdkv_hf.patch(model, budget=2.5, tokens=64)
    assert not rdkv_hf.is_patched(model)


@pytest.mark.parametrize("k_share", [0.999, 0.001])
def test_a_k_share_that_evicts_all_of_k_or_v_warns(k_share):
    """8. An extreme k_share evicted all of V (or of K's channels) with no word."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=1.0, k_share=k_share)
    with pytest.warns(UserWarning, match=r"evicted every (V token|K channel).*k_share"):
        with torch.no_grad():
            model(_ids(6, T=64), **cache_kwargs(RDKVCache(model)))


def test_a_repatch_that_fails_keeps_the_previous_settings(monkeypatch):
    """10. A re-patch that fails part-way used to leave the model unpatched."""
    from rdkv_hf.config import RDKVConfig

    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)

    def boom(self):
        raise RuntimeError("late failure")

    monkeypatch.setattr(RDKVConfig, "to_dict", boom)  # fails while the new settings are written
    with pytest.raises(RuntimeError, match="late failure"):
        rdkv_hf.patch(model, budget=4.0)
    monkeypatch.undo()
    assert rdkv_hf.is_patched(model)
    out = model.generate(_ids(7), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert output_cache(out).rdkv_config.budget == 2.5


@pytest.mark.parametrize("entry", [{}, [], "x", 3])
def test_a_malformed_rdkv_entry_in_config_json_is_refused(entry, tmp_path):
    """12. `"rdkv": {}` (or `[]`) in config.json used to patch at the default budget, silently."""
    import json

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rdkv"] = entry
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'rdkv' entry"):
        rdkv_hf.from_pretrained(str(tmp_path))


_SAVER = """
import sys, torch
from rdkv_hf.profile import RDKVProfile
a = RDKVProfile.from_pretrained(sys.argv[1])
b = RDKVProfile.from_pretrained(sys.argv[2])
b_alt = type(a)(**{**{f: getattr(b, f) for f in ("fingerprint", "quantizer", "calibration")}, **b.tensors()})
print("ready", flush=True)
while True:
    for p in (a, b_alt):
        p.save_pretrained(sys.argv[3])
"""


def test_a_save_killed_at_any_moment_leaves_a_good_profile(tmp_path):
    """3. A kill during save_pretrained used to leave config.json of one profile with the other's
    tensors (accepted by both models), or an empty config.json. Now every kill leaves one of the two
    whole profiles, and a mixed folder is refused."""
    import random
    import signal
    import subprocess
    import sys

    from rdkv_hf.calibration import calibrate
    from rdkv_hf.profile import RDKVProfile

    ids = torch.randint(1, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    a = calibrate(tiny_model("llama"), ids, progress=False).save_pretrained(tmp_path / "a")
    b = calibrate(tiny_model("llama", num_key_value_heads=4), ids, progress=False).save_pretrained(tmp_path / "b")
    target = tmp_path / "target"
    RDKVProfile.from_pretrained(a).save_pretrained(target)
    known = {name: RDKVProfile.from_pretrained(p).tensors() for name, p in (("a", a), ("b", b))}
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(a), str(b), str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        threading.Event().wait(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = RDKVProfile.from_pretrained(target).tensors()
        assert any(loaded.keys() == t.keys() and all(torch.equal(loaded[k], t[k]) for k in t) for t in known.values())
    # Files of two profiles mixed by hand: refused, whichever way.
    mixed = tmp_path / "mixed"
    RDKVProfile.from_pretrained(a).save_pretrained(mixed)
    (mixed / "profile.safetensors").write_bytes((b / "profile.safetensors").read_bytes())
    with pytest.raises(ValueError, match="sha256 differs"):
        RDKVProfile.from_pretrained(mixed)


def test_calibrate_command_checks_its_output_folder_before_calibrating(tmp_path, capsys):
    """3. `rdkv-hf calibrate` used to find a bad --out only after the work."""
    from rdkv_hf.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["calibrate", "--model", "no/such-model-anywhere", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "holds other files (notes.txt)" in err and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.library_defaults
def test_a_short_chat_is_left_whole_and_a_long_prompt_compressed():
    """13. A 40-token chat at budget 2.5 used to be packed (0 of 10 SmolLM2 answers kept): prompts
    shorter than `min_tokens` (512 by default) stay in full precision, longer ones are packed."""
    model = tiny_model("llama", max_position_embeddings=2048)
    assert rdkv_hf.RDKVConfig().min_tokens == 512
    short, long = _ids(13, T=40), _ids(14, T=600)
    ref = _greedy(model, short)
    rdkv_hf.patch(model, budget=2.5)
    out = _greedy(model, short, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = output_cache(out)
    assert all(not layer.segments for layer in cache.layers) and cache.nbytes > 0
    cache = RDKVCache(model)
    with torch.no_grad():
        model(long, **cache_kwargs(cache))
    assert all(layer.observe_n == 600 for layer in cache.layers)  # packed after 16 decoded queries (observe)
    assert cache.flush() == 600
    assert all(len(layer.segments) == 1 for layer in cache.layers)
    assert cache.summary().prompt_bits_per_element <= 2.5


def test_a_follow_up_packs_the_tail_once_it_reaches_min_tokens():
    """A prompt under `min_tokens` waits in the tail; the follow-up that brings it to the threshold
    packs all of it (but the residual)."""
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5, min_tokens=50, residual=4)
    cache = RDKVCache(model)
    with torch.no_grad():
        model(_ids(15, T=30), **cache_kwargs(cache))
        assert [layer.keys.shape[-2] for layer in cache.layers] == [30, 30] and not cache.layers[0].segments
        model(_ids(16, T=30), **cache_kwargs(cache))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [4, 4]
    assert all(len(layer.segments) == 1 and layer.segments[0].buffers.max_tokens <= 56 for layer in cache.layers)
