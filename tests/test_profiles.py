import dataclasses
import json
import shutil
import sys

import pytest
import torch
from conftest import tiny_model

from rdkv_hf.calibration import RD_QUERY_STRIDE, RD_SEQS, calibrate
from rdkv_hf.config import RDKVConfig
from rdkv_hf.fingerprint import fingerprint, weight_norms
from rdkv_hf.head_budgets import on_layers, profile_rd_bits, ratequant_bits
from rdkv_hf.planners import make_planner
from rdkv_hf.profile import RDKVProfile
from rdkv_hf.profile_card import _layer_bits, model_card
from rdkv_hf.profile_hub import SHIPPED_DIR, shipped_profiles

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model_and_profile():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    return model, calibrate(model, ids, progress=False)


@pytest.fixture
def saved(model_and_profile, tmp_path):
    _, prof = model_and_profile
    return prof.save_pretrained(tmp_path / "prof")


def assert_same(a: RDKVProfile, b: RDKVProfile):
    assert a.fingerprint == b.fingerprint and a.quantizer == b.quantizer and a.calibration == b.calibration
    for name, t in a.tensors().items():
        assert torch.equal(t, getattr(b, name)), name


def hub_cache(tmp_path, src, repo="acme/prof"):
    """A hand-made huggingface_hub cache holding `src`'s files as revision main of `repo`."""
    org, name = repo.split("/")
    root = tmp_path / "hub" / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    shutil.copytree(src, root / "snapshots" / SHA)
    return tmp_path / "hub"


