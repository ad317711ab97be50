"""GPT_KERNELS_AUTOTUNE: the switch the GPU check sets so that each autotuned launch compiles one config.

The autotuner's pruning (flash_attention._prune_for) is called as Triton calls it; with the switch it
keeps only the first config it would otherwise weigh, without it every one of them.
"""

import pytest
import torch

from gpt_kernels import flash_attention as fa


def _prune(name, length, block_d=64, dropout=False):
    tuner = fa._autotuned(name)
    q = torch.empty(1, 1, 1, block_d, dtype=torch.bfloat16)
    args = {"Q": q, "BLOCK_D": block_d, "DROPOUT": dropout, "TQ_KEY": length, "TK_KEY": length}
    return tuner.early_config_prune(tuner.configs, {}, **args)


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq"])
def test_first_keeps_the_first_candidate_only(monkeypatch, name):
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    every = _prune(name, 1024)
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "first")
    first = _prune(name, 1024)
    assert len(every) > 1, "the test needs a shape where the autotuner weighs several configs"
    assert [str(c) for c in first] == [str(every[0])]
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "all")
    assert [str(c) for c in _prune(name, 1024)] == [str(c) for c in every]


def test_first_measures_only_until_one_fits(monkeypatch):
    """Under 'first' the shared memory of the candidates (a compile each on a GPU) is read only until one fits."""
    measured = []
    monkeypatch.setattr(fa, "_smem_limit", lambda device: 100_000)
    monkeypatch.setattr(fa, "_smem_used", lambda kernel, launch, args: measured.append(launch) or 1000)
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "first")
    assert len(_prune("fwd", 1024)) == 1 and len(measured) == 1


def test_bad_value_says_what_to_use(monkeypatch):
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "fastest")
    with pytest.raises(ValueError, match="GPT_KERNELS_AUTOTUNE.*'all'.*'first'"):
        _prune("fwd", 1024)
