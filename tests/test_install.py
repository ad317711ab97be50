"""The installed package shares no import name with anyone else's, and lives beside transformers 5.

transformers >= 5 installs Hugging Face's ``kernels`` package (its kernel hub loader). Our kernel package was
once a top-level ``kernels`` too: whichever came first on ``sys.path`` won, so the ``gpt`` console script got
Hugging Face's and transformers got ours. These tests need the project installed (the README's
``pip install -e ".[dev]"``, or ``pip install --no-deps --no-build-isolation -e .`` on an offline GPU machine).
"""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = "gpt-triton"


def _our_top_level_names():
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed in {sys.prefix}: run the README's install (pip install -e '.[dev]')")
    owners = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in owners.items() if DIST in dists}


def test_what_we_install_at_the_top_level_is_ours_alone():
    names = _our_top_level_names()
    assert set(names) == {"gpt", "gpt_kernels"}, f"{DIST} installs these top-level names: {sorted(names)}"
    for name, dists in names.items():
        assert set(dists) == {DIST}, f"the import name {name!r} is installed by {dists}, not by {DIST} alone"


# One process: transformers (whose 5.x imports Hugging Face's `kernels`), our kernels, a forward of each model.
_BOTH = textwrap.dedent("""
    import importlib.metadata, os, sys
    import torch, transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    import gpt_kernels
    from gpt import GPT

    root = os.path.realpath(sys.argv[1])
    assert os.path.realpath(gpt_kernels.__file__).startswith(root + os.sep), gpt_kernels.__file__
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:  # its hub loader is installed beside us and is the one `import kernels` finds
        import kernels
        assert set(importlib.metadata.packages_distributions()["kernels"]) == {"kernels"}
        assert not os.path.realpath(kernels.__file__).startswith(root + os.sep), kernels.__file__
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16)).eval()
    idx = torch.randint(0, 97, (2, 9))
    assert hf(idx).logits.shape == (2, 9, 97)
    ours = GPT.from_preset("tiny").eval()
    assert ours(idx).shape == (2, 9, ours.config.vocab_size)
    x = torch.randn(3, 64)
    torch.testing.assert_close(gpt_kernels.layer_norm(x, (64,)), torch.nn.functional.layer_norm(x, (64,)))
    print("ok", transformers.__version__)
""")


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_transformers_and_gpt_kernels_in_one_process(where, tmp_path):
    _our_top_level_names()
    cwd = ROOT if where == "checkout" else tmp_path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", _BOTH, ROOT], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-3000:]


def test_the_console_script_builds_a_model_from_another_directory(tmp_path):
    """`gpt` as the user types it: its sys.path[0] is the environment's bin/, not the checkout."""
    _our_top_level_names()
    script = os.path.join(os.path.dirname(sys.executable), "gpt")
    assert os.path.exists(script), f"no `gpt` console script beside {sys.executable}: reinstall the project"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([script, "generate", "--preset", "tiny", "--prompt", "Every effort moves you",
                           "--max-new-tokens", "4", "--seed", "1", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Every effort moves you") and len(proc.stdout) > len("Every effort moves you")
