"""How fast are the LayerNorm kernels against torch eager and torch.compile, next to a plain copy?

For widths N = 768..6400 (GPT-2's) and M = 4K..64K rows, bf16, forward and forward + backward of
``layer_norm`` and ``add_layer_norm``, each provider measured in the same run:

- ``triton``: ``gpt_kernels.layer_norm`` / ``gpt_kernels.add_layer_norm`` on the Triton backend (ours);
- ``torch``: ``F.layer_norm`` (and ``x + r`` first for add_layer_norm), eager;
- ``compile``: ``torch.compile`` of that torch code;
- ``copy``: ``dst.copy_(src)`` of one (M, N) tensor, the ceiling a memory-bound op can approach.

Unit: GB/s of the least traffic each pass must move (e = bytes per element: 2 for bf16), the same
count for every provider, so GB/s compares speed and sets it against the copy's:

    layer_norm      fwd: read x, write y                   2 M N e + 2 N e (w, b) + 8 M (mean, rstd)
                    bwd: read x, dy; write dx              3 M N e + 3 N e (w; dw, db) + 8 M
    add_layer_norm  fwd: read x, r; write s, y             4 M N e + 2 N e + 8 M
                    bwd: read s, dy, ds; write dx          4 M N e + 3 N e + 8 M (dx serves x and r)
    copy:                read src, write dst               2 M N e

fwd+bwd bytes = fwd bytes + bwd bytes. Goal (issue 3, H100): forward and backward >= 85% of the copy's
GB/s at N >= 1600 and >= 70% at 768; forward + backward >= 1.3x torch eager at every GPT-2 width.

    python -m bench.bench_norm              # full sweep (GPU)
    python -m bench.bench_norm --quick      # 3 widths, 16K rows
    python -m bench.bench_norm --smoke      # tiny shapes on the CPU (Triton interpreter): code paths only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.common import (
    add_kernel_bench_args,
    format_table,
    results_dir,
    save_results,
    start_kernel_bench,
    time_ms,
)

METRIC = "GB/s"  # what `python -m bench` plots
WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)
ROWS = (4096, 16384, 65536)
QUICK_WIDTHS, QUICK_ROWS = (768, 1600, 6400), (16384,)
SMOKE_WIDTHS, SMOKE_ROWS = (64,), (32,)
PROVIDERS = ("triton", "torch", "compile")


# ------------------------------------------------------------------------- shared by bench_activation


def pass_fn(fn, inputs, grads_out, which: str):
    """A closure running one pass of ``fn(*inputs)`` (a tensor or a tuple of them): ``fwd`` (no autograd
    graph kept), ``fwd+bwd`` (forward, then the gradients of every input that requires them, for the
    output gradients ``grads_out``; None for a scalar loss). The benchmark tests time the same closures."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, wrt, grads_out)

    return fwd if which == "fwd" else fwd_bwd


def time_pass(fn, inputs, grads_out, which: str) -> float | None:
    """Median ms of :func:`pass_fn`'s pass. None on OOM."""
    step = pass_fn(fn, inputs, grads_out, which)
    try:
        step()
        step()  # warm-up: Triton and torch.compile compile here
        return time_ms(step)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _copy_ms(m: int, n: int, device, dtype) -> float:
    """Median ms of a device-to-device copy of one (m, n) tensor: the bandwidth ceiling."""
    src = torch.randn(m, n, device=device).to(dtype)  # (M, N)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def sweep_device(smoke: bool) -> tuple[str, torch.dtype]:
    """(device, dtype) of a sweep: the GPU in bf16; the CPU in fp32 for ``smoke`` (the interpreter's bf16
    is unreliable)."""
    return ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)


def sweep_shapes(quick: bool, smoke: bool, widths=None, rows=None) -> tuple[tuple, tuple]:
    """(widths, rows) of a sweep: the full grid, ``quick``'s or ``smoke``'s, unless given."""
    if smoke:
        return tuple(widths or SMOKE_WIDTHS), tuple(rows or SMOKE_ROWS)
    return tuple(widths or (QUICK_WIDTHS if quick else WIDTHS)), tuple(rows or (QUICK_ROWS if quick else ROWS))


