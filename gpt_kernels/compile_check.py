"""Compile every kernel for real GPUs without one, and report registers, spills and shared memory per target.

The Triton interpreter accepts programs the GPU compiler rejects (and never spills), so CI also builds
each kernel, at every configuration its launcher or autotuner can choose, for every variant the model and
the benchmarks launch (dtypes, autocast's mixes, head dims, causal or not, dropout, decoding), into a
cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and reads its resource
usage with the ``cuobjdump`` that ships in Triton's wheel.

Targets (``ARCHS``): sm_80 (A100), sm_86 and sm_89 (consumer Ampere and Ada, L4/L40), sm_90 (H100/H200),
sm_100 (B200) and sm_120 (consumer Blackwell). Each has its shared memory per program (``SM_LIMITS``):
a compile that needs more cannot launch there. sm_86 and sm_89 get from Triton the very code sm_80 gets
up to PTX (the same TTGIR, so the same shared memory; only ptxas differs), so by default their rows are
sm_80's compile held to their own limits (``SHARES_TTGIR_WITH``; tests/gpt_kernels/test_compile.py checks
the identity on the heaviest kernels, and ``--exact`` builds them through ptxas for their own targets).

Each op module lists its cases in a ``compile_cases()`` function returning :class:`CompileCase` objects,
derived from the tables its launchers use (config functions, autotune tables, the dtypes it is called
with); ``tests/gpt/test_kernel_coverage.py`` checks that what the model and the benchmarks launch is
among them, marked ``launched``.

    python -m gpt_kernels.compile_check            # table: kernel, config, arch, registers, spills, smem
    python -m gpt_kernels.compile_check --json F   # the same, as JSON (the test suite reads this)
    python -m gpt_kernels.compile_check --arch 86 --exact   # sm_86 compiled for itself (from sm_80's TTGIR)
    python -m gpt_kernels.compile_check --launched-only      # only what the model and the benchmarks launch

This must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` gives interpreted
functions and there is nothing to compile (the test suite runs it in a subprocess with it unset).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from .common import LAUNCH_OPTIONS

OP_MODULES = tuple(f"gpt_kernels.{op}" for op in ("norm", "activation", "flash_attention", "fused_cross_entropy"))
ARCHS = (80, 86, 89, 90, 100, 120)  # the compute capabilities checked
# The targets every variant is compiled for, and held to no spills (the project's standard: sm_80 and sm_90,
# and the consumer parts of sm_80's family). The newer ones (sm_100, sm_120) get the variants a GPU runs by
# default (the model's bf16 autocast training at GPT-2's widths and head dim, bf16 generation, the
# benchmarks) and are held to compiling and to their shared memory; their spills are reported (notes()).
PRIMARY = (80, 86, 89, 90)
# Targets for which Triton generates the same TTGIR as for another (checked: test_compile.py): the same
# shared memory, registers and spills up to ptxas. Their rows are the other's compile unless --exact.
SHARES_TTGIR_WITH = {86: 80, 89: 80}
# Row widths the row-wise kernels are compiled at (their launch configs depend on the width alone;
# tests/gpt/test_kernel_coverage.py checks these against the presets and the benchmarks):
MODEL_WIDTHS = (64, 256, 768, 1024, 1280, 1600)  # the presets' hidden widths (tiny, mini, GPT-2 small .. XL)
FF_WIDTHS = (256, 1024, 3072, 4096, 5120, 6400)  # their 4x feed-forward widths (bias + GELU)
BENCH_WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)  # bench_norm and bench_activation, in bf16
WIDTHS = tuple(sorted(set(MODEL_WIDTHS + FF_WIDTHS + BENCH_WIDTHS)))


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
    archs: tuple = ARCHS  # the compute capabilities it is launched on (compiled for those only)
    # autotune candidates of one launch share a group: on a target the autotuner drops those whose shared
    # memory exceeds the GPU's, so one over the limit is pruned there, not a failure (unless all are)
    group: str = ""
    # whether the model or the benchmarks launch it (tests/gpt/test_kernel_coverage.py); False: only the public
    # API can (non-causal attention, head dim 80..96). CI's oldest-Triton stage compiles the launched ones only
    # (--launched-only), the test suite at the newest Triton all of them
    launched: bool = True

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


# ---------------------------------------------------------------------------- the variants a case stands for


def stand_in(kernel: str, pointers: dict, constexprs: dict) -> tuple[dict, dict]:
    """The compiled variant that stands for a launch's (pointer types, constexprs): what the check compiles
    in its place, by claims tests/gpt_kernels/test_compile.py checks on the heaviest configs:

    - fp16 as bf16: the same code with the other 16-bit type (the same registers and shared memory);
    - attention, head dim 96 as 80: the same masked loads of a 128-wide block, another bound;
    - attention, head dims 16 and 32 (BLOCK_D = HEAD_DIM) as 64, at the same tile: narrower operands of
      the same code (fewer registers, less shared memory).
    """
    pointers = {k: "*bf16" if t == "*fp16" else t for k, t in pointers.items()}
    consts = dict(constexprs)
    if kernel.startswith("_attn_") and "HEAD_DIM" in consts:
        if consts["HEAD_DIM"] == 96:
            consts["HEAD_DIM"] = 80
        if consts["BLOCK_D"] in (16, 32):
            consts["HEAD_DIM"] = consts["BLOCK_D"] = 64
    return pointers, consts


def declared_constexprs(module: str, kernel: str) -> list[str]:
    """The parameters a kernel declares ``tl.constexpr`` (not the integers Triton specializes to constants)."""
    fn = getattr(importlib.import_module(module), kernel)
    return [p.name for p in fn.params if p.is_constexpr]


def variant_key(kernel: str, signature: dict, constexprs: dict, divisible, num_warps: int, num_stages: int) -> tuple:
    """What identifies a compiled variant, whatever the shapes: the kernel, its pointers' types, its declared
    constexprs, which of its pointers and strides are 16-aligned (what vectorizes its loads; the other
    integers are shapes), warps and stages; after :func:`stand_in`."""
    pointers = {k: t for k, t in signature.items() if t.startswith("*")}
    pointers, constexprs = stand_in(kernel, pointers, constexprs)
    aligned = sorted(k for k in divisible if k in pointers or (k.startswith("stride") and signature.get(k) == "i32"))
    return (kernel, tuple(sorted(pointers.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(aligned), num_warps, num_stages)


def case_key(case: CompileCase) -> tuple:
    declared = declared_constexprs(case.module, case.kernel)
    return variant_key(case.kernel, case.signature, {k: v for k, v in case.constexprs.items() if k in declared},
                       case.extra.get("divisible_by_16", ()), case.num_warps, case.num_stages)


def request_key(module: str, kernel: str, data: str) -> tuple:
    """The variant key of a launch recorded by :mod:`gpt_kernels.precompile` (its specialization data)."""
    d = json.loads(data)
    names = list(d["signature"])
    consts = {names[k[0]]: v for k, v in zip(d["constant_keys"], d["constant_vals"]) if len(k) == 1}
    divisible = [names[k[0]] for k, v in zip(d["attrs_keys"], d["attrs_vals"])
                 if len(k) == 1 and ["tt.divisibility", 16] in v]
    declared = declared_constexprs(module, kernel)
    return variant_key(kernel, d["signature"], {k: v for k, v in consts.items() if k in declared}, divisible,
                       d["options"]["num_warps"], d["options"]["num_stages"])


def select_cases(kernel_substrings=None, launched_only: bool = False) -> list[CompileCase]:
    """Every case, or those whose kernel name contains one of ``kernel_substrings``; with ``launched_only``
    those the model or the benchmarks launch (CompileCase.launched)."""
    cases = [c for c in collect_cases() if c.launched or not launched_only]
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


_BRANCH = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?BRA(?:\.[A-Z.]+)?\s+(?:`\()?0x([0-9a-f]+)", re.M)


def loop_bodies(sass: str) -> list[int]:
    """The instructions of each loop, in address order: a branch back to an earlier address closes a loop
    whose body runs from that address to the branch (NOP padding not counted). A branch to itself (the
    trailing trap) is none."""
    addrs = [int(m.group(0).split("*/")[0].strip()[2:], 16) for m in _SASS_LINE.finditer(sass)
             if m.group(1) != "NOP"]
    loops = []
    for m in _BRANCH.finditer(sass):
        at, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < at:
            loops.append((target, sum(1 for a in addrs if target <= a <= at)))
    return [n for _, n in sorted(loops)]


def _width(mods: list[str]) -> int:
    return next((_WIDTH[m] for m in mods if m in _WIDTH), 32)


def sass_stats(sass: str) -> dict:
    """What the machine code of one kernel does, read from ``cuobjdump -sass``.

    - ``instructions``: SASS instructions, the trailing NOP padding not counted;
    - ``mma``: matrix instructions by shape, e.g. ``{"HGMMA.64x64x16": 16}`` (sm_90 warpgroup MMA) or
      ``{"HMMA.16816": 64}`` (sm_80 warp MMA); empty when the kernel has none;
    - ``ldg_bits`` / ``stg_bits``: the widest global load / store per thread (``LDG.E.128`` -> 128;
      ``LDGSTS``, the asynchronous global-to-shared copy, counts as a load); 0 when there is none;
    - ``loads``: every global-load opcode with its count, e.g. ``{"LDG.E.128": 4, "LDG.E.U16": 2}``;
    - ``loops``: the instructions of each loop body, in address order (:func:`loop_bodies`).
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
    return {"instructions": instructions, "mma": mma, "ldg_bits": ldg_bits, "stg_bits": stg_bits, "loads": loads,
            "loops": loop_bodies(sass)}


