"""How fast, and how much memory, is the loss over GPT-2's 50,257-token vocabulary?

For N = 4K..64K tokens, V = 50,257, bf16, forward + backward, each measured in the same run:

- ``F.cross_entropy`` on (N, V) logits, ``torch.compile`` of it, and our fused Triton loss
  (``gpt_kernels.cross_entropy``). Unit: GB/s of the least traffic a fused loss needs, reading the logits
  once and writing their gradient once: ``bytes = 2 * N * V * 2`` (bf16; the forward alone reads them:
  ``N * V * 2``, what the benchmark tests record for their forward pass).
- projection + ``F.cross_entropy`` (``hidden (N, C) @ weight.T`` then the loss, C = 768) against our
  chunked ``gpt_kernels.linear_cross_entropy``, the projection counted in both. Unit: TFLOP/s of the three
  matmuls, ``flops = 6 * N * V * C`` (forward 2NVC, d_hidden 2NVC, d_weight 2NVC). The full sweep (not
  ``--quick``) also runs this pair in fp16, where ours makes its gradients in the backward with the loss
  scale in hand: one matmul more per chunk than in bf16 (8NVC where the formula counts 6NVC).

Peak memory is the most CUDA memory allocated above the inputs during one forward + backward (the
gradients it leaves behind included). Goals on an H100: the fused loss at least as fast as
``F.cross_entropy``; the chunked linear loss at least 3x less peak memory than projection +
``F.cross_entropy`` at no more than 10% extra time.

    python -m bench.bench_cross_entropy            # full sweep (GPU)
    python -m bench.bench_cross_entropy --quick    # N = 4K and 16K only
    python -m bench.bench_cross_entropy --smoke    # tiny shapes on the CPU (Triton interpreter): code paths only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.common import (
    add_kernel_bench_args,
    format_table,
    peak_memory,
    results_dir,
    save_results,
    start_kernel_bench,
    time_ms,
)

V_GPT2 = 50257
C_GPT2 = 768  # GPT-2 small's hidden width
METRIC = "peak MiB"  # what `python -m bench` plots (lower is better; the table has the times)
SIZES = (4096, 8192, 16384, 32768, 65536)
QUICK_SIZES = (4096, 16384)
COLUMNS = ["N", "method", "ms", "GB/s (2NV*2B)", "TFLOP/s (6NVC)", "peak MiB", "time vs base", "mem base/ours"]


def _step(loss_fn, params):
    """A closure running one forward + backward with fresh gradients."""
    def step():
        for p in params:
            p.grad = None
        loss_fn().backward()
    return step


def _measure(step, params, cuda: bool) -> tuple[float | None, float | None]:
    """(median ms, peak MiB above the inputs) of ``step``; (None, None) if it runs out of memory."""
    try:
        step()
        step()  # warm-up: autotuning, torch.compile, cuBLAS heuristics
        ms = time_ms(step)
        if not cuda:
            return ms, None
        for p in params:
            p.grad = None
        return ms, peak_memory(step) / 2**20
    except torch.cuda.OutOfMemoryError:
        return None, None
    finally:
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()


def _row(n, V, C, dtype, method, ms, mib, ce=True, base=None) -> dict:
    row = {"case": f"{'linear+CE' if C else 'CE'} N={n}", "N": n, "V": V, "C": C,
           "dtype": str(dtype).removeprefix("torch."), "method": method, "ms": ms,
           "peak MiB": mib}
    if ms:
        if ce:
            row["GB/s (2NV*2B)"] = loss_bytes(n, V, torch.finfo(dtype).bits // 8, "fwd+bwd") / (ms * 1e-3) / 1e9
        else:
            row["TFLOP/s (6NVC)"] = linear_flops(n, V, C, "fwd+bwd") / (ms * 1e-3) / 1e12
    if base is not None and ms and base["ms"]:
        row["time vs base"] = ms / base["ms"]
        if mib and base["peak MiB"]:
            row["mem base/ours"] = base["peak MiB"] / mib
    return row


def loss_inputs(n: int, V: int, dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits x (N, V) requiring gradients and targets t (N,): random, never zeros."""
    t = torch.randint(0, V, (n,), device=device)  # (N,)
    x = (torch.randn(n, V, device=device) * 2).to(dtype).requires_grad_()  # (N, V)
    return x, t


def linear_inputs(n: int, V: int, C: int, dtype, device: str) -> tuple[torch.Tensor, ...]:
    """Hidden states h (N, C) and the head's weight w (V, C), both requiring gradients, and targets t (N,)."""
    t = torch.randint(0, V, (n,), device=device)  # (N,)
    h = torch.randn(n, C, device=device).to(dtype).requires_grad_()  # (N, C)
    w = (torch.randn(V, C, device=device) * 0.02).to(dtype).requires_grad_()  # (V, C)
    return h, w, t


def loss_fns(backend: str = "triton") -> dict:
    """method -> fn(x, t), the scalar loss of logits x (N, V): the baseline first, ours (on ``backend``: the
    Triton kernel, or its ``torch`` path, the benchmark tests' choice on a CPU) last."""
    import torch.nn.functional as F

    import gpt_kernels

    def fused(x, t):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.cross_entropy(x, t)

    return {"F.cross_entropy": F.cross_entropy, "fused cross_entropy (ours)": fused}


