"""Compile every kernel for real GPUs (sm_80, sm_90) without one, and report registers, spills and smem.

The Triton interpreter accepts programs the GPU compiler rejects (and never spills), so CI also builds
each kernel, at every block size and warp count its launcher or autotuner can choose for GPT-2's
widths, into a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and reads
its resource usage with the ``cuobjdump`` that ships in Triton's wheel.

Each op module lists its cases in a ``compile_cases()`` function returning :class:`CompileCase` objects.

    python -m kernels.compile_check            # table: kernel, config, arch, registers, spills, smem
    python -m kernels.compile_check --json F   # the same, as JSON (the test suite reads this)

This must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` gives interpreted
functions and there is nothing to compile (the test suite runs it in a subprocess with it unset).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

OP_MODULES = ("kernels.norm", "kernels.activation", "kernels.flash_attention", "kernels.fused_cross_entropy")
ARCHS = (80, 90)
# Row widths the row-wise kernels are compiled at: the hidden widths of the common transformer sizes
# (768 .. 1600) and their 4x feed-forward widths. Their launch configs depend on the width alone.
WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)


@dataclass
class CompileCase:
    """One kernel at one configuration: what ``triton.compile`` needs, and a name for the report."""

    module: str  # the op module that lists it, e.g. "kernels.norm"
    kernel: str  # attribute name of the @triton.jit function in that module
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""  # what the configuration is for, e.g. "N=768 fp16"
    extra: dict = field(default_factory=dict)  # "divisible_by_16": [argument names], see compile_one

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{self.label}|{consts}|w{self.num_warps}s{self.num_stages}]"


def collect_cases() -> list[CompileCase]:
    cases = []
    for mod_name in OP_MODULES:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, "compile_cases", None)
        if fn is not None:
            cases.extend(fn())
    return cases


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread, local memory (spills) and stack bytes from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"could not read cuobjdump's resource usage:\n{out}")
    reg, stack, _shared_static, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "spill_bytes": local}


def compile_one(case: CompileCase, cap: int) -> dict:
    """Compile one case for ``sm_<cap>``; returns the report row (``error`` set if it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"name": case.name, "kernel": case.kernel, "module": case.module, "label": case.label,
           "arch": f"sm_{cap}", "num_warps": case.num_warps, "num_stages": case.num_stages,
           "constexprs": {k: str(v) for k, v in case.constexprs.items()}, "error": None}
    try:
        fn = getattr(importlib.import_module(case.module), case.kernel)
        signature = dict(case.signature)
        for k in case.constexprs:
            signature[k] = "constexpr"
        # Arguments the launcher always passes 16-divisible (aligned pointers, strides, widths): the JIT
        # specializes on that at run time and vectorizes loads, so compile the same specialization.
        names = list(fn.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case.extra.get("divisible_by_16", ())}
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(case.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        row.update(_resource_usage(compiled.asm["cubin"]))
        row["shared_bytes"] = int(compiled.metadata.shared)
    except Exception as e:  # report every failure, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def _compile_star(args):
    return compile_one(*args)


def run(cases: list[CompileCase] | None = None, archs=ARCHS, workers: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile check cannot run under TRITON_INTERPRET=1: unset it")
    cases = collect_cases() if cases is None else cases
    jobs = [(c, cap) for c in cases for cap in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    if workers == 1:
        return [compile_one(*j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=1))


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':<34} {'config':<46} {'arch':<6} {'regs':>5} {'spill':>6} {'smem':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        consts = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        config = f"{r['label']} {consts} w{r['num_warps']}s{r['num_stages']}".strip()
        if r["error"]:
            lines.append(f"{r['kernel']:<34} {config[:46]:<46} {r['arch']:<6} {'-':>5} {'-':>6} {'-':>7}  "
                         f"FAILED {r['error']}")
        else:
            spill = r["spill_bytes"] + r["stack_bytes"]
            status = "ok" if spill == 0 else "SPILLS"
            lines.append(f"{r['kernel']:<34} {config[:46]:<46} {r['arch']:<6} {r['registers']:>5} {spill:>6} "
                         f"{r['shared_bytes']:>7}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-' for stdout only)")
    p.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this compute capability")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: cores)")
    args = p.parse_args(argv)
    cases = collect_cases()
    if args.kernel:
        cases = [c for c in cases if any(s in c.kernel for s in args.kernel)]
    rows = run(cases, archs=tuple(args.arch) if args.arch else ARCHS, workers=args.workers)
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        return 0
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["error"] or r["spill_bytes"] + r["stack_bytes"] > 0]
    print(f"\n{len(rows)} compiles, {len(bad)} failed or spilled")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