def sweep(ops: dict, widths, rows, providers, smoke: bool) -> list[dict]:
    """Time every op x width x rows x pass x provider, and a copy of the same size; one dict per number.

    ``ops[name] = (make, impls, bytes_fn)``: ``make(m, n, device, dtype)`` gives ``(inputs, grads_out)``;
    ``impls[provider]`` is the callable (``compile``: ``torch.compile`` of ``impls["torch"]``, made here);
    ``bytes_fn(m, n, e)`` gives ``{"fwd": B, "fwd+bwd": B}``.
    """
    device, dtype = sweep_device(smoke)
    e = torch.finfo(dtype).bits // 8
    out = []
    for n in widths:
        for m in rows:
            copy_ms = _copy_ms(m, n, device, dtype)
            copy_gbs = 2 * m * n * e / (copy_ms * 1e-3) / 1e9
            out.append({"op": "copy", "pass": "copy", "N": n, "M": m, "case": f"copy N={n} M={m}",
                        "provider": "copy", "ms": copy_ms, "bytes": 2 * m * n * e, "GB/s": copy_gbs})
            for op, (make, impls, bytes_fn) in ops.items():
                inputs, grads_out = make(m, n, device, dtype)
                nbytes = bytes_fn(m, n, e)
                for which in ("fwd", "fwd+bwd"):
                    base_ms = None
                    for provider in providers:
                        fn = impls.get(provider)
                        if provider == "compile":
                            torch._dynamo.reset()  # a fresh graph per shape; never the recompile limit
                            fn = torch.compile(impls["torch"])
                        ms = time_pass(fn, inputs, grads_out, which)
                        row = {"op": op, "pass": which, "N": n, "M": m, "case": f"{op} {which} N={n} M={m}",
                               "provider": provider, "ms": ms, "bytes": nbytes[which],
                               "GB/s": nbytes[which] / (ms * 1e-3) / 1e9 if ms else None}
                        row["% of copy"] = 100 * row["GB/s"] / copy_gbs if ms else None
                        if provider == "torch":
                            base_ms = ms
                        out.append(row)
                    for row in out[-len(providers):]:
                        row["x torch"] = base_ms / row["ms"] if base_ms and row["ms"] else None
                del inputs, grads_out
    return out


def wide_table(rows: list[dict], providers) -> str:
    """One line per op, pass, width and rows: GB/s per provider, the copy's, ours as % of it and x torch."""
    copy = {(r["N"], r["M"]): r["GB/s"] for r in rows if r["op"] == "copy"}
    lines = {}
    for r in rows:
        if r["op"] == "copy":
            continue
        key = (r["op"], r["pass"], r["N"], r["M"])
        line = lines.setdefault(key, {"op": r["op"], "pass": r["pass"], "N": r["N"], "M": r["M"]})
        line[f"{r['provider']} GB/s"] = r["GB/s"]
        if r["provider"] == "triton":
            line["ours % copy"] = r["% of copy"]
            line["ours x torch"] = r["x torch"]
        line["copy GB/s"] = copy.get((r["N"], r["M"]))
    cols = ["op", "pass", "N", "M", *[f"{p} GB/s" for p in providers], "copy GB/s", "ours % copy", "ours x torch"]
    return format_table(list(lines.values()), cols, floatfmt=".4g")