def linear_fns(backend: str = "triton") -> dict:
    """method -> fn(h, w, t), the scalar loss of the projection h @ w.T: the baseline first, ours last."""
    import torch.nn.functional as F

    import gpt_kernels

    def chunked(h, w, t):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.linear_cross_entropy(h, w, t)

    return {"projection + F.cross_entropy": lambda h, w, t: F.cross_entropy(h @ w.t(), t),
            "chunked linear_cross_entropy (ours)": chunked}


def loss_bytes(n: int, V: int, e: int, which: str) -> int:
    """Least traffic of the loss on (N, V) logits of e bytes: read them (fwd), and write their gradient."""
    return (1 if which == "fwd" else 2) * n * V * e


def linear_flops(n: int, V: int, C: int, which: str) -> int:
    """Matmul FLOPs of projection + loss: 2NVC forward; d_hidden and d_weight 2NVC each."""
    return (2 if which == "fwd" else 6) * n * V * C


def _bench_loss(n: int, V: int, dtype, device: str, with_compile: bool) -> list[dict]:
    """The loss alone on (N, V) logits: F.cross_entropy, torch.compile of it, ours."""
    import torch.nn.functional as F

    cuda = device == "cuda"
    x, t = loss_inputs(n, V, dtype, device)
    base_fn, ours_fn = loss_fns().values()
    base = _row(n, V, None, dtype, "F.cross_entropy", *_measure(_step(lambda: base_fn(x, t), [x]), [x], cuda))
    rows = [base]
    if with_compile:
        compiled = torch.compile(F.cross_entropy)
        rows.append(_row(n, V, None, dtype, "torch.compile(F.cross_entropy)",
                         *_measure(_step(lambda: compiled(x, t), [x]), [x], cuda), base=base))
    rows.append(_row(n, V, None, dtype, "fused cross_entropy (ours)",
                     *_measure(_step(lambda: ours_fn(x, t), [x]), [x], cuda), base=base))
    return rows


def _bench_linear(n: int, V: int, C: int, dtype, device: str) -> list[dict]:
    """Projection + loss, the projection counted in: hidden @ weight.T then F.cross_entropy, against ours."""
    cuda = device == "cuda"
    h, w, t = linear_inputs(n, V, C, dtype, device)
    base_fn, ours_fn = linear_fns().values()
    base = _row(n, V, C, dtype, "projection + F.cross_entropy",
                *_measure(_step(lambda: base_fn(h, w, t), [h, w]), [h, w], cuda), ce=False)
    ours = _row(n, V, C, dtype, "chunked linear_cross_entropy (ours)",
                *_measure(_step(lambda: ours_fn(h, w, t), [h, w]), [h, w], cuda), ce=False, base=base)
    return [base, ours]


def setup(quick: bool = False, sizes=None, smoke: bool = False) -> tuple:
    """(sizes, V, C, dtype, device) of the sweep: N = 4K..64K (``quick``: 4K, 16K) tokens over GPT-2's vocabulary
    and width, bf16 on the GPU; ``smoke``: 64 tokens, V = 1000, C = 32, fp32 on the CPU."""
    if smoke:
        return (64,), 1000, 32, torch.float32, "cpu"
    return tuple(sizes or (QUICK_SIZES if quick else SIZES)), V_GPT2, C_GPT2, torch.bfloat16, "cuda"


def run(quick: bool = False, sizes=None, smoke: bool = False) -> list[dict]:
    """All rows of the sweep (GPU), or a tiny CPU pass through every code path with ``smoke``."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `gpt_kernels` is not imported yet
    elif not torch.cuda.is_available():
        raise RuntimeError("bench_cross_entropy needs a CUDA GPU (use smoke=True for a CPU pass)")
    sizes, V, C, dtype, device = setup(quick, sizes, smoke)
    rows = []
    for n in sizes:
        rows += _bench_loss(n, V, dtype, device, with_compile=not smoke)
        rows += _bench_linear(n, V, C, dtype, device)
        if not quick:  # fp16's linear loss takes another path (gradients made in the backward)
            rows += _bench_linear(n, V, C, torch.float16, device)
    return rows


def _summary(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["method"].startswith("fused") and r.get("time vs base"):
            ok = "meets" if r["time vs base"] <= 1.0 else "MISSES"
            lines.append(f"N={r['N']}: fused / F.cross_entropy time = {r['time vs base']:.2f} "
                         f"({ok} the goal <= 1.00)")
        if r["method"].startswith("chunked") and r.get("time vs base"):
            mem = r.get("mem base/ours")
            ok = "meets" if r["time vs base"] <= 1.10 and (mem is None or mem >= 3.0) else "MISSES"
            mem_s = f"{mem:.1f}x less peak memory" if mem else "memory not measured"
            lines.append(f"N={r['N']} {r['dtype']}: chunked linear: {mem_s}, time x{r['time vs base']:.2f} vs "
                         f"projection + F.cross_entropy ({ok} the goal >= 3x memory, <= 1.10 time)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_cross_entropy", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 4K and 16K only")
    p.add_argument("--sizes", type=int, nargs="+", help="token counts N to run (default 4K..64K)")
    add_kernel_bench_args(p)
    args = p.parse_args(argv)
    if not start_kernel_bench('cross_entropy', args.smoke):
        return 0
    rows = run(quick=args.quick, sizes=args.sizes, smoke=args.smoke)
    print(format_table(rows, COLUMNS))
    if args.smoke:
        print("smoke run: interpreter timings on the CPU, not a measurement")
        return 0
    print(_summary(rows))
    if not args.no_save:
        print(f"saved {save_results('cross_entropy', rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
