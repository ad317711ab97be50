"""How fast are GELU and bias + GELU against torch eager and torch.compile, next to a plain copy?

For widths N = 768..6400 and M = 4K..64K rows, bf16, GPT-2's tanh form, forward and forward +
backward, each provider measured in the same run (see ``bench.bench_norm`` for the harness):

- ``triton``: ``kernels.gelu`` / ``kernels.bias_gelu`` on the Triton backend (ours);
- ``torch``: ``F.gelu(x, approximate="tanh")`` (``x + bias`` first for bias_gelu: two passes), eager;
- ``compile``: ``torch.compile`` of that torch code;
- ``copy``: ``dst.copy_(src)`` of one (M, N) tensor, the ceiling.

Unit: GB/s of the least traffic each pass must move (e = bytes per element, 2 for bf16):

    gelu        fwd: read x, write y                   2 M N e
                bwd: read x, dy; write dx              3 M N e
    bias_gelu   fwd: read x, write y                   2 M N e + N e (bias)
                bwd: read x, dy; write dx              3 M N e + 2 N e (bias; dbias)
    copy:            read src, write dst               2 M N e

fwd+bwd bytes = fwd bytes + bwd bytes. Goal (H100): >= 85% of the copy's GB/s at N >= 1600 and >= 70% at
768, like the norms, and forward + backward never slower than torch eager (whose GELU is already one
pass; bias + GELU's is two).

    python -m bench.bench_activation              # full sweep (GPU)
    python -m bench.bench_activation --quick      # 3 widths, 16K rows
    python -m bench.bench_activation --smoke      # tiny shapes on the CPU (Triton interpreter): code paths only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.bench_norm import (
    PROVIDERS,
    QUICK_ROWS,
    QUICK_WIDTHS,
    ROWS,
    SMOKE_ROWS,
    SMOKE_WIDTHS,
    WIDTHS,
    summary,
    sweep,
    wide_table,
)
from bench.common import machine_info, save_results

METRIC = "GB/s"  # what `python -m bench` plots


def _activation_ops() -> dict:
    import torch.nn.functional as F

    import kernels

    def make_gelu(m, n, device, dtype):
        x = (2 * torch.randn(m, n, device=device)).to(dtype).requires_grad_()  # (M, N)
        return (x,), (torch.randn_like(x),)

    def make_bias_gelu(m, n, device, dtype):
        (x,), (dy,) = make_gelu(m, n, device, dtype)
        bias = torch.randn(n, device=device).to(dtype).requires_grad_()  # (N,)
        return (x, bias), (dy,)

    def gelu_torch(x):
        return F.gelu(x, approximate="tanh")

    def gelu_triton(x):
        with kernels.use_backend("triton"):
            return kernels.gelu(x, approximate="tanh")

    def bias_gelu_torch(x, bias):
        return F.gelu(x + bias, approximate="tanh")

    def bias_gelu_triton(x, bias):
        with kernels.use_backend("triton"):
            return kernels.bias_gelu(x, bias, approximate="tanh")

    return {
        "gelu": (make_gelu, {"triton": gelu_triton, "torch": gelu_torch, "compile": torch.compile(gelu_torch)},
                 lambda m, n, e: {"fwd": 2 * m * n * e, "fwd+bwd": 5 * m * n * e}),
        "bias_gelu": (make_bias_gelu, {"triton": bias_gelu_triton, "torch": bias_gelu_torch,
                                       "compile": torch.compile(bias_gelu_torch)},
                      lambda m, n, e: {"fwd": 2 * m * n * e + n * e, "fwd+bwd": 5 * m * n * e + 3 * n * e}),
    }


def run(quick: bool = False, smoke: bool = False, widths=None, rows=None) -> list[dict]:
    """Every number of the sweep (GPU), one dict each; or a tiny CPU pass through the code with ``smoke``."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `kernels` is not imported yet
        widths, rows, providers = widths or SMOKE_WIDTHS, rows or SMOKE_ROWS, ("triton", "torch")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench_activation needs a CUDA GPU (use smoke=True for a CPU pass)")
        widths = widths or (QUICK_WIDTHS if quick else WIDTHS)
        rows, providers = rows or (QUICK_ROWS if quick else ROWS), PROVIDERS
    return sweep(_activation_ops(), widths, rows, providers, smoke)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_activation", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"widths {QUICK_WIDTHS}, rows {QUICK_ROWS}")
    p.add_argument("--widths", type=int, nargs="+", help=f"widths N (default {WIDTHS})")
    p.add_argument("--rows", type=int, nargs="+", help=f"rows M (default {ROWS})")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU through the Triton interpreter: checks the script, times nothing real")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when `kernels` is first imported, in run()
    elif not torch.cuda.is_available():
        print("bench_activation needs a CUDA GPU: nothing to time on this machine "
              "(run with --smoke for a tiny CPU pass through the code).")
        return 0
    info = machine_info()
    print(f"device: {info['gpu'] or info['cpu']}, torch {info['torch']}, triton {info['triton']}")
    rows = run(quick=args.quick, smoke=args.smoke, widths=args.widths, rows=args.rows)
    print(wide_table(rows, ("triton", "torch") if args.smoke else PROVIDERS))
    if args.smoke:
        print("smoke run: interpreter timings on the CPU, not a measurement")
        return 0
    print(summary(rows, fwd_bwd_speedup=1.0))
    if not args.no_save:
        print(f"saved {save_results('activation', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
