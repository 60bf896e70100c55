import json

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf.state import patch_state


def test_saved_patched_model_reloads_patched(tmp_path):
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=3.0, window=16)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rdkv"]["budget"] == 3.0 and saved["rdkv"]["window"] == 16

    again = rdkv_hf.from_pretrained(str(tmp_path))
    assert rdkv_hf.is_patched(again)
    assert patch_state(again).config == patch_state(model).config
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    a = model.generate(ids, max_new_tokens=5, do_sample=False)
    b = again.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_keywords_override_saved_settings(tmp_path):
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=3.0)
    model.save_pretrained(tmp_path)
    again = rdkv_hf.from_pretrained(str(tmp_path), tokens=8, dtype=torch.float32)
    cfg = patch_state(again).config
    assert cfg.tokens == 8 and cfg.budget is None


def test_unpatched_save_needs_settings(tmp_path):
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=3.0)
    rdkv_hf.unpatch(model)
    assert not hasattr(model.config, "rdkv")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="budget=2.5"):
        rdkv_hf.from_pretrained(str(tmp_path))
    assert rdkv_hf.is_patched(rdkv_hf.from_pretrained(str(tmp_path), budget=2.0))
