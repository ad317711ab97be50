"""Compile a workload's kernels before it runs: all of them at once, in parallel processes.

On a cold Triton cache every kernel compiles the first time it launches, one after another, while the
GPU waits (a training step of a GPT-2-sized model: a few dozen compiles, each a few seconds). Here the
workload is first *planned*: run once with every Triton launch recorded instead of run (the rest of it,
PyTorch's own ops, runs as usual), each launch specialized by Triton's own JIT as it would be at run
time (argument dtypes, 16-byte alignment of pointers and integers, constexprs, warps and stages; for the
autotuned attention kernels every candidate the autotuner would time; for the backward kernels that
size their grid from the compiled kernel, that warm-up too). The distinct specializations are then
compiled in a process pool, through the JIT's own ``preload`` path, into Triton's on-disk cache, so that
when the workload runs for real every compile is a cache hit::

    from gpt_kernels.precompile import precompile
    precompile(step)   # step: a function running the workload once (e.g. one training step)
    step()             # no kernel compiles here

    python -m gpt_kernels.precompile bench.e2e_train:ours_step           # a workload named module:function
    python -m gpt_kernels.precompile MODULE:FUNCTION --plan-only --json F  # list what it would compile

Without a GPU a plan can still be made, for a named compute capability (``capability=90``): Triton's JIT
then specializes the launches for that target behind a stand-in driver that only names it, and
:func:`compile_plan` builds them for it, as :mod:`gpt_kernels.compile_check` does. The plan's requests say
where they came from (``launch``, or ``warmup`` for a grid sized from the compiled kernel), so the
number of compiles a cold start makes can be counted, and the double compiles a warm-up with other
arguments than its launch would cause can be seen (tests/gpt_kernels/test_precompile.py).

Must run without ``TRITON_INTERPRET=1`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from . import backend

# Streaming multiprocessors of the GPU a plan without one stands for (an H100 SXM: 132), per capability
DEFAULT_SMS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}


@dataclass(frozen=True)
class Request:
    """One compile Triton's JIT would make: the kernel, its specialization key and the data that rebuilds it."""

    module: str  # the module holding the @triton.jit function, e.g. "gpt_kernels.norm"
    kernel: str  # its name
    key: str  # the JIT's specialization key (argument types, alignments, constexprs, options), as text
    data: str  # Triton's specialization data (JSON: signature, constants, attributes, options, target)
    origin: str  # "launch": the kernel runs; "warmup": compiled to size a grid (common.resident_programs)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"


@dataclass
class Plan:
    """What a workload launches, recorded by :func:`plan`: every request in order, repeats included."""

    capability: int  # the compute capability the requests are specialized for, e.g. 90
    sms: int  # multiprocessors of the GPU planned for (sizes the grids that depend on it)
    requests: list = field(default_factory=list)

    def compiles(self) -> list[Request]:
        """The distinct specializations: what a cold start compiles, once each (first request of each)."""
        seen = {}
        for r in self.requests:
            seen.setdefault((r.name, r.key), r)
        return list(seen.values())

    def launched(self) -> list[Request]:
        """The distinct specializations that are launched (a warm-up that matches none is a wasted compile)."""
        seen = {}
        for r in self.requests:
            if r.origin == "launch":
                seen.setdefault((r.name, r.key), r)
        return list(seen.values())

    def programs_per_gpu(self, device: torch.device, num_warps: int) -> int:
        """The resident-program count a planned warm-up stands in for: one program of this size per SM
        (it sizes grids only; no specialization depends on it)."""
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return self.sms

    def summary(self) -> dict:
        by_kernel: dict = {}
        for r in self.compiles():
            by_kernel[r.kernel] = by_kernel.get(r.kernel, 0) + 1
        return {"capability": self.capability, "requests": len(self.requests), "compiles": len(self.compiles()),
                "launched": len(self.launched()), "by_kernel": by_kernel}


# ----------------------------------------------------------------------------------------------- planning


class _StandInDriver:
    """What Triton's JIT asks a driver while it specializes a launch, for a GPU that is not there: the device
    (an id no real device has, one per capability), a stream, and the target. Nothing is ever launched."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.device = 1000 + capability

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _stand_in_driver(capability: int | None):
    """Triton's active driver replaced by a stand-in naming ``capability`` (None: leave the real one)."""
    if capability is None:
        yield
        return
    from triton.runtime.driver import driver

    saved = getattr(driver, "_active", None)
    driver.set_active(_StandInDriver(capability))
    try:
        yield
    finally:
        driver._active = saved  # not reset_active(): that would create the default driver, which needs a GPU


