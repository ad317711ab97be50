"""Compile every kernel for real GPUs (sm_80, sm_90) without one, and report registers, spills and smem.

The Triton interpreter accepts programs the GPU compiler rejects (and never spills), so CI also builds
each kernel, at every block size and warp count its launcher or autotuner can choose for GPT-2's
widths, into a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and reads
its resource usage with the ``cuobjdump`` that ships in Triton's wheel.

Each op module lists its cases in a ``compile_cases()`` function returning :class:`CompileCase` objects.

    python -m gpt_kernels.compile_check            # table: kernel, config, arch, registers, spills, smem
    python -m gpt_kernels.compile_check --json F   # the same, as JSON (the test suite reads this)

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

from .common import LAUNCH_OPTIONS

OP_MODULES = tuple(f"gpt_kernels.{op}" for op in ("norm", "activation", "flash_attention", "fused_cross_entropy"))
ARCHS = (80, 90)
# Row widths the row-wise kernels are compiled at: the hidden widths of the common transformer sizes
# (768 .. 1600) and their 4x feed-forward widths. Their launch configs depend on the width alone.
WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)


@dataclass
class CompileCase:
    """One kernel at one configuration: what ``triton.compile`` needs, and a name for the report."""

    module: str  # the op module that lists it, e.g. "gpt_kernels.norm"
    kernel: str  # attribute name of the @triton.jit function in that module
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""  # what the configuration is for, e.g. "N=768 fp16"
    extra: dict = field(default_factory=dict)  # "divisible_by_16": [argument names], see compile_one
    archs: tuple = (80, 90)  # the compute capabilities it is used on (compiled for those only)

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


def select_cases(kernel_substrings=None) -> list[CompileCase]:
    """Every case, or those whose kernel name contains one of ``kernel_substrings``."""
    cases = collect_cases()
    if kernel_substrings:
        cases = [c for c in cases if any(s in c.kernel for s in kernel_substrings)]
    return cases


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump_run(flag: str, cubin: bytes) -> str:
    """``cuobjdump <flag>`` on a cubin, as text."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def _resource_usage(res_usage: str) -> dict:
    """Registers per thread, local memory (spills) and stack bytes from ``cuobjdump -res-usage``."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res_usage)
    if not m:
        raise RuntimeError(f"could not read cuobjdump's resource usage:\n{res_usage}")
    reg, stack, _shared_static, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "spill_bytes": local}


# One SASS instruction as cuobjdump prints it: "/*0a40*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, ... ;"
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)", re.M)
# access width of a load/store from its modifiers: .128, .64, .U16, .S8, ... (none: 32 bits)
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _width(mods: list[str]) -> int:
    return next((_WIDTH[m] for m in mods if m in _WIDTH), 32)


def sass_stats(sass: str) -> dict:
    """What the machine code of one kernel does, read from ``cuobjdump -sass``.

    - ``instructions``: SASS instructions, the trailing NOP padding not counted;
    - ``mma``: matrix instructions by shape, e.g. ``{"HGMMA.64x64x16": 16}`` (sm_90 warpgroup MMA) or
      ``{"HMMA.16816": 64}`` (sm_80 warp MMA); empty when the kernel has none;
    - ``ldg_bits`` / ``stg_bits``: the widest global load / store per thread (``LDG.E.128`` -> 128;
      ``LDGSTS``, the asynchronous global-to-shared copy, counts as a load); 0 when there is none;
    - ``loads``: every global-load opcode with its count, e.g. ``{"LDG.E.128": 4, "LDG.E.U16": 2}``.
    """
    instructions, mma, loads = 0, {}, {}
    ldg_bits = stg_bits = 0
    for m in _SASS_LINE.finditer(sass):
        op, mods = m.group(1), m.group(2).split(".")[1:]
        if op == "NOP":
            continue
        instructions += 1
        if op in ("HGMMA", "HMMA", "IMMA", "WGMMA"):
            key = f"{op}.{mods[0]}" if mods else op
            mma[key] = mma.get(key, 0) + 1
        elif op in ("LDG", "LDGSTS"):
            ldg_bits = max(ldg_bits, _width(mods))
            key = ".".join([op, *mods])
            loads[key] = loads.get(key, 0) + 1
        elif op == "STG":
            stg_bits = max(stg_bits, _width(mods))
    return {"instructions": instructions, "mma": mma, "ldg_bits": ldg_bits, "stg_bits": stg_bits, "loads": loads}


# Per-SM limits of the GPUs the kernels target (CUDA programming guide, "Compute capabilities" table)
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 167936, "smem_per_cta": 166912},  # A100: 164 KB
    90: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 233472, "smem_per_cta": 232448},  # H100: 228 KB
}


def resident_ctas(registers: int, num_warps: int, shared_bytes: int, cap: int) -> int:
    """How many CTAs (programs) of a kernel one SM of ``sm_<cap>`` holds at once: the fewest that its
    registers, threads, CTA slots and shared memory allow, as CUDA's occupancy calculator counts them.

    Registers are allocated per warp in units of 256 (a thread's count rounded up to a multiple of 8),
    from four quarters of the register file, one per scheduler; every CTA also reserves 1 KB of shared
    memory for the system. 0 when one CTA does not fit (too much shared memory).
    """
    lim = SM_LIMITS[cap]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_by_regs = (lim["regs"] // 4 // regs_per_warp) * 4
    smem = shared_bytes + 1024
    if shared_bytes > lim["smem_per_cta"]:
        return 0
    return max(0, min(warps_by_regs // num_warps, lim["threads"] // (32 * num_warps), lim["ctas"],
                      lim["smem"] // smem))


def compile_one(case: CompileCase, cap: int, sass_dir: str | None = None) -> dict:
    """Compile one case for ``sm_<cap>``; returns the report row (``error`` set if it failed): resource
    usage, resident CTAs per SM and :func:`sass_stats`. ``sass_dir``: also write the SASS there."""
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
        options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **LAUNCH_OPTIONS}  # as launched
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        cubin = compiled.asm["cubin"]
        row.update(_resource_usage(_cuobjdump_run("-res-usage", cubin)))
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["ctas_per_sm"] = resident_ctas(row["registers"], case.num_warps, row["shared_bytes"], cap)
        sass = _cuobjdump_run("-sass", cubin)
        row.update(sass_stats(sass))
        if sass_dir:
            safe = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", f"{case.name}-sm_{cap}")[:200]
            with open(os.path.join(sass_dir, f"{safe}.sass"), "w") as f:
                f.write(sass)
    except Exception as e:  # report every failure, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def _compile_star(args):
    return compile_one(*args)


def run(cases: list[CompileCase] | None = None, archs=ARCHS, workers: int | None = None,
        sass_dir: str | None = None) -> list[dict]:
    """Compile every case for every arch in a process pool; one report row each, in order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile check cannot run under TRITON_INTERPRET=1: unset it")
    cases = collect_cases() if cases is None else cases
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
    jobs = [(c, cap, sass_dir) for c in cases for cap in archs if cap in c.archs]
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
    p = argparse.ArgumentParser(prog="python -m gpt_kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-' for stdout only)")
    p.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this compute capability")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: cores)")
    p.add_argument("--sass-dir", metavar="DIR", help="also write each compile's SASS to DIR")
    args = p.parse_args(argv)
    cases = select_cases(args.kernel)
    rows = run(cases, archs=tuple(args.arch) if args.arch else ARCHS, workers=args.workers, sass_dir=args.sass_dir)
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
