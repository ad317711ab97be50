"""What each kernel config compiles to on each target (sm_80 .. sm_120): resources, occupancy, the shape of its SASS.

The speed evidence that needs no GPU. Every config of :mod:`gpt_kernels.compile_check` (the same case lists
and the same compile path) is built for the target and its machine code read with the ``cuobjdump``
in Triton's wheel:

- ``regs``, ``spill`` (local + stack bytes), ``smem`` (shared memory, KB) per CTA;
- ``CTA/SM``: CTAs one SM holds at once (registers, threads, CTA slots, shared memory; see
  :func:`gpt_kernels.compile_check.resident_ctas`);
- ``mma``: the matrix instructions by shape and count (``HGMMA.64x128x16 x24``; ``HMMA.16816`` on
  sm_80; ``-`` for none): an HGMMA with N = 16 wastes most of a warpgroup MMA's issue slots;
- ``ldg`` / ``stg``: the widest global load / store per thread in bits (128 = ``LDG.E.128``: 16 bytes
  a thread, what a bandwidth-bound kernel needs);
- ``instrs``: SASS instructions in the whole kernel (NOP padding not counted);
- ``loops``: the instructions of each loop body, in address order (``305/472``: two loops).

Targets sm_86 and sm_89 show sm_80's compile held to their limits (the same TTGIR; see compile_check).

    python -m gpt_kernels.report                       # every target
    python -m gpt_kernels.report --arch 90             # the table bench/README.md shows
    python -m gpt_kernels.report --arch 90 --json F    # also the rows as JSON
    python -m gpt_kernels.report --kernel _attn_fwd    # only kernels whose name contains this

Like the compile check, it must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .compile_check import ARCHS, run, select_cases


def format_mma(mma: dict) -> str:
    """``{"HGMMA.64x128x16": 24, "HGMMA.64x64x16": 8}`` -> ``"HGMMA 64x128x16 x24, 64x64x16 x8"``."""
    if not mma:
        return "-"
    by_op: dict = {}
    for key, n in sorted(mma.items(), key=lambda kv: -kv[1]):
        op, _, shape = key.partition(".")
        by_op.setdefault(op, []).append(f"{shape} x{n}" if shape else f"x{n}")
    return "; ".join(f"{op} {', '.join(parts)}" for op, parts in by_op.items())


def _config(r: dict) -> str:
    consts = ",".join(f"{k}={v}" for k, v in r["constexprs"].items()
                      if k.startswith("BLOCK") or k in ("HAS_RESIDUAL", "HAS_DS", "HAS_DR", "APPROX_TANH"))
    return f"{r['label']} {consts} w{r['num_warps']}s{r['num_stages']}".strip()


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """One line per compile: kernel, config, arch, regs, spill, smem KB, CTA/SM, ldg, stg, instrs, loops, mma."""
    head = ["kernel", "config", "arch", "regs", "spill", "smem KB", "CTA/SM", "ldg", "stg", "instrs", "loops", "mma"]
    lines = []
    for r in rows:
        if r["error"]:
            lines.append([r["kernel"], _config(r), r["arch"], *["-"] * 8, f"FAILED {r['error']}"])
            continue
        lines.append([r["kernel"], _config(r), r["arch"], str(r["registers"]),
                      str(r["spill_bytes"] + r["stack_bytes"]), f"{r['shared_bytes'] / 1024:.0f}",
                      str(r["ctas_per_sm"]), str(r["ldg_bits"]), str(r["stg_bits"]), str(r["instructions"]),
                      "/".join(map(str, r.get("loops", []))) or "-", format_mma(r["mma"])])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    widths[1] = min(widths[1], 60)
    fmt = [f"{{:<{w}}}" if i in (0, 1, 2, 11) else f"{{:>{w}}}" for i, w in enumerate(widths)]
    out = ["  ".join(f.format(h) for f, h in zip(fmt, head))]
    out.append("-" * len(out[0]))
    out += ["  ".join(f.format(cell[:60] if i == 1 else cell) for i, (f, cell) in enumerate(zip(fmt, line)))
            for line in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt_kernels.report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=ARCHS, action="append", help="only this compute capability")
    p.add_argument("--exact", action="store_true", help="sm_86 / sm_89 compiled for themselves (see compile_check)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (as in bench/README.md)")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: cores)")
    args = p.parse_args(argv)
    rows = run(select_cases(args.kernel), archs=tuple(args.arch) if args.arch else ARCHS, workers=args.workers,
               exact=args.exact)
    print(format_table(rows, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