def _check_not_interpreted() -> None:
    if backend.interpreter_enabled():
        raise RuntimeError("gpt_kernels.precompile cannot run under TRITON_INTERPRET=1 (the interpreter compiles "
                           "nothing): unset it")


def _cuda_capability() -> int | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@contextlib.contextmanager
def planning(capability: int | None = None, sms: int | None = None):
    """Record every Triton launch in the block into the :class:`Plan` it yields, instead of running it.

    ``capability``: the target to specialize for; default, the current GPU's (90 without one, through a
    stand-in driver). Kernels already compiled in this process launch as usual and are not recorded.
    """
    _check_not_interpreted()
    from triton import knobs

    gpu = _cuda_capability()
    target = capability or gpu or 90
    stand_in = None if (gpu is not None and target == gpu) else target
    plan = Plan(target, sms or DEFAULT_SMS.get(target, 132))

    def record(*, fn, compile, is_manual_warmup, **_):
        plan.requests.append(Request(fn.module if isinstance(fn.module, str) else fn.module.__name__, fn.name,
                                     str(compile["key"]), compile["specialization_data"],
                                     "warmup" if is_manual_warmup else "launch"))
        return True  # skip the compile, and with it the launch

    if backend._plan is not None:
        raise RuntimeError("gpt_kernels.precompile.planning() is already recording a plan")
    saved_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    backend._plan = plan
    try:
        with _stand_in_driver(stand_in):
            yield plan
    finally:
        backend._plan = None
        knobs.runtime.jit_cache_hook = saved_hook


def plan(workload, capability: int | None = None, sms: int | None = None) -> Plan:
    """Run ``workload()`` once with its Triton launches recorded, not run; returns the :class:`Plan`."""
    with planning(capability, sms) as p:
        workload()
    return p


# ---------------------------------------------------------------------------------------------- compiling


def _compile_request(request: Request, capability: int) -> dict:
    """In a worker process: compile one request through the JIT's ``preload`` (the path and cache key of a
    run-time compile) for ``capability``. Returns the seconds taken, or the error."""
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(request.module), request.kernel)
        with _stand_in_driver(capability):
            fn.preload(request.data)
        error = None
    except Exception as e:  # reported, never raised: the others still compile
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return {"kernel": request.kernel, "seconds": round(time.perf_counter() - t0, 2), "error": error}


def _compile_star(args):
    return _compile_request(*args)


@contextlib.contextmanager
def _without_interpreter():
    """Worker processes must not inherit TRITON_INTERPRET (their kernels would be interpreted functions)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_plan(p: Plan, workers: int | None = None) -> list[dict]:
    """Compile every distinct request of ``p`` in a pool of ``workers`` processes (default: the cores), into
    Triton's cache; one row per compile: kernel, seconds, error (None when it compiled)."""
    jobs = [(r, p.capability) for r in p.compiles()]
    if not jobs:
        return []
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    # fork: a worker needs no re-import of the caller's script (spawn would re-run one without a main guard);
    # it never touches the GPU (the stand-in driver names the target), so the parent's CUDA context is no harm
    ctx = multiprocessing.get_context("fork")
    with _without_interpreter(), ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=1))


def precompile(workload, workers: int | None = None, capability: int | None = None) -> dict:
    """Plan ``workload`` (see :func:`plan`), then compile its kernels in parallel; returns a report: the
    plan's summary, the compile rows, the wall seconds of each phase. Run the workload afterwards."""
    t0 = time.perf_counter()
    p = plan(workload, capability)
    t1 = time.perf_counter()
    rows = compile_plan(p, workers)
    return {**p.summary(), "plan_s": round(t1 - t0, 1), "compile_s": round(time.perf_counter() - t1, 1),
            "workers": workers or os.cpu_count(), "rows": rows,
            "errors": [r for r in rows if r["error"]]}


# -------------------------------------------------------------------------------------------- command line


def _load(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"workload {spec!r}: give it as MODULE:FUNCTION, e.g. bench.e2e_train:ours_step")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt_kernels.precompile", description=__doc__.splitlines()[0])
    p.add_argument("workload", help="MODULE:FUNCTION: a function of no arguments that runs the workload once")
    p.add_argument("--capability", type=int, help="compute capability to compile for (default: this GPU's, else 90)")
    p.add_argument("--workers", type=int, help="compile processes (default: the cores)")
    p.add_argument("--plan-only", action="store_true", help="record and list the compiles, compile nothing")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    workload = _load(args.workload)
    if args.plan_only:
        planned = plan(workload, args.capability)
        report = {**planned.summary(), "compiles_list": [asdict(r) | {"data": None} for r in planned.compiles()]}
    else:
        report = precompile(workload, args.workers, args.capability)
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "compiles_list")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
