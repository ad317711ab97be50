"""The compile report the compile and SASS tests share: every kernel config built once per test session.

``python -m gpt_kernels.compile_check --json`` compiles every case of every op module for its targets
(in a process pool, without TRITON_INTERPRET: the interpreter has nothing to compile) and reads each
cubin's resources and SASS. That is the slow part, so it runs once per session; under pytest-xdist the
workers share one run through a file in the session's common temp directory, guarded by a lock.
A test asks the report for rows: ``compile_report.rows(kernel="_layer_norm_fwd_kernel", arch="sm_90")``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from filelock import FileLock


class CompileReport:
    """The rows of one compile check run (see ``gpt_kernels.compile_check.compile_one`` for their fields)."""

    def __init__(self, rows: list[dict]):
        from gpt_kernels.compile_check import problems_by_row

        self.all = rows
        self.by_key = {(r["name"], r["arch"]): r for r in rows}
        self.problems: dict = {}  # (name, arch) -> what fails the check there (compile_check.problems)
        for r, line in problems_by_row(rows):
            self.problems.setdefault((r["name"], r["arch"]), []).append(line)

    def rows(self, kernel: str | None = None, arch: str | None = None, label: str | None = None) -> list[dict]:
        """Rows of this kernel (exact name), arch ("sm_80", "sm_90", ...) and whose label contains ``label``."""
        return [r for r in self.all if (kernel is None or r["kernel"] == kernel) and (arch is None or r["arch"] == arch)
                and (label is None or label in r["label"])]


def _run_compile_check(out) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # GPT_KERNELS_COMPILE_CHECK_ARGS: a part of the check, for a run that needs no more (CI's oldest-Triton
    # stage runs test_autotune_configs.py alone of these tests: "--arch 80 --kernel _attn_")
    extra = os.environ.get("GPT_KERNELS_COMPILE_CHECK_ARGS", "").split()
    proc = subprocess.run([sys.executable, "-m", "gpt_kernels.compile_check", "--json", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), f"compile check wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def compile_report(tmp_path_factory, request) -> CompileReport:
    # xdist workers have their own basetemp under the session's; its parent is shared by all of them
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # running as a pytest-xdist worker
        root = root.parent
    out = root / "compile_report.json"
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            _run_compile_check(out)
    return CompileReport(json.loads(out.read_text()))
