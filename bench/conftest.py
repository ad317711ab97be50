"""pytest set-up for the benchmark tests (``bench/test_speed.py``): where their runs are saved, and what a saved
run records about the machine.

Unless told otherwise (``--benchmark-storage``, ``--benchmark-save NAME``), a timed run is saved, as
``--benchmark-autosave`` does (``<counter>_<commit>_<date>.json``), under ``.benchmarks/<machine>/`` in the
checkout (ignored by git): one folder per GPU (its name) or CPU (model, cores, torch's threads), so that
``--benchmark-compare`` compares a run with the last one saved on the same hardware, never another
machine's. pytest-benchmark adds its own folder below that, one per Python version.

Without a GPU, torch times on one CPU thread unless ``--torch-threads N`` says otherwise: on a machine that
other work shares, an op spread over every core waits for its slowest thread, which the scheduler may
leave waiting for a whole slice (measured on a busy 2-core machine: a tiny model's training step took a
median of 626 ms on 2 threads, 107 ms on 1). The count is in the saved run's ``machine_info``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bench import common

STORAGE = Path(__file__).resolve().parent.parent / ".benchmarks"
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default for --benchmark-storage


def machine_folder(info: dict) -> str:
    """The GPU's name (as ``python -m bench`` names its files), else the CPU's model, cores and the threads
    torch times on (runs on other thread counts are not compared)."""
    if info["gpu"]:
        return common.machine_tag(info)
    name = f"cpu-{info['cpu']}-{info['cpu_count']}core-{torch.get_num_threads()}thread"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def pytest_addoption(parser):
    parser.addoption("--torch-threads", type=int, default=None, metavar="N",
                     help="torch's CPU threads while timing (default: 1 on a machine without a GPU, where with "
                          "more, any other process stalls an op's threads by whole scheduler slices; torch's "
                          "own choice with a GPU). 0: torch's own choice")


def pytest_configure(config):
    """Runs before pytest-benchmark's own (``trylast``), which reads these options."""
    threads = config.getoption("torch_threads")
    if threads is None and not torch.cuda.is_available():
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    opt = config.option
    if not hasattr(opt, "benchmark_storage"):  # pytest-benchmark not loaded (-p no:benchmark)
        return
    if opt.benchmark_storage == DEFAULT_STORAGE:
        opt.benchmark_storage = str(STORAGE / machine_folder(common.machine_info()))
    if not (opt.benchmark_save or opt.benchmark_autosave or opt.collectonly or opt.benchmark_skip):
        from pytest_benchmark.utils import get_tag

        opt.benchmark_autosave = get_tag()  # what --benchmark-autosave stores: the commit and the time


def pytest_benchmark_update_machine_info(config, machine_info):
    """The device and versions of ``python -m bench``'s files (GPU, CUDA, torch, Triton) in the saved run."""
    machine_info["gpt_triton"] = {**common.machine_info(), "torch_threads": torch.get_num_threads()}