def summary(rows: list[dict], fwd_bwd_speedup: float = 1.3) -> str:
    """Each Triton row against the issue's goals: % of copy (85 at N >= 1600, 70 below) and x torch."""
    out = []
    for r in rows:
        if r["provider"] != "triton" or r["ms"] is None:
            continue
        goal = 85.0 if r["N"] >= 1600 else 70.0
        ok = r["% of copy"] >= goal and (r["pass"] == "fwd" or (r["x torch"] or 0) >= fwd_bwd_speedup)
        speed = f", x{r['x torch']:.2f} torch" if r["x torch"] else ""
        out.append(f"{'ok  ' if ok else 'MISS'} {r['case']}: {r['% of copy']:.0f}% of copy (goal {goal:.0f}%)"
                   f"{speed}{f' (goal x{fwd_bwd_speedup})' if r['pass'] != 'fwd' else ''}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ the norms


def norm_ops(backend: str = "triton") -> dict:
    """The sweep's ops (see :func:`sweep`); ``backend``: where the ``triton`` provider (ours) runs: the Triton
    kernels, or their ``torch`` path (the benchmark tests' choice on a CPU, where the interpreter is not timed)."""
    import torch.nn.functional as F

    import gpt_kernels

    def make_ln(m, n, device, dtype):
        x = torch.randn(m, n, device=device).to(dtype).requires_grad_()  # (M, N)
        w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()  # (N,)
        b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()  # (N,)
        return (x, w, b), (torch.randn_like(x),)

    def make_add_ln(m, n, device, dtype):
        (x, w, b), (dy,) = make_ln(m, n, device, dtype)
        r = torch.randn_like(x).requires_grad_()  # (M, N)
        return (x, r, w, b), (torch.randn_like(x), dy)

    def ln_torch(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b)

    def ln_triton(x, w, b):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.layer_norm(x, (x.shape[-1],), w, b)

    def add_ln_torch(x, r, w, b):
        s = x + r
        return s, F.layer_norm(s, (s.shape[-1],), w, b)

    def add_ln_triton(x, r, w, b):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.add_layer_norm(x, r, w, b)

    return {
        "layer_norm": (make_ln, {"triton": ln_triton, "torch": ln_torch},
                       lambda m, n, e: {"fwd": 2 * m * n * e + 2 * n * e + 8 * m,
                                        "fwd+bwd": 5 * m * n * e + 5 * n * e + 16 * m}),
        "add_layer_norm": (make_add_ln, {"triton": add_ln_triton, "torch": add_ln_torch},
                           lambda m, n, e: {"fwd": 4 * m * n * e + 2 * n * e + 8 * m,
                                            "fwd+bwd": 8 * m * n * e + 5 * n * e + 16 * m}),
    }


def sweep_run(name: str, ops: dict, quick: bool, smoke: bool, widths, rows) -> list[dict]:
    """Every number of a sweep (GPU), one dict each; or a tiny CPU pass through the code with ``smoke``."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `gpt_kernels` is not imported yet
    elif not torch.cuda.is_available():
        raise RuntimeError(f"bench_{name} needs a CUDA GPU (use smoke=True for a CPU pass)")
    widths, rows = sweep_shapes(quick, smoke, widths, rows)
    return sweep(ops, widths, rows, ("triton", "torch") if smoke else PROVIDERS, smoke)


def sweep_main(name: str, ops_fn, argv=None, fwd_bwd_speedup: float = 1.3) -> int:
    """The command line shared by the memory-bound sweeps (bench_norm, bench_activation)."""
    p = argparse.ArgumentParser(prog=f"python -m bench.bench_{name}", description=sys.modules[
        ops_fn.__module__].__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"widths {QUICK_WIDTHS}, rows {QUICK_ROWS}")
    p.add_argument("--widths", type=int, nargs="+", help=f"widths N (default {WIDTHS})")
    p.add_argument("--rows", type=int, nargs="+", help=f"rows M (default {ROWS})")
    add_kernel_bench_args(p)
    args = p.parse_args(argv)
    if not start_kernel_bench(name, args.smoke):
        return 0
    rows = sweep_run(name, ops_fn(), args.quick, args.smoke, args.widths, args.rows)
    print(wide_table(rows, ("triton", "torch") if args.smoke else PROVIDERS))
    if args.smoke:
        print("smoke run: interpreter timings on the CPU, not a measurement")
        return 0
    print(summary(rows, fwd_bwd_speedup=fwd_bwd_speedup))
    if not args.no_save:
        print(f"saved {save_results(name, rows, out_dir=results_dir(args))}")
    return 0


def run(quick: bool = False, smoke: bool = False, widths=None, rows=None) -> list[dict]:
    return sweep_run("norm", norm_ops(), quick, smoke, widths, rows)


def main(argv=None) -> int:
    return sweep_main("norm", norm_ops, argv)


if __name__ == "__main__":
    sys.exit(main())
