"""Every kernel configuration a launcher or autotuner can pick compiles for sm_80 and sm_90, unspilled.

The compile runs once per session in a subprocess without TRITON_INTERPRET (the interpreter has nothing
to compile): the ``compile_report`` fixture of tests/gpt_kernels/conftest.py, shared with test_sass.py.
"""

import pytest

from gpt_kernels.compile_check import ARCHS, collect_cases


def _case_ids():
    return [(c.name, f"sm_{cap}") for c in collect_cases() for cap in ARCHS if cap in c.archs]


@pytest.mark.parametrize("key", _case_ids(), ids=lambda k: f"{k[0]}-{k[1]}")
def test_compiles_without_spills(compile_report, key):
    row = compile_report.by_key[key]
    assert row["error"] is None, f"{key[0]} failed to compile for {key[1]}: {row['error']}"
    assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, (
        f"{key[0]} on {key[1]} spills: {row['spill_bytes']} local bytes, {row['stack_bytes']} stack bytes, "
        f"{row['registers']} registers")
