"""GPT_KERNELS_AUTOTUNE: the switch the GPU check sets so that each autotuned launch compiles one config.

The autotuner's pruning (flash_attention._prune_for) is called as Triton calls it; with the switch it
keeps only the first config it would otherwise weigh, without it every one of them.
"""

import pytest
import torch

from gpt_kernels import flash_attention as fa


def _prune(kernel_configs, per_program, length, block_d=64, dropout=False):
    prune = fa._prune_for(kernel_configs, per_program)
    q = torch.empty(1, 1, 1, block_d, dtype=torch.bfloat16)
    args = {"Q": q, "BLOCK_D": block_d, "DROPOUT": dropout, "TQ_KEY": length, "TK_KEY": length}
    return prune([c.triton_config() for c in kernel_configs], args)


@pytest.mark.parametrize("configs,per_program", [(fa.FWD_CONFIGS, "TQ_KEY"), (fa.DKDV_CONFIGS, "TK_KEY"),
                                                  (fa.DQ_CONFIGS, "TQ_KEY")], ids=["fwd", "dkdv", "dq"])
def test_first_keeps_the_first_candidate_only(monkeypatch, configs, per_program):
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    every = _prune(configs, per_program, 1024)
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "first")
    first = _prune(configs, per_program, 1024)
    assert len(every) > 1, "the test needs a shape where the autotuner weighs several configs"
    assert [str(c) for c in first] == [str(every[0])]
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "all")
    assert [str(c) for c in _prune(configs, per_program, 1024)] == [str(c) for c in every]


def test_bad_value_says_what_to_use(monkeypatch):
    monkeypatch.setenv(fa.AUTOTUNE_ENV, "fastest")
    with pytest.raises(ValueError, match="GPT_KERNELS_AUTOTUNE.*'all'.*'first'"):
        _prune(fa.FWD_CONFIGS, "TQ_KEY", 1024)
