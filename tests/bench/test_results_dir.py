"""Where benchmark results go (issue 15, item 13): a run someone tries writes into runs/bench/, which git
ignores; only --record writes the committed bench/results/; --out DIR writes exactly into DIR."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import common

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """The two default directories moved into tmp_path, and a one-row suite that runs in no time."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "SCRATCH_DIR", tmp_path / "scratch")
    suite = types.ModuleType("fake_suite")
    suite.run = lambda quick=False: [{"case": "a", "impl": "ours", "per_s": 2.0}, {"case": "a", "impl": "torch",
                                                                                 "per_s": 1.0}]
    monkeypatch.setitem(sys.modules, "fake_suite", suite)
    monkeypatch.setitem(bench_main.SUITES, "fake", ("fake_suite", False))
    return tmp_path


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


@pytest.mark.parametrize("options, where", [([], "scratch"), (["--record"], "results"), (["--out", "mine"], "mine")])
def test_python_m_bench_writes_where_it_is_told_and_nowhere_else(dirs, monkeypatch, capsys, options, where):
    monkeypatch.chdir(dirs)
    assert bench_main.main(["fake", *options]) == 0
    written = files(dirs / where)
    assert len(written) == 2 and any(n.endswith(".json") for n in written) and any(n.endswith("-fake.png")
                                                                                   for n in written)
    assert {p.name for p in dirs.iterdir()} == {where}  # the other two were not even created
    assert ("--record" in capsys.readouterr().out) == (where == "scratch")  # says how to keep a run


def test_a_script_run_alone_saves_into_runs_bench_unless_told(dirs):
    assert common.save_results("fake", [{"x": 1}]).parent == dirs / "scratch"
    args = types.SimpleNamespace(out=None, record=True)
    assert common.save_results("fake", [{"x": 1}], out_dir=common.results_dir(args)).parent == dirs / "results"


def test_git_ignores_the_scratch_directory_and_not_the_results():
    def ignored(path: Path) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", str(path / "x.json")], cwd=REPO).returncode == 0

    assert common.SCRATCH_DIR == REPO / "runs" / "bench" and ignored(common.SCRATCH_DIR)
    assert not ignored(common.RESULTS_DIR)


def test_a_suite_that_crashes_makes_python_m_bench_fail_after_saving_the_others(dirs, monkeypatch, capsys):
    monkeypatch.chdir(dirs)
    broken = types.ModuleType("broken_suite")

    def crash(quick=False):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    broken.run = crash
    monkeypatch.setitem(sys.modules, "broken_suite", broken)
    monkeypatch.setitem(bench_main.SUITES, "broken", ("broken_suite", False))
    assert bench_main.main(["fake", "broken", "--out", "out"]) == 1  # issue 27, item 10: not 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: 1 suite(s) crashed: broken (the traceback above")
    saved = json.loads(next((dirs / "out").glob("*.json")).read_text())["suites"]
    assert saved["fake"][0]["per_s"] == 2.0 and saved["broken"] == [
        {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]
    assert bench_main.main(["fake", "--out", "out"]) == 0  # a suite whose rows are all results: 0
