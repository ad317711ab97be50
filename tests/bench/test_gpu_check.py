"""The prepared GPU check: its CPU dry run end to end, and the parts that keep a failure from losing the rest.

The dry run is the pipeline a lent GPU runs first (bench/gpu_check.py), on the CPU with the suites' smoke
shapes under the Triton interpreter: every stage must run and write its file, and every suite must come
out clean, or the first minutes on a GPU would be spent on a bug the CPU could show.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Check, Step, parse_junit, run_subprocess

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a killed process whose parent is gone may linger as a zombie: not alive)."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def _results_snapshot() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").iterdir()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    committed = _results_snapshot()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    check = next(out.glob("*-gpu-check.json"), None)
    assert check is not None, f"no check file written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _results_snapshot() == committed, "the dry run wrote into bench/results/"
    return out, proc, json.loads(check.read_text()), seconds


def test_dry_run_writes_at_most_eight_flat_files(dry_run):
    out, proc, check, _ = dry_run
    files = sorted(out.iterdir())
    assert all(f.is_file() for f in files), "the device tool brings back files, not folders"
    assert len(files) <= 8
    stem = check["env"]["date"]
    names = {f.name.split(f"{stem}-", 1)[-1] for f in files}
    assert names == {"gpu-check.json", "gpu-check.log", *(f"{s}.json" for s in gpu_check.SUITES)}


def test_dry_run_runs_every_stage_and_prints_the_summary_last(dry_run):
    out, proc, check, _ = dry_run
    assert list(check["stages"]) == list(gpu_check.STAGES)
    for name, stage in check["stages"].items():
        assert stage["status"] in ("ok", "errors", "failed"), f"{name}: {stage}"  # ran: not skipped, not timed out
    tests = check["stages"]["tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"], "pytest -m gpu collects the GPU tests (no GPU)"
    assert "GPT_KERNELS_AUTOTUNE" not in check["env"]
    ceilings = check["env"]["ceilings"]
    assert ceilings["copy_GBps"] > 0 and ceilings["matmul_TFLOPs"] > 0
    tail = proc.stdout.strip().splitlines()
    summary = tail[tail.index(next(line for line in tail if line.startswith("stage"))):]
    for name in gpu_check.STAGES:
        assert any(line.startswith(name) for line in summary), f"{name} missing from the summary"
    assert summary[-1].startswith("total")


def test_dry_run_suites_have_rows_from_every_step(dry_run):
    out, _, check, _ = dry_run
    for suite in gpu_check.SUITES:
        data = json.loads(next(out.glob(f"*-{suite}.json")).read_text())
        steps = [s.label for s in gpu_check.suite_steps(suite, dry_run=True)]
        assert [s["step"] for s in data["steps"]] == steps
        assert {r["step"] for r in data["rows"]} == set(steps), f"{suite}: a step left no rows"
        assert data["machine"]["ceilings"], "each suite file carries the machine and its ceilings"


def test_dry_run_every_suite_clean(dry_run):
    _, proc, check, seconds = dry_run
    bad = {k: v["error"] for k, v in check["stages"].items() if v["status"] != "ok"}
    assert not bad, f"stages not clean: {bad}"
    assert proc.returncode == 0
    print(f"dry run: {seconds:.0f} s")


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path):
    check = Check(tmp_path, dry_run=True, budget_s=600)
    check.run_suite("norm", [Step("bad", {"smoke": True, "no_such_option": 1}),
                             Step("good", {"smoke": True, "widths": [16]})])
    outcome = check.outcomes["norm"]
    assert outcome.status == "failed"
    assert "TypeError" in outcome.error and "no_such_option" in outcome.error
    data = json.loads(next(tmp_path.glob("*-norm.json")).read_text())
    assert [(s["step"], s["status"]) for s in data["steps"]] == [("bad", "failed"), ("good", "ok")]
    assert data["rows"] and {r["step"] for r in data["rows"]} == {"good"}
    assert json.loads(next(tmp_path.glob("*-gpu-check.json")).read_text())["stages"]["norm"]["status"] == "failed"


def test_tune_runs_in_the_budgets_last_seconds_and_lands_in_the_check_json(tmp_path):
    check = Check(tmp_path, dry_run=True, budget_s=300, tune_s=120)
    assert check.left() < 300 - 120
    check.run_tune(("--head-dims", "16", "--dropouts", "0", "--no-ce", "--jobs", "1"))
    assert check.outcomes["tune"].status == "ok", check.outcomes["tune"].error
    saved = json.loads(next(tmp_path.glob("*-gpu-check.json")).read_text())
    assert {r["kernel"] for r in saved["tune"]["rows"]} == {"fwd", "dkdv", "dq"}
    assert saved["stages"]["tune"]["status"] == "ok"
    assert len(list(tmp_path.iterdir())) == 2, "the check JSON and the log: no file of its own"


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    log = tmp_path / "log"
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    rc, seconds, timed_out = run_subprocess([sys.executable, "-c", script], log, timeout=3, env=_env())
    assert timed_out and rc is None and seconds < 20
    assert not _alive(int(pid_file.read_text())), "the grandchild goes with its group (xdist and compile workers)"


def test_pytest_gets_sigint_before_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 5)
    script = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGINT, lambda *a: (print("interrupted: reporting what ran"), sys.exit(2)))
        time.sleep(120)
    """)
    log = tmp_path / "log"
    rc, seconds, timed_out = run_subprocess([sys.executable, "-c", script], log, timeout=8, env=_env(),
                                            interrupt=True)
    assert timed_out and rc == 2 and seconds < 8
    assert "interrupted: reporting what ran" in log.read_text()


