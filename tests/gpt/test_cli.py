import subprocess
import sys

import pytest

from gpt import GPT, save_checkpoint
from gpt.cli import main


def test_info_lists_presets_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "124,412,160" in out and "163,009,536" in out and "backend=" in out


def test_generate_from_a_checkpoint(tmp_path, capsys):
    save_checkpoint(GPT.from_preset("tiny"), tmp_path / "ck")
    rc = main(["generate", "--prompt", "Every effort moves you", "--checkpoint", str(tmp_path / "ck"),
               "--max-new-tokens", "5", "--seed", "3", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_untrained_model_says_so(capsys):
    assert main(["generate", "--prompt", "Hi", "--preset", "tiny", "--max-new-tokens", "2"]) == 0
    assert "UNTRAINED" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["generate", "--prompt", "x", "--checkpoint", "/no/such/dir"], "does not exist"),
    (["generate", "--prompt", "", "--preset", "tiny"], "prompt is empty"),
    (["generate", "--prompt", "x", "--preset", "gpt5"], "unknown preset"),
    (["generate", "--prompt", "x", "--preset", "tiny", "--top-p", "2"], "--top-p must be in (0, 1]"),
])
def test_user_mistakes_are_one_line_errors(args, match):
    proc = subprocess.run([sys.executable, "-m", "gpt", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert match in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
