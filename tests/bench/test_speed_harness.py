"""The benchmark tests' plumbing (issue 28): a timed run of bench/test_speed.py is saved with what GB/s and
TFLOP/s are read from, ours and PyTorch's side by side in one group; a second run compares with it; runs are
stored per machine. (The bodies themselves run in CI with --benchmark-disable; the timings are not tested.)"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import conftest as bench_conftest

REPO = Path(__file__).resolve().parents[2]


def _pytest_bench(*args, cwd=REPO):
    # as a user runs them: no interpreter, and not as an xdist worker (pytest-benchmark reads PYTEST_XDIST_WORKER
    # and then times nothing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "bench/test_speed.py", "-q", "-p", "no:cacheprovider",
                           "-k", "layer_norm-fwd-", "--benchmark-only", "--benchmark-min-rounds=3",
                           "--benchmark-max-time=0.01", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_timed_run_is_saved_with_extra_info_and_the_next_one_compares_with_it(tmp_path):
    storage = tmp_path / "store"
    first = _pytest_bench(f"--benchmark-storage={storage}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = list(storage.rglob("*.json"))
    assert len(saved) == 1, f"one autosaved run expected, found {saved}"
    run = json.loads(saved[0].read_text())
    assert run["machine_info"]["gpt_triton"]["torch_threads"] == (torch.get_num_threads() if torch.cuda.is_available()
                                                                 else 1)
    groups = {}
    for b in run["benchmarks"]:
        if b["extra_info"]["op"] == "layer_norm":  # -k's "layer_norm-fwd-" also picks add_layer_norm's
            groups.setdefault(b["group"], []).append(b)
    assert groups
    for group, pair in groups.items():
        assert sorted(b["extra_info"]["provider"] for b in pair) == ["ours", "pytorch"], group
        for b in pair:
            info = b["extra_info"]
            M, N, e = info["M"], info["N"], {"float32": 4, "bfloat16": 2}[info["dtype"]]
            assert group == f"layer_norm fwd M={M} N={N}" and info["pass"] == "fwd"
            assert info["bytes"] == 2 * M * N * e + 2 * N * e + 8 * M  # bench_norm's formula for the forward
            assert abs(info["GB/s"] - info["bytes"] / b["stats"]["median"] / 1e9) < 1e-9 * info["GB/s"]
            ours = info["provider"] == "ours"
            assert info["backend"] == ("triton" if ours and torch.cuda.is_available() else "torch")
            assert b["name"].endswith(f"-{'ours-' + info['backend'] if ours else 'pytorch'}]")

    second = _pytest_bench(f"--benchmark-storage={storage}", "--benchmark-compare",
                           "--benchmark-compare-fail=median:1000000%")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"(0001_{saved[0].name.split('_')[1][:7]})" in second.stdout, "no comparison with the saved run"
    assert len(list(storage.rglob("*.json"))) == 2


def test_runs_are_stored_per_machine_and_saved_unless_told_otherwise():
    def configure(**options):
        opt = SimpleNamespace(**{"benchmark_storage": bench_conftest.DEFAULT_STORAGE, "benchmark_save": None,
                                 "benchmark_autosave": None, "collectonly": False, "benchmark_skip": False, **options})
        config = SimpleNamespace(option=opt, getoption=lambda name: {"torch_threads": 0}.get(name))
        bench_conftest.pytest_configure(config)
        return opt

    opt = configure()
    folder = bench_conftest.machine_folder(bench_conftest.common.machine_info())
    assert Path(opt.benchmark_storage) == REPO / ".benchmarks" / folder
    assert opt.benchmark_autosave  # the commit and the time, as --benchmark-autosave
    if not torch.cuda.is_available():
        assert folder.startswith("cpu-") and folder.endswith(f"-{os.cpu_count()}core-{torch.get_num_threads()}thread")
    assert configure(benchmark_storage="/elsewhere").benchmark_storage == "/elsewhere"
    assert configure(benchmark_save="mine").benchmark_autosave is None
    assert configure(collectonly=True).benchmark_autosave is None
