"""Bad input gets a clear error: its type, a message naming the argument (and the fix), and the model
(or the files) left as they were."""

import json

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache, RDKVConfig, RDKVProfile
from rdkv_hf.cli import main
from rdkv_hf.compat import cache_kwargs


def snapshot(model):
    """What patch() must leave untouched when it refuses."""
    return (model.config._attn_implementation, "generate" in model.__dict__, hasattr(model.config, "rdkv"), rdkv_hf.is_patched(model))


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    from rdkv_hf.calibration import calibrate

    ids = torch.randint(1, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    return calibrate(tiny_model("llama"), ids, progress=False).save_pretrained(tmp_path_factory.mktemp("p") / "prof")


PATCH_CASES = [
    (dict(budget=17), ValueError, r"`budget` must be in \(0, 16\].*17"),
    (dict(budget=0), ValueError, r"`budget`.*got 0"),
    (dict(budget=-1.5), ValueError, r"`budget`.*-1.5"),
    (dict(budget="2"), TypeError, r"`budget` must be a number"),
    (dict(budget=True), TypeError, r"`budget` must be a number"),
    (dict(tokens=-3), ValueError, r"`tokens` must be a positive int.*-3"),
    (dict(tokens=2.5), ValueError, r"`tokens` must be a positive int"),
    (dict(budget=2.5, tokens=64), ValueError, r"`budget`.*`tokens`.*not both"),
    (dict(mode="fast"), ValueError, r"`mode` must be one of .*'rdkv'.*got 'fast'"),
    (dict(mode="rdkv+profile"), ValueError, r"mode='rdkv\+profile' needs a profile"),
    (dict(mode="ratequant"), ValueError, r"mode='ratequant' needs a profile"),
    (dict(window=0), ValueError, r"`window` must be a positive int"),
    (dict(window=True), ValueError, r"`window` must be a positive int"),
    (dict(pool_kernel=4), ValueError, r"`pool_kernel` must be a positive odd int"),
    (dict(pool="median"), ValueError, r"`pool` must be 'avg' or 'max'"),
    (dict(carry=1.0), ValueError, r"`carry` must be in \[0, 1\)"),
    (dict(k_share="x"), TypeError, r"`k_share` must be a number"),
    (dict(k_share=1.0), ValueError, r"`k_share` must be in \(0, 1\)"),
    (dict(head_floor=-0.1), ValueError, r"`head_floor`.*\[0, 1\)"),
    (dict(widths=(0, 4, 12)), ValueError, r"`widths` must be drawn from 0..8 and include 16"),
    (dict(eps_v={0: 1.0, 16: 0.0}), ValueError, r"`eps_v` needs a distortion for every width"),
    (dict(high_precision_dtype="float64"), ValueError, r"`high_precision_dtype` must be one of"),
    (dict(backend="cuda"), ValueError, r"`backend` must be one of"),
    (dict(residual=-1), ValueError, r"`residual` must be a number of tokens"),
    (dict(min_tokens=-1), ValueError, r"`min_tokens` must be a number of tokens"),
    (dict(min_tokens=2.5), ValueError, r"`min_tokens` must be a number of tokens"),
    (dict(colour="red"), TypeError, r"colour"),
    (dict(config="budget=2"), TypeError, r"`config` must be an RDKVConfig"),
    (dict(config=RDKVConfig(), budget=3), ValueError, r"either `config=RDKVConfig\(...\)` or keyword settings"),
    (dict(profile=3), TypeError, r"`profile` must be an RDKVProfile, a Hub repo id or a directory"),
    (dict(profile="./no/such/profile"), FileNotFoundError, r"profile directory './no/such/profile' does not exist"),
]


@pytest.mark.parametrize("kwargs,exc,match", PATCH_CASES, ids=[str(c[0])[:40] for c in PATCH_CASES])
def test_patch_refuses_bad_settings_and_leaves_the_model_alone(kwargs, exc, match):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        rdkv_hf.patch(model, **kwargs)
    assert snapshot(model) == before


def test_patch_refuses_other_objects_and_unsupported_models():
    with pytest.raises(TypeError, match="patch\\(\\) takes a Transformers model, got str"):
        rdkv_hf.patch("gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'.*supported: \["):
        rdkv_hf.patch(model)


def test_a_patched_model_refused_a_repatch_keeps_its_settings():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=3.0)
    with pytest.raises(ValueError, match="`budget`"):
        rdkv_hf.patch(model, budget=99)
    assert rdkv_hf.is_patched(model) and model.config.rdkv["budget"] == 3.0


