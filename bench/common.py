"""What every benchmark script shares: timing, the machine's description, tables and results files.

GPU timing uses ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between repeats, median).
CPU timing uses the median of repeated wall-clock runs after a warm-up. Every results file names the
device, torch, Triton and CUDA versions, so a number can always be traced to where it came from.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed results: written only when asked
SCRATCH_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench"  # any other run's (git ignores runs/)


def machine_info() -> dict:
    """Device name and library versions, recorded beside every figure."""
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"sm_{props.major}{props.minor}")
    else:
        info.update(device="cpu", gpu=None, cuda=None)
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                info["cpu"] = m.group(1).strip()
        except OSError:
            pass
    return info


def machine_tag(info: dict | None = None) -> str:
    """A file-name-safe name for the machine: the GPU's name, else 'cpu-<cores>'."""
    info = info or machine_info()
    name = info["gpu"] or f"cpu-{info['cpu_count']}core"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def cuda_time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` on the GPU in ms (``triton.testing.do_bench``: events, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cpu_time_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn, **kw) -> float:
    """GPU timing on a CUDA machine, CPU timing otherwise."""
    return cuda_time_ms(fn, **kw) if torch.cuda.is_available() else cpu_time_ms(fn, **kw)


def peak_memory(fn) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, in bytes, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_memory(fn) -> int:
    """Peak bytes torch's CPU allocator held while ``fn()`` ran, above what it held before.

    torch's CPU allocator keeps no statistics (there is no ``max_memory_allocated`` for it), but its every
    allocation and free is reported to the profiler with ``profile_memory=True``, with the byte count and a
    timestamp; their running sum in time order is the live tensor memory, to the byte, whichever op or
    thread made it (tracemalloc sees none of it: torch does not allocate through Python). Slow ops are not
    slower for it, but every allocation is recorded: keep ``fn`` to a step or two.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def format_table(rows: list[dict], columns: list[str], floatfmt: str = ".3g") -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``."""
    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def save_results(suite: str, rows: list[dict], extra: dict | None = None, out_dir: Path | None = None) -> Path:
    """Write ``{machine, suite, rows}`` to ``<out_dir>/<machine>-<date>-<suite>.json`` and return the path
    (``out_dir`` by default: ``runs/bench/``, which git ignores; see :func:`results_dir`)."""
    info = machine_info()
    out_dir = Path(out_dir or SCRATCH_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{machine_tag(info)}-{info['date']}-{suite}.json"
    payload = {"suite": suite, "machine": info, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=1))
    return path


def add_output_args(p) -> None:
    """--out DIR and --record: where a benchmark writes its results (see :func:`results_dir`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", metavar="DIR", help="write the results into DIR (default: runs/bench/ in the checkout, "
                                                "which git ignores)")
    g.add_argument("--record", action="store_true",
                   help="write them into bench/results/, the committed results (a run worth keeping)")


def results_dir(args) -> Path:
    """Where a run writes its results: ``--out DIR``; ``bench/results/`` with ``--record``; else
    ``runs/bench/``, ignored by git, so that trying a benchmark never leaves files to commit or clean up."""
    return Path(args.out) if args.out else RESULTS_DIR if args.record else SCRATCH_DIR


def add_kernel_bench_args(p) -> None:
    """The options every kernel benchmark's command line shares: --smoke, --no-save, --out and --record."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU through the Triton interpreter: checks the script, times nothing real")
    p.add_argument("--no-save", action="store_true", help="write no results file")
    add_output_args(p)


def start_kernel_bench(name: str, smoke: bool) -> bool:
    """Set up a kernel benchmark run: the interpreter for ``smoke``, else a GPU is needed. False: nothing to run.

    ``TRITON_INTERPRET`` is read when ``gpt_kernels`` is first imported, so the scripts import it after this.
    """
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(f"bench_{name} needs a CUDA GPU: nothing to time on this machine "
              "(run with --smoke for a tiny CPU pass through the code).")
        return False
    info = machine_info()
    print(f"device: {info['gpu'] or info['cpu']}, torch {info['torch']}, triton {info['triton']}")
    return True
