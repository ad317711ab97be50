"""How fast are GELU and bias + GELU against torch eager and torch.compile, next to a plain copy?

For widths N = 768..6400 and M = 4K..64K rows, bf16, GPT-2's tanh form, forward and forward +
backward, each provider measured in the same run (see ``bench.bench_norm`` for the harness):

- ``triton``: ``gpt_kernels.gelu`` / ``gpt_kernels.bias_gelu`` on the Triton backend (ours);
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

import sys

import torch

from bench.bench_norm import sweep_main, sweep_run

METRIC = "GB/s"  # what `python -m bench` plots


def activation_ops(backend: str = "triton") -> dict:
    """The sweep's ops (see ``bench.bench_norm.sweep``); ``backend``: where the ``triton`` provider (ours) runs
    (see ``bench.bench_norm.norm_ops``)."""
    import torch.nn.functional as F

    import gpt_kernels

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
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.gelu(x, approximate="tanh")

    def bias_gelu_torch(x, bias):
        return F.gelu(x + bias, approximate="tanh")

    def bias_gelu_triton(x, bias):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.bias_gelu(x, bias, approximate="tanh")

    return {
        "gelu": (make_gelu, {"triton": gelu_triton, "torch": gelu_torch},
                 lambda m, n, e: {"fwd": 2 * m * n * e, "fwd+bwd": 5 * m * n * e}),
        "bias_gelu": (make_bias_gelu, {"triton": bias_gelu_triton, "torch": bias_gelu_torch},
                      lambda m, n, e: {"fwd": 2 * m * n * e + n * e, "fwd+bwd": 5 * m * n * e + 3 * n * e}),
    }


def run(quick: bool = False, smoke: bool = False, widths=None, rows=None) -> list[dict]:
    return sweep_run("activation", activation_ops(), quick, smoke, widths, rows)


def main(argv=None) -> int:
    return sweep_main("activation", activation_ops, argv, fwd_bwd_speedup=1.0)


if __name__ == "__main__":
    sys.exit(main())