# Per-SM and per-program limits of the GPUs the kernels target (CUDA programming guide, "Compute
# capabilities" table): registers, threads, resident CTAs and shared memory per SM; "smem_per_cta" is the
# most one program may use (the opt-in maximum Triton's launcher asks for)
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 167936, "smem_per_cta": 166912},  # A100: 163 KB
    86: {"regs": 65536, "threads": 1536, "ctas": 16, "smem": 102400, "smem_per_cta": 101376},  # RTX 30xx, A10: 99 KB
    89: {"regs": 65536, "threads": 1536, "ctas": 24, "smem": 102400, "smem_per_cta": 101376},  # L4, L40, RTX 40xx
    90: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 233472, "smem_per_cta": 232448},  # H100: 227 KB
    100: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 233472, "smem_per_cta": 232448},  # B200: 227 KB
    120: {"regs": 65536, "threads": 1536, "ctas": 32, "smem": 102400, "smem_per_cta": 101376},  # RTX 50xx: 99 KB
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


def _source(case: CompileCase, ttgir: str | None, cap: int, tmp: str):
    """What triton.compile builds: the kernel's AST with the case's signature, or a TTGIR file (another
    target's, retargeted to ``cap``)."""
    from triton.compiler import ASTSource

    if ttgir is not None:
        path = os.path.join(tmp, "kernel.ttgir")
        with open(path, "w") as f:
            f.write(re.sub(r'ttg\.target = "cuda:\d+"', f'ttg.target = "cuda:{cap}"', ttgir))
        return path
    fn = getattr(importlib.import_module(case.module), case.kernel)
    signature = dict(case.signature)
    for k in case.constexprs:
        signature[k] = "constexpr"
    # Arguments the launcher always passes 16-divisible (aligned pointers, strides, widths): the JIT
    # specializes on that at run time and vectorizes loads, so compile the same specialization.
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case.extra.get("divisible_by_16", ())}
    return ASTSource(fn=fn, signature=signature, constexprs=dict(case.constexprs), attrs=attrs)