def test_parse_junit_counts_failures_and_slowest(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="3.0">
        <testcase classname="tests.kernels.test_a" name="test_ok" time="0.5"/>
        <testcase classname="tests.kernels.test_a" name="test_slow" time="2.0"/>
        <testcase classname="tests.kernels.test_a" name="test_bad" time="0.1">
          <failure message="AssertionError: max error 0.5&#10;more">trace</failure></testcase>
        <testcase classname="tests.kernels.test_b" name="test_broken" time="0.1"><error message="fixture">x</error>
        </testcase>
        <testcase classname="tests.kernels.test_b" name="test_skip" time="0.0"><skipped message="no"/></testcase>
        </testsuite></testsuites>"""))
    got = parse_junit(path)
    assert (got["tests"], got["passed"], got["failures"], got["errors"], got["skipped"]) == (5, 2, 1, 1, 1)
    assert got["failed"][0] == {"test": "tests.kernels.test_a::test_bad", "kind": "failure",
                                "message": "AssertionError: max error 0.5"}
    assert got["slowest"][0] == {"test": "tests.kernels.test_a::test_slow", "seconds": 2.0}


def test_counts_from_a_killed_pytest_log():
    text = "....F..s\n=== 1 failed, 6 passed, 1 skipped, 2 errors in 40.1s ==="
    assert gpu_check._counts_from_log(text) == {"failures": 1, "passed": 6, "skipped": 1, "errors": 2}


def test_the_gpu_plan_splits_each_suite_into_quick_steps():
    from bench import bench_attention, bench_cross_entropy, bench_norm, e2e_train

    assert [s.kwargs["seq_lens"] for s in gpu_check.suite_steps("attention", False)] == [
        [t] for t in bench_attention.QUICK_SEQ_LENS]
    assert [s.kwargs["variants"] for s in gpu_check.suite_steps("e2e_train", False)] == [
        [v] for v in e2e_train.QUICK_VARIANTS]
    assert "compile-torch" in e2e_train.QUICK_VARIANTS and "eager-torch" in e2e_train.QUICK_VARIANTS
    assert [s.kwargs["sizes"] for s in gpu_check.suite_steps("cross_entropy", False)] == [
        [n] for n in bench_cross_entropy.QUICK_SIZES]
    for suite in ("norm", "activation"):
        assert [s.kwargs["widths"] for s in gpu_check.suite_steps(suite, False)] == [
            [n] for n in bench_norm.QUICK_WIDTHS]
    assert all(s.kwargs.get("quick") for suite in gpu_check.SUITES for s in gpu_check.suite_steps(suite, False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would start the real 9-minute check")
def test_without_a_gpu_the_real_check_says_how_to_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--dry-run" in proc.stderr and "Traceback" not in proc.stderr


def test_the_stage_caps_fit_the_budget_with_margin():
    """Every stage can run to its cap and the check still ends within its budget: the caps, the summary's
    reserve and the parent's margin add up to no more than the default budget (before, 725 s of caps
    against a 525 s deadline left the last suites no time)."""
    total = sum(gpu_check.CAPS_S.values()) + gpu_check.SUMMARY_RESERVE_S + gpu_check.MARGIN_S
    assert total <= gpu_check.DEFAULT_BUDGET_S, (
        f"caps {sum(gpu_check.CAPS_S.values())} s + reserve + margin = {total} s > {gpu_check.DEFAULT_BUDGET_S} s")
    assert set(gpu_check.CAPS_S) == set(gpu_check.STAGES)
    check = Check.__new__(Check)
    for budget in (300, 530, 900):  # caps scale with --budget
        check.scale = budget / gpu_check.DEFAULT_BUDGET_S
        assert sum(check.cap(s) for s in gpu_check.STAGES) + gpu_check.SUMMARY_RESERVE_S <= budget


def test_dry_run_overhead_between_steps_stays_within_the_margin(dry_run):
    """What the parent spends outside the stages (preflight, bookkeeping, starting steps) is within MARGIN_S."""
    _, _, check, _ = dry_run
    outside = check["elapsed_s"] - sum(s["seconds"] for s in check["stages"].values())
    assert outside <= gpu_check.MARGIN_S * gpu_check.DRY_RUN_BUDGET_S / gpu_check.DEFAULT_BUDGET_S, outside


def test_dry_run_plans_the_precompile(dry_run):
    """The precompile stage plans a workload's kernels (on the GPU it compiles them; here it plans for sm_90)."""
    _, _, check, _ = dry_run
    stage = check["stages"]["precompile"]
    assert stage["status"] == "ok", stage
    assert stage["compiles"] >= 4 and stage["compiles"] == stage["launched"], stage