def test_round_trip_through_a_directory(model_and_profile, saved):
    _, prof = model_and_profile
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "profile.safetensors"]
    loaded = RDKVProfile.from_pretrained(saved)
    assert_same(prof, loaded)
    assert loaded.name_or_path == str(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["schema_version"] == 1 and config["created_with"].startswith("rdkv_hf ")
    assert config["fingerprint"]["weights_sha256"] == prof.fingerprint["weights_sha256"]
    assert len(prof.fingerprint["weights_sha256"]) == 16


def test_round_trip_through_an_offline_hub_cache(model_and_profile, saved, tmp_path, monkeypatch):
    _, prof = model_and_profile
    cache = hub_cache(tmp_path, saved)
    loaded = RDKVProfile.from_pretrained("acme/prof", cache_dir=cache, local_files_only=True)
    assert_same(prof, loaded)
    assert loaded.name_or_path == "acme/prof"
    # With HF_HUB_OFFLINE the cache still answers, without local_files_only.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_same(prof, RDKVProfile.from_pretrained("acme/prof", cache_dir=cache))
    assert_same(prof, RDKVProfile.from_pretrained("acme/prof", cache_dir=cache, revision=SHA))
    with pytest.raises(OSError, match="acme/other"):
        RDKVProfile.from_pretrained("acme/other", cache_dir=cache)


def test_missing_directory_and_incomplete_profile(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RDKVProfile.from_pretrained(str(tmp_path / "nope"))
    (saved / "profile.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="profile.safetensors"):
        RDKVProfile.from_pretrained(saved)


@pytest.mark.parametrize("filename", ["config.json", "profile.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_files_give_clean_errors(saved, filename, damage):
    path = saved / filename
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\xff not a profile \x13" * 7)
    with pytest.raises(ValueError, match=filename.replace(".", r"\.")):
        RDKVProfile.from_pretrained(saved)


def test_damaged_file_in_the_hub_cache(saved, tmp_path):
    cache = hub_cache(tmp_path, saved)
    path = cache / "models--acme--prof" / "snapshots" / SHA / "profile.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="profile.safetensors.*corrupted or truncated"):
        RDKVProfile.from_pretrained("acme/prof", cache_dir=cache, local_files_only=True)


def test_missing_tensor_and_shape_mismatch(model_and_profile, saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "profile.safetensors")
    config = json.loads((saved / "config.json").read_text())
    del config["tensors_sha256"]  # as saved before the hash was recorded: the tensors are checked one by one
    config["fingerprint"]["num_layers"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 2\)"):
        RDKVProfile.from_pretrained(saved)
    config["fingerprint"]["num_layers"] = 2
    (saved / "config.json").write_text(json.dumps(config))
    del tensors["beta_v"]
    save_file(tensors, saved / "profile.safetensors")
    with pytest.raises(ValueError, match="lacks the tensors.*beta_v"):
        RDKVProfile.from_pretrained(saved)
    del config["fingerprint"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks the keys.*fingerprint"):
        RDKVProfile.from_pretrained(saved)


def test_newer_schema_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["schema_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="schema_version 99.*upgrade"):
        RDKVProfile.from_pretrained(saved)


def test_check_model(model_and_profile):
    model, prof = model_and_profile
    prof.check_model(model)
    prof.check_model(tiny_model("llama").to(torch.bfloat16))  # same weights, other precision
    prof.check_model(tiny_model("llama").to(torch.float16))
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.mul_(1.01)
    theirs = fingerprint(other)["weights_sha256"]
    assert theirs != prof.fingerprint["weights_sha256"]
    with pytest.raises(ValueError, match=f"{prof.fingerprint['weights_sha256']}.*{theirs}"):
        prof.check_model(other)
    with pytest.raises(ValueError, match="num_layers=2.*num_layers=3"):
        prof.check_model(tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match="model_type=llama.*model_type=qwen3"):
        prof.check_model(tiny_model("qwen3"))


def _rows_permuted(model):
    with torch.no_grad():
        w = model.model.layers[0].self_attn.k_proj.weight
        w.copy_(w.flip(0))
    return model


def _negated(model):
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.neg_()
    return model


@pytest.mark.parametrize("change", [_rows_permuted, _negated], ids=["k_proj-rows-permuted", "v_proj-negated"])
def test_weights_with_equal_norms_are_other_weights(model_and_profile, change):
    """Rows permuted or signs flipped keep every norm, but they are other weights (and another
    model's attention): the fingerprint hashes the weights, so the profile is refused. (Before the
    fallback to norms was removed, both were accepted.)"""
    _, prof = model_and_profile
    other = change(tiny_model("llama"))
    assert torch.allclose(weight_norms(other), prof.weight_norms)
    with pytest.raises(ValueError, match="does not match this model"):
        prof.check_model(other)
    with pytest.raises(ValueError, match="does not match this model"):
        prof.check_model(other.to(torch.bfloat16))


def test_each_precision_is_checked_by_its_own_hash(model_and_profile):
    """A float16 load is identified by the float16 hash, a bfloat16 load by the bfloat16 one; a
    profile saved with only the bfloat16 hash refuses a float16 model and says why."""
    model, prof = model_and_profile
    fp32, fp16 = fingerprint(model), fingerprint(tiny_model("llama").to(torch.float16))
    assert fp16["weights_sha256"] != fp32["weights_sha256"]  # a float16 load rounds differently...
    assert fp16["weights_sha256_fp16"] == fp32["weights_sha256_fp16"]  # ...and is still the same weights
    old = dataclasses.replace(prof, fingerprint={k: v for k, v in prof.fingerprint.items() if k != "weights_sha256_fp16"})
    old.check_model(tiny_model("llama").to(torch.bfloat16))
    with pytest.raises(ValueError, match="the model is float16.*load the model in float32 or bfloat16"):
        old.check_model(tiny_model("llama").to(torch.float16))


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.5, 4.0])
def test_head_bits(model_and_profile, budget):
    _, prof = model_and_profile
    kb, vb = ratequant_bits(prof, budget)
    assert kb.shape == vb.shape == (2, 2) and kb.dtype == torch.long
    assert int(kb.sum() + vb.sum()) == round(budget * 8)
    kf, vf = ratequant_bits(prof, budget, integer=False)
    assert abs(torch.cat([kf, vf]).mean().item() - budget) < 1e-9
    assert (torch.cat([kb, vb]) - torch.cat([kf, vf])).abs().max() < 2
    kb, vb = ratequant_bits(prof, budget, bounds=(1, 8))
    assert int(kb.sum() + vb.sum()) == round(budget * 8)
    with pytest.raises(ValueError, match="bounds"):
        ratequant_bits(prof, budget, bounds=(5, 6))


def test_head_bits_rejects_bad_budgets(model_and_profile):
    _, prof = model_and_profile
    with pytest.raises(ValueError, match="budget"):
        ratequant_bits(prof, 12)
    with pytest.raises(TypeError, match="budget"):
        ratequant_bits(prof, "2.5")


def test_eps_tables_feed_rdkv_config(model_and_profile):
    _, prof = model_and_profile
    for layer in (None, 0, 1):
        ek, ev = prof.eps_tables(layer)
        assert set(ek) == set(ev) == {0, 2, 4, 8, 16}
        cfg = RDKVConfig(eps_k=ek, eps_v=ev)
        assert cfg.eps_k == ek
    assert prof.eps_tables(1)[1][2] == pytest.approx(prof.eps_v[1, 0].item())
    with pytest.raises(ValueError, match="layer"):
        prof.eps_tables(5)


def test_model_card(saved):
    card = (saved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: rdkv_hf\ntags:\n")
    assert 'rdkv_hf.patch(model, budget=2.5, profile="prof")' in card
    assert card.count("\n| 0 |") == 1 and card.count("\n| 1 |") == 1
    n = min(3, RD_SEQS)  # the fixture calibrates on 3 sequences
    assert f"RDKV curves: the first {n} sequences, the first 75% of each compressed, one in {RD_QUERY_STRIDE} of" in card


def test_push_to_hub_uses_create_repo_and_upload_folder(model_and_profile, monkeypatch, tmp_path):
    import huggingface_hub

    _, prof = model_and_profile
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
            calls.append(("upload_folder", repo_id, repo_type))
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert prof.push_to_hub("acme/prof", token="tok", private=True) == "commit-url"
    assert calls == [("init", "tok"), ("create_repo", "acme/prof", "model", True, True), ("upload_folder", "acme/prof", "model")]
    assert 'profile="acme/prof"' in (tmp_path / "uploaded" / "README.md").read_text()
    assert_same(prof, RDKVProfile.from_pretrained(tmp_path / "uploaded"))


def test_show(model_and_profile):
    _, prof = model_and_profile
    text = prof.show(2.5)
    lines = text.splitlines()
    assert len(lines) == 3 + 2 * 2 + 1  # + the note on the RDKV column
    kb, vb = ratequant_bits(prof, 2.5)
    assert lines[3].split()[:4] == ["0", "0", str(int(kb[0, 0])), str(int(vb[0, 0]))]
    assert "bounds [2, 4]" in text


def layer_one_only(prof):
    """`prof` as for a model whose layer 0 has a sliding window: the cache compresses layer 1 only."""
    return dataclasses.replace(prof, compressed_layers=[1])


def test_show_shares_the_budget_among_the_compressed_layers(model_and_profile):
    _, prof = model_and_profile
    one = layer_one_only(prof)
    lines = one.show(2.5).splitlines()
    assert "shared by layers 1 of 2" in lines[1]
    assert lines[3].split()[:2] == ["0", "-"] and lines[3].endswith("not compressed (sliding window)")
    assert len(lines) == 3 + 1 + 2 + 1  # layer 0: one line, no bits; layer 1: one line per head; the RDKV note
    kb, vb = on_layers(lambda p: ratequant_bits(p, 2.5), prof, [1])
    assert int(kb[1].sum() + vb[1].sum()) == round(2.5 * 4)  # layer 1 holds the whole budget
    for h in range(2):
        assert lines[4 + h].split()[:4] == ["1", str(h), str(int(kb[1, h])), str(int(vb[1, h]))]
    # The planner of a cache compressing layer 1 gives the same widths (ratequant: codes = budget - 16/head_dim).
    c = RDKVConfig(budget=2.5 + 16 / prof.fingerprint["head_dim"], mode="ratequant", profile="x")
    planner = make_planner(c, prof, layers=[1])
    pk, pv = planner.k_bits, planner.v_bits
    assert torch.equal(pk[1], kb[1]) and torch.equal(pv[1], vb[1])
    # `layers=` overrides the profile's; all layers give the plain table.
    assert one.show(2.5, layers=[0, 1]).splitlines()[3:] == prof.show(2.5).splitlines()[3:]
    assert "not compressed (not in `layers`)" in prof.show(2.5, layers=[0]).splitlines()[-2]
    with pytest.raises(ValueError, match="`layers` must be indices"):
        one.show(2.5, layers=[2])


def test_compressed_layers_round_trip_and_old_configs_mean_all_layers(model_and_profile, tmp_path):
    _, prof = model_and_profile
    assert prof.compressed_layers == [0, 1]  # tiny llama: no sliding window
    folder = layer_one_only(prof).save_pretrained(tmp_path / "one")
    config = json.loads((folder / "config.json").read_text())
    assert config["compressed_layers"] == [1]
    assert RDKVProfile.from_pretrained(folder).compressed_layers == [1]
    assert "compresses layers 1 only (1 of 2" in (folder / "README.md").read_text()
    del config["compressed_layers"]  # as written before the field existed
    (folder / "config.json").write_text(json.dumps(config))
    assert RDKVProfile.from_pretrained(folder).compressed_layers == [0, 1]


@pytest.mark.parametrize("bad,match", [
    ([2], r"holds 2, not a layer index in \[0, 2\)"),
    ([-1], "holds -1"),
    ([1, 0], r"must be sorted with no repeats, got \[1, 0\]"),
    ([1, 1], r"must be sorted with no repeats, got \[1, 1\]"),
    ([True], "holds True"),
    (["1"], "holds '1'"),
    ("0,1", "must be a list of layer indices, got '0,1'"),
])
def test_bad_compressed_layers_are_refused(model_and_profile, tmp_path, bad, match):
    _, prof = model_and_profile
    folder = prof.save_pretrained(tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config["compressed_layers"] = bad
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: `compressed_layers` " + match):
        RDKVProfile.from_pretrained(folder)
    with pytest.raises(ValueError, match="RDKVProfile: `compressed_layers` " + match):
        dataclasses.replace(prof, compressed_layers=bad)


def test_select_layers_reindexes_the_compressed_layers(model_and_profile):
    _, prof = model_and_profile
    one = layer_one_only(prof)
    assert one.select_layers([1]).compressed_layers == [0]
    assert one.select_layers([0, 1]).compressed_layers == [1]
    assert one.select_layers([0]).compressed_layers == []
    assert prof.select_layers([1]).compressed_layers == [0]


def test_a_profile_that_compresses_no_layer_still_shows_and_saves(model_and_profile, tmp_path):
    _, prof = model_and_profile
    none = dataclasses.replace(prof, compressed_layers=[])  # every layer has a sliding window
    lines = none.show(2.5).splitlines()
    assert "no layer is compressed" in lines[1] and all("not compressed" in line for line in lines[3:])
    assert "the cache keeps them all uncompressed" in (none.save_pretrained(tmp_path / "none") / "README.md").read_text()


def test_plot(model_and_profile, tmp_path):
    pytest.importorskip("matplotlib")
    _, prof = model_and_profile
    path = prof.plot(2.5, tmp_path / "bits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_masks_the_layers_not_compressed(model_and_profile, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    _, prof = model_and_profile
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (figures.append(self), savefig(self, *a, **kw))[1])
    path = layer_one_only(prof).plot(2.5, tmp_path / "bits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, = figures
    kb, vb = on_layers(lambda p: ratequant_bits(p, 2.5), prof, [1])
    for ax, bits in zip(fig.axes[:2], (kb, vb)):
        grid = ax.get_images()[0].get_array()
        assert grid.mask[0].all() and not grid.mask[1].any()
        assert grid[1].tolist() == bits[1].tolist()
    assert "grey: not compressed" in fig.get_suptitle() and "layers 1 of 2" in fig.get_suptitle()


def test_plot_without_matplotlib(model_and_profile, tmp_path, monkeypatch):
    _, prof = model_and_profile
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        prof.plot(2.5, tmp_path / "bits.png")


def test_invalid_tensors_are_refused(model_and_profile):
    _, prof = model_and_profile
    fields = {f: getattr(prof, f) for f in ("fingerprint", "quantizer", "calibration")} | prof.tensors()
    with pytest.raises(ValueError, match="alpha_k"):
        RDKVProfile(**(fields | {"alpha_k": -prof.alpha_k}))
    with pytest.raises(ValueError, match="non-finite"):
        RDKVProfile(**(fields | {"sens_v": prof.sens_v * float("nan")}))


def test_shipped_gemma_profile_compresses_its_full_attention_layers():
    from transformers import Gemma3TextConfig

    from rdkv_hf.model_patches import compressed_layers

    prof = RDKVProfile.from_pretrained("gemma3-270m")
    assert prof.compressed_layers == list(compressed_layers(Gemma3TextConfig(num_hidden_layers=18))) == [5, 11, 17]
    kb, vb = _layer_bits(prof, 2.5, True, None, None)[1:]
    assert int(kb.sum() + vb.sum()) == round(2.5 * 2 * 3) and kb[[0, 1, 2, 3, 4]].sum() == 0
    text = prof.show(2.5)
    assert "shared by layers 5, 11, 17 of 18" in text and text.count("not compressed (sliding window)") == 15
    card = (SHIPPED_DIR / "gemma3-270m" / "README.md").read_text()
    assert card == model_card(prof, "gemma3-270m")  # the shipped card is the generated one
    # The SmolLM2 config predates the field: all layers.
    assert RDKVProfile.from_pretrained("smollm2-135m-instruct").compressed_layers == list(range(30))


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_load(name):
    prof = RDKVProfile.from_pretrained(name)
    L, H = prof.num_layers, prof.num_kv_heads
    for budget in (2.5, 3.0, 4.0):
        kb, vb = ratequant_bits(prof, budget)
        assert int(kb.sum() + vb.sum()) == round(budget * 2 * L * H)
    RDKVConfig(eps_k=prof.eps_tables()[0], eps_v=prof.eps_tables()[1])


@pytest.mark.slow
def test_shipped_smollm2_profile_matches_the_real_model():
    from rdkv_hf.eval import models

    model, _ = models.load_model("smollm2-135m")
    prof = RDKVProfile.from_pretrained("smollm2-135m-instruct")
    prof.check_model(model)
    kb, vb = ratequant_bits(prof, 2.5)
    assert kb.shape == vb.shape == (30, 3)
    assert int(kb.sum() + vb.sum()) == 450


def test_every_model_of_rdkv_hf_models_has_its_shipped_profile():
    from rdkv_hf.eval.models import MODELS, SHIPPED_PROFILES, shipped_profile

    assert set(SHIPPED_PROFILES) == set(MODELS)
    assert sorted(SHIPPED_PROFILES.values()) == shipped_profiles()
    kinds = {"smollm2-135m": ("llama", 30), "gemma3-270m": ("gemma3_text", 18)}
    for model_name, (model_type, layers) in kinds.items():
        prof = shipped_profile(model_name)
        assert (prof.fingerprint["model_type"], prof.num_layers) == (model_type, layers)


def _with_curves(prof, cost_curves, sens=None):
    """`prof` with RDKV curves set by hand: rd_dist [L, H, R] on budgets 0.5..4."""
    L, H = prof.num_layers, prof.num_kv_heads
    return dataclasses.replace(prof, rd_budgets=torch.tensor([0.5, 1.0, 2.0, 4.0]), rd_dist=cost_curves.reshape(L, H, 4).float(),
                               sens_o=torch.ones(L, H) if sens is None else sens)


def test_rd_head_bits_follow_the_steepest_curves(model_and_profile):
    _, prof = model_and_profile  # 2 layers x 2 KV heads
    flat = torch.tensor([1.0, 0.95, 0.9, 0.85])
    steep = torch.tensor([1.0, 0.5, 0.1, 0.01])
    p = _with_curves(prof, torch.stack([steep, flat, flat, steep]))
    for budget in (0.5, 1.3, 2.0, 3.7, 4.0):
        bits = profile_rd_bits(p, budget)
        assert bits.shape == (2, 2) and abs(bits.mean().item() - budget) < 1e-9
        assert bits[0, 0] == bits[1, 1] >= bits[0, 1] == bits[1, 0] and bits.min() >= 0.5 and bits.max() <= 4.0
    # budget 1.75: the steep heads take their first two segments (0.5->1->2) before any flat one
    assert profile_rd_bits(p, 1.75).tolist() == [[2.0, 1.5], [1.5, 2.0]]
    # sensitivity weighs the curves: a flat head 100x as sensitive wins over a steep one
    sens = torch.tensor([[1.0, 100.0], [1.0, 1.0]])
    bits = profile_rd_bits(_with_curves(prof, torch.stack([steep, flat, steep, steep]), sens), 1.0)
    assert bits[0, 1] == bits.max()
    with pytest.raises(ValueError, match=r"`budget` must be in \[0.5, 4\]"):
        profile_rd_bits(p, 0.25)


def test_rd_head_bits_skip_the_non_convex_points(model_and_profile):
    _, prof = model_and_profile
    bumpy = torch.tensor([1.0, 0.95, 0.2, 0.19])  # 1 bit barely helps: the hull goes 0.5 -> 2 straight
    p = _with_curves(prof, torch.stack([bumpy, bumpy, bumpy, bumpy]))
    from rdkv_hf.head_budgets import _lower_hull

    assert _lower_hull([(0.5, 1.0), (1.0, 0.95), (2.0, 0.2), (4.0, 0.19)]) == [((0.5, 1.0), (2.0, 0.2)), ((2.0, 0.2), (4.0, 0.19))]
    assert abs(profile_rd_bits(p, 1.25).mean().item() - 1.25) < 1e-9


def test_profiles_without_rd_curves_load_and_plan_as_before(model_and_profile, tmp_path):
    model, prof = model_and_profile
    assert prof.has_rd_curves
    old = dataclasses.replace(prof, rd_budgets=None, rd_dist=None, sens_o=None)
    loaded = RDKVProfile.from_pretrained(old.save_pretrained(tmp_path / "old"))
    assert not loaded.has_rd_curves
    with pytest.raises(ValueError, match="no RDKV curves"):
        profile_rd_bits(loaded, 2.0)
    cfg = RDKVConfig(budget=2.0, mode="rdkv+profile", profile="x")
    a, b = make_planner(cfg, loaded), make_planner(cfg, prof)
    kb, k2, v2 = a.k_bits, b.k_bits, b.v_bits
    assert not torch.equal(kb, k2)  # RateQuant's K/V budgets vs RDKV's curves split by k_share
    assert torch.allclose(k2, v2) and abs(torch.cat([k2, v2]).double().mean().item() - 2.0) < 1e-9
    with pytest.raises(ValueError, match="give all of"):
        dataclasses.replace(prof, sens_o=None)
    # show / the model card add the rdkv+profile head budgets only when the curves exist
    assert "RDKV: the budget" in prof.show(2.0) and "RDKV: the budget" not in loaded.show(2.0)
    assert "RDKV bits @2.5" in model_card(prof, "a/b") and "RDKV bits" not in model_card(loaded, "a/b")