def test_backend_triton_without_cuda_is_refused_at_patch():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="backend='triton'"):
        rdkv_hf.patch(model, budget=2.5, backend="triton")
    assert snapshot(model) == before


def test_profile_for_another_model_is_refused(profile_dir):
    model = tiny_model("llama", num_hidden_layers=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not match this model"):
        rdkv_hf.patch(model, budget=2.5, profile=str(profile_dir))
    assert snapshot(model) == before


@pytest.mark.parametrize("budget,match", [(0.2, r"`budget` must be in \[1, 8\]|budget"), (12.0, r"`budget` between")])
def test_ratequant_budget_outside_its_range(profile_dir, budget, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        rdkv_hf.patch(model, budget=budget, profile=str(profile_dir), mode="ratequant")
    assert not rdkv_hf.is_patched(model)


# -- generate and the cache ------------------------------------------------------------------


def test_generate_with_both_cache_names_is_refused():
    from rdkv_hf import compat

    if compat.CACHE_ARG != "cache":
        pytest.skip("one name only before Transformers 5.24")
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.raises(ValueError, match="both `cache=` and `past_key_values=`"):
        model.generate(torch.ones(1, 5, dtype=torch.long), cache=RDKVCache(model), past_key_values=RDKVCache(model))


def test_generate_with_an_rdkv_cache_and_use_cache_false_is_refused():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(torch.ones(1, 5, dtype=torch.long), use_cache=False, **cache_kwargs(RDKVCache(model)))


def test_a_static_cache_implementation_turns_rdkv_off_loudly():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.warns(UserWarning, match="cache_implementation='static'.*RDKV compression is off"):
        model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=2, cache_implementation="static")


def test_a_cache_built_for_another_model_is_refused():
    small, big = tiny_model("llama"), tiny_model("llama", num_hidden_layers=3)
    rdkv_hf.patch(small, budget=2.5)
    rdkv_hf.patch(big, budget=2.5)
    with pytest.raises(ValueError, match="built for a model with 2 layers.*RDKVCache\\(model\\)"):
        big(torch.ones(1, 8, dtype=torch.long), **cache_kwargs(RDKVCache(small)))
    wide = tiny_model("llama", num_key_value_heads=4)
    rdkv_hf.patch(wide, budget=2.5)
    with pytest.raises(ValueError, match="2 KV heads of dimension 16.*gives 4"):
        wide(torch.ones(1, 8, dtype=torch.long), **cache_kwargs(RDKVCache(small)))


def test_rdkv_cache_needs_settings_or_a_patched_model():
    with pytest.raises(TypeError, match="patched model"):
        RDKVCache(object())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a patched model.*RDKVConfig"):
        RDKVCache(model)
    with pytest.raises(TypeError, match="`config` must be an RDKVConfig"):
        RDKVCache(model, {"budget": 2})


# -- profiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("calibration", None, r"`calibration` must be a JSON object"),
    ("calibration", [1, 2], r"`calibration` must be a JSON object"),
    ("fingerprint", None, r"`fingerprint` must be a JSON object"),
    ("quantizer", "minmax", r"`quantizer` must be a JSON object"),
    ("schema_version", 99, r"schema_version 99.*upgrade rdkv_hf"),
])
def test_damaged_profile_configs_name_what_is_wrong(profile_dir, tmp_path, key, value, match):
    import shutil

    folder = shutil.copytree(profile_dir, tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        RDKVProfile.from_pretrained(folder)


def test_profile_without_fit_widths_and_profile_path_that_is_a_file(profile_dir, tmp_path):
    import shutil

    folder = shutil.copytree(profile_dir, tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    del config["calibration"]["widths"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`calibration.widths`.*missing"):
        RDKVProfile.from_pretrained(folder)
    with pytest.raises(ValueError, match="is a file; give the profile's folder"):
        RDKVProfile.from_pretrained(folder / "config.json")
    with pytest.raises(TypeError, match="`repo_id_or_dir` must be a repo id or a directory"):
        RDKVProfile.from_pretrained(42)


def test_saving_a_profile_over_other_files_is_refused(profile_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files \\(keep.txt\\)"):
        RDKVProfile.from_pretrained(profile_dir).save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# -- calibrate -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_seqs=2.5), r"`n_seqs` must be an int >= 1, got 2.5"),
    (dict(n_seqs=0), r"`n_seqs` must be an int >= 1"),
    (dict(seq_len=1), r"`seq_len` must be an int >= 2"),
    (dict(batch_size=0), r"`batch_size` must be an int >= 1"),
    (dict(widths=[4]), r"`widths` must hold at least 2 distinct integers"),
    (dict(widths=[2, 9]), r"`widths` must hold at least 2 distinct integers in 1..8"),
])
def test_calibrate_refuses_bad_arguments(kwargs, match):
    from rdkv_hf.calibration import calibrate

    with pytest.raises(ValueError, match=match):
        calibrate(tiny_model("llama"), torch.ones(2, 16, dtype=torch.long), progress=False, **kwargs)


def test_calibrate_refuses_text_without_a_tokenizer_and_a_patched_model():
    from rdkv_hf.calibration import calibrate

    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        calibrate(tiny_model("llama"), progress=False)
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    with pytest.raises(ValueError, match="unpatch"):
        calibrate(model, torch.ones(1, 16, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="calibrate\\(\\) takes a Transformers model"):
        calibrate("a model", torch.ones(1, 16, dtype=torch.long), progress=False)


# -- from_pretrained -------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_from_pretrained_without_settings_names_the_fix(saved_model):
    with pytest.raises(ValueError, match=r"no RDKV settings.*budget=2.5"):
        rdkv_hf.from_pretrained(str(saved_model))


def test_from_pretrained_passes_a_transformers_config_through(saved_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(saved_model)
    model = rdkv_hf.from_pretrained(str(saved_model), config=config, budget=2.5)
    assert rdkv_hf.is_patched(model) and model.config.rdkv["budget"] == 2.5
    model = rdkv_hf.from_pretrained(str(saved_model), config=RDKVConfig(budget=3.0))
    assert model.config.rdkv["budget"] == 3.0


def test_from_pretrained_with_bad_settings(saved_model):
    with pytest.raises(ValueError, match="`budget`"):
        rdkv_hf.from_pretrained(str(saved_model), budget=40)
    with pytest.raises(ValueError, match="unknown RDKV settings \\['colour'\\]"):
        model = tiny_model("llama")
        model.config.rdkv = {"budget": 2.5, "colour": "red"}
        model.save_pretrained(saved_model)
        rdkv_hf.from_pretrained(str(saved_model))


def test_from_pretrained_of_a_model_patched_with_an_in_memory_profile(profile_dir, tmp_path):
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5, profile=RDKVProfile.from_pretrained(profile_dir), mode="rdkv+profile")
    model.config.rdkv["profile"] = None  # as an in-memory profile (no name) writes it
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="mode='rdkv\\+profile', which needs a profile, but name none"):
        rdkv_hf.from_pretrained(str(tmp_path / "m"))


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("argv,match", [
    (["profile", "show", "./no/such/profile"], "does not exist"),
    (["profile", "show", "smollm2-135m-instruct", "--budget", "40"], "budget"),
    (["eval", "--methods", "rdkv,nope", "--model", "smollm2-135m"], "unknown method 'nope'"),
    (["eval", "--tasks", "mmlu"], "unknown task"),
    (["demo", "--model", "gpt-5"], "unknown model name 'gpt-5'"),
])
def test_cli_errors_are_one_line_and_exit_1(argv, match, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        main(["--debug", "profile", "show", "./no/such/profile"])
