"""Every kernel configuration a launcher or autotuner can pick compiles for sm_80 and sm_90, unspilled.

The compile runs in a subprocess without TRITON_INTERPRET (the interpreter has nothing to compile).
"""

import json
import os
import subprocess
import sys

import pytest

from kernels.compile_check import ARCHS, collect_cases


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"compile check wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}


def _case_ids():
    return [(c.name, f"sm_{cap}") for c in collect_cases() for cap in ARCHS]


@pytest.mark.parametrize("key", _case_ids(), ids=lambda k: f"{k[0]}-{k[1]}")
def test_compiles_without_spills(report, key):
    row = report[key]
    assert row["error"] is None, f"{key[0]} failed to compile for {key[1]}: {row['error']}"
    assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, (
        f"{key[0]} on {key[1]} spills: {row['spill_bytes']} local bytes, {row['stack_bytes']} stack bytes, "
        f"{row['registers']} registers")