def _row_head(case: CompileCase, cap: int) -> dict:
    return {"name": case.name, "kernel": case.kernel, "module": case.module, "label": case.label,
            "arch": f"sm_{cap}", "num_warps": case.num_warps, "num_stages": case.num_stages,
            "constexprs": {k: str(v) for k, v in case.constexprs.items()}, "group": case.group,
            "error": None, "from": None}


def _limits(row: dict, case: CompileCase, cap: int) -> dict:
    """The target's view of a compiled row: its resident CTAs and whether its shared memory fits."""
    row["ctas_per_sm"] = resident_ctas(row["registers"], case.num_warps, row["shared_bytes"], cap)
    row["smem_limit"] = SM_LIMITS[cap]["smem_per_cta"]
    row["smem_ok"] = row["shared_bytes"] <= row["smem_limit"]
    return row


def compile_one(case: CompileCase, cap: int, sass_dir: str | None = None, ttgir: str | None = None,
                keep_ttgir: bool = False) -> dict:
    """Compile one case for ``sm_<cap>``; returns the report row (``error`` set if it failed): resource
    usage, resident CTAs per SM, whether the shared memory fits the target, :func:`sass_stats` and the
    compile's seconds. ``ttgir``: build from this TTGIR (another target's) instead of the source;
    ``keep_ttgir``: put the TTGIR in the row (for the targets that share it). ``sass_dir``: also write
    the SASS there."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = _row_head(case, cap)
    t0 = time.perf_counter()
    try:
        options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **LAUNCH_OPTIONS}  # as launched
        with tempfile.TemporaryDirectory() as tmp:
            compiled = triton.compile(_source(case, ttgir, cap, tmp), target=GPUTarget("cuda", cap, 32),
                                      options=options)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        cubin = compiled.asm["cubin"]
        row.update(_resource_usage(_cuobjdump_run("-res-usage", cubin)))
        row["shared_bytes"] = int(compiled.metadata.shared)
        _limits(row, case, cap)
        sass = _cuobjdump_run("-sass", cubin)
        row.update(sass_stats(sass))
        if keep_ttgir:
            row["ttgir"] = compiled.asm["ttgir"]
        if sass_dir:
            with open(os.path.join(sass_dir, sass_file_name(case, cap)), "w") as f:
                f.write(sass)
    except Exception as e:  # report every failure, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def sass_file_name(case: CompileCase, cap: int) -> str:
    """``sm_90-<kernel>-<label>-<hash of the whole case>.sass``: readable, and distinct for every case and target."""
    digest = hashlib.sha1(case.name.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", f"sm_{cap}-{case.kernel}-{case.label}")[:150] + f"-{digest}.sass"


def derive_row(base: dict, case: CompileCase, cap: int) -> dict:
    """The row of a target that shares ``base``'s TTGIR (SHARES_TTGIR_WITH), without compiling: the same
    code and shared memory, held to this target's limits. Registers and spills are ``base``'s (ptxas for
    this target may differ by a few registers: --exact compiles it)."""
    row = {**base, **_row_head(case, cap), "error": base["error"], "from": base["arch"]}
    row.pop("ttgir", None)
    return row if row["error"] else _limits(row, case, cap)


def _compile_star(args):
    return compile_one(*args)


def _pool_map(jobs: list, workers: int | None) -> list:
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    if workers == 1 or len(jobs) <= 1:
        return [compile_one(*j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=1))


def run(cases: list[CompileCase] | None = None, archs=ARCHS, workers: int | None = None,
        sass_dir: str | None = None, exact: bool = False) -> list[dict]:
    """Compile every case for every arch it is launched on, in a process pool; one report row each, in
    order (case by case). A target of SHARES_TTGIR_WITH gets its base target's row held to its own
    limits (``derive_row``), or with ``exact`` a compile from the base's TTGIR for itself."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile check cannot run under TRITON_INTERPRET=1: unset it")
    cases = collect_cases() if cases is None else cases
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
    wanted = [(c, cap) for c in cases for cap in archs if cap in c.archs]
    if not wanted:
        return []
    asked = {(id(c), cap) for c, cap in wanted}
    cases = list({id(c): c for c, _ in wanted}.values())
    # first the compiles of their own, and those of the targets the sharing ones take their rows from
    own = [(c, cap) for c in cases for cap in ARCHS if cap in c.archs and cap not in SHARES_TTGIR_WITH and (
        (id(c), cap) in asked or any((id(c), t) in asked for t, b in SHARES_TTGIR_WITH.items() if b == cap))]
    rows = dict(zip([(id(c), cap) for c, cap in own],
                    _pool_map([(c, cap, sass_dir, None, exact) for c, cap in own], workers)))
    shared = [(c, cap) for c, cap in wanted if cap in SHARES_TTGIR_WITH]
    if exact:
        jobs = [(c, cap, sass_dir, rows[(id(c), SHARES_TTGIR_WITH[cap])].get("ttgir")) for c, cap in shared]
        rows.update(zip([(id(c), cap) for c, cap in shared], _pool_map(jobs, workers)))
    else:
        rows.update({(id(c), cap): derive_row(rows[(id(c), SHARES_TTGIR_WITH[cap])], c, cap) for c, cap in shared})
    out = [rows[(id(c), cap)] for c, cap in wanted]
    for r in out:
        r.pop("ttgir", None)
    return out