def _present(name):
    return object()


def test_preflight_names_each_missing_piece_in_one_line(tmp_path):
    (tmp_path / "Python.h").write_text("")
    ok = gpu_check.preflight(find_spec=_present, which=lambda c: f"/usr/bin/{c}", environ={},
                             include_dir=str(tmp_path))
    assert ok == []
    missing = {"tiktoken", "xdist"}
    lines = gpu_check.preflight(find_spec=lambda m: None if m in missing else object(), which=lambda c: None,
                                environ={}, include_dir=str(tmp_path / "nowhere"))
    assert len(lines) == 4, lines
    assert any(line.startswith("package tiktoken ") and "pip install tiktoken" in line for line in lines)
    assert any(line.startswith("package pytest-xdist ") and "pip install pytest-xdist" in line for line in lines)
    assert any(line.startswith("no C compiler") for line in lines)
    assert any(line.startswith("no Python.h in ") and str(tmp_path / "nowhere") in line for line in lines)
    assert gpu_check.preflight(find_spec=_present, which=lambda c: None, environ={"CC": "cc"},
                               include_dir=str(tmp_path)) == []  # $CC counts as a compiler


def test_preflight_blocks_only_the_stages_that_need_the_missing_package():
    lines = ["package pytest is not installed (pip install pytest)", "package tiktoken is not installed (...)",
             "no C compiler (...)"]
    assert gpu_check.blocked_stages(lines) == {"tests": lines[0]}
    assert gpu_check.blocked_stages(["package triton is not installed (pip install triton)"]) == {
        "precompile": "package triton is not installed (pip install triton)"}


def test_a_stage_the_preflight_blocks_is_skipped_and_the_rest_still_run(tmp_path, monkeypatch):
    missing = "package pytest is not installed (pip install pytest)"
    monkeypatch.setattr(gpu_check, "preflight", lambda: [missing, "no C compiler (simulated)"])
    check = Check(tmp_path, dry_run=True, budget_s=600)
    rc = check.run(only=("tests",))
    saved = json.loads(next(tmp_path.glob("*-gpu-check.json")).read_text())
    assert saved["preflight"] == [missing, "no C compiler (simulated)"]
    assert saved["stages"]["tests"] == {"status": "skipped", "seconds": 0.0, "error": missing}
    assert saved["stages"]["env"]["status"] == "ok", "the env stage still ran"
    assert rc == 1


def test_the_gpu_tests_go_on_past_a_test_file_that_fails_to_import(tmp_path):
    check = Check(tmp_path, dry_run=False, budget_s=600)
    assert "--continue-on-collection-errors" in check.test_command(tmp_path / "junit.xml")
