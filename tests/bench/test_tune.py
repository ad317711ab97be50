"""The tuning command's CPU dry run: every config of the kernels' lists is timed, and the summary covers them.

Under the interpreter a forced config runs with the interpreter's own tiles, so the times mean nothing;
what is checked is that the loop reads the lists from the kernel modules and reaches every config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

from bench import tune
from gpt_kernels import flash_attention as fa

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_every_serving_config_and_the_cross_entropy_choices(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.tune", "--dry-run", "--out", str(tmp_path), "--jobs", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*-tune.json")).read_text())
    rows = data["rows"]
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")]
    for D in tune.DRY["head_dims"]:
        for dropout in tune.DROPOUTS:
            for kernel, name in tune.KERNELS.items():
                want = {tune.config_name(c) for c in getattr(fa, name)
                        if c.serves(triton.next_power_of_2(D), dropout > 0, False)}
                got = {r["config"] for r in rows
                       if r["op"] == "attention" and r["kernel"] == kernel and r["D"] == D and r["dropout"] == dropout}
                assert want and got == want, (kernel, D, dropout)
    ce = [r for r in rows if r["op"] == "cross_entropy"]
    assert sum(r["launcher's pick"] for r in ce) == len(tune.DRY["V"]), "the launcher's own choice is among them"
    assert sum(r["default"] for r in rows if r["op"] == "linear_cross_entropy") == len(tune.DRY["V"])
    assert all(r["ms"] > 0 and r["x best"] >= 1.0 for r in rows)
    summary = {(s["kernel"], s["config"]) for s in data["summary"]}
    assert summary == {(r["kernel"], r["config"]) for r in rows}
    assert "never within 3%" in proc.stdout and "within 3% of the best somewhere" in proc.stdout


def test_plan_puts_gpt2_head_dim_and_cross_entropy_first():
    jobs = tune._plan((64, 128), (1024, 2048), (0.0, 0.1), with_ce=True)
    assert jobs[:4] == [("attention", 1024, 64, 0.0), ("attention", 2048, 64, 0.0), ("attention", 1024, 64, 0.1),
                        ("attention", 2048, 64, 0.1)]
    assert jobs[4] == ("cross_entropy",) and len(jobs) == 9