def problems(rows: list[dict]) -> list[str]:
    """What fails the check, one line each: a compile error; spilled registers on a PRIMARY target; shared
    memory over the target's limit, except for an autotune candidate that another candidate of its launch
    can replace there (the autotuner drops those: see CompileCase.group). Empty when the check passes."""
    return [line for _, line in problems_by_row(rows)]


def notes(rows: list[dict]) -> list[str]:
    """Spills on the targets beyond PRIMARY, and OLD_TRITON_SPILLS: reported, not failing."""
    return [line for _, line in problems_by_row(rows, primary=False)]


# Spills the oldest supported Triton's ptxas (3.6) makes where 3.9's makes none: each a value or two stored to
# local memory once per program, outside every loop (issue 22's wider check found them; bench/README.md).
# (kernel, label, arch) -> the stack bytes accepted, at Triton < 3.7 only; any other spill, or more, fails.
OLD_TRITON_SPILLS = {
    ("_layer_norm_fwd_kernel", "N=768,1024 fp32", "sm_90"): 16,
    **{("_cross_entropy_kernel", "V=50257 fp32 fused", arch): 8 for arch in ("sm_80", "sm_86", "sm_89")},
}


def known_old_spill(r: dict, version: str | None = None) -> bool:
    """Whether row ``r``'s spill is one of OLD_TRITON_SPILLS at Triton ``version`` (default: the installed)."""
    if version is None:
        import triton

        version = triton.__version__
    limit = OLD_TRITON_SPILLS.get((r["kernel"], r["label"], r["arch"]))
    old = tuple(int(x) for x in version.split(".")[:2]) < (3, 7)
    return old and limit is not None and r["spill_bytes"] == 0 and 0 < r["stack_bytes"] <= limit


def problems_by_row(rows: list[dict], primary: bool = True) -> list[tuple[dict, str]]:
    """:func:`problems` (or, with ``primary=False``, :func:`notes`), each line with its row."""
    out = []
    fits = {}  # (group, arch) -> whether some candidate fits
    for r in rows:
        if r["group"] and not r["error"]:
            key = (r["group"], r["arch"])
            fits[key] = fits.get(key, False) or r["smem_ok"]
    for r in rows:
        where = f"{r['name']} on {r['arch']}"
        held = int(r["arch"][3:]) in PRIMARY  # to no spills
        known = not r["error"] and known_old_spill(r)
        if not primary:
            if not r["error"] and (not held or known) and r["spill_bytes"] + r["stack_bytes"] > 0:
                out.append((r, f"{where}: spills {r['spill_bytes']} local and {r['stack_bytes']} stack bytes "
                               f"({r['registers']} registers)" + (" (known at this Triton: OLD_TRITON_SPILLS)"
                                                                  if known else "")))
            continue
        if r["error"]:
            out.append((r, f"{where}: {r['error']}"))
            continue
        pruned = not r["smem_ok"] and r["group"] and fits[(r["group"], r["arch"])]
        if not r["smem_ok"] and not pruned:
            out.append((r, f"{where}: {r['shared_bytes']} bytes of shared memory, over the {r['smem_limit']} a "
                           f"program may use there" + (" (and so over it for every candidate of its launch)"
                                                       if r["group"] else "")))
        if r["spill_bytes"] + r["stack_bytes"] > 0 and not pruned and held and not known:
            out.append((r, f"{where}: spills {r['spill_bytes']} local and {r['stack_bytes']} stack bytes "
                           f"({r['registers']} registers)"))
    return out


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
            if not r["smem_ok"]:
                status = f"over {r['smem_limit'] // 1024} KB" + (" (pruned)" if r["group"] else "")
            if r["from"]:
                status += f" (as {r['from']})"
            lines.append(f"{r['kernel']:<34} {config[:46]:<46} {r['arch']:<6} {r['registers']:>5} {spill:>6} "
                         f"{r['shared_bytes']:>7}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt_kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-' for stdout only)")
    p.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this compute capability")
    p.add_argument("--exact", action="store_true", help="compile the targets that share another's TTGIR "
                                                        "(sm_86, sm_89) through ptxas for themselves too")
    p.add_argument("--launched-only", action="store_true",
                   help="only the variants the model or the benchmarks launch (not those only the API reaches)")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: cores)")
    p.add_argument("--sass-dir", metavar="DIR", help="also write each compile's SASS to DIR")
    args = p.parse_args(argv)
    cases = select_cases(args.kernel, launched_only=args.launched_only)
    t0 = time.perf_counter()
    rows = run(cases, archs=tuple(args.arch) if args.arch else ARCHS, workers=args.workers, sass_dir=args.sass_dir,
               exact=args.exact)
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        return 0
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad, noted = problems(rows), notes(rows)
    compiled = sum(1 for r in rows if not r["from"])
    print(f"\n{len(rows)} rows, {compiled} compiles ({time.perf_counter() - t0:.0f} s), {len(bad)} problems")
    for line in bad:
        print(f"  {line}")
    if noted:
        print(f"{len(noted)} spills beyond {', '.join(f'sm_{c}' for c in PRIMARY)} or known at this Triton "
              "(reported, not failing):")
        for line in noted:
            print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
