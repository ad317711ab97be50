"""How fast is the fused attention kernel against SDPA's backends, manual attention and torch.compile?

Causal self-attention, bf16, head dims 64 and 128, heads H = 2048 / D (hidden size 2048), sequence
length T = 512..16384 at a fixed 16K tokens per batch (B = 16384 / T), as in the FlashAttention-2/3
papers. Providers, each measured in the same run:

- ``triton``: ``kernels.attention`` on the Triton backend (ours, autotuned on first call);
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention(is_causal=True)``
  restricted to one backend with ``torch.nn.attention.sdpa_kernel`` (skipped where it cannot run);
- ``manual``: ``kernels.reference.attention`` (q k^T, mask, softmax, @ v: materialises T x T), eager;
- ``compile``: ``torch.compile`` of that manual attention.

Unit: TFLOP/s of the matmul work, counted the usual way:

    forward   4 * B * H * T^2 * D        (q k^T and p v: 2 * T^2 * D multiply-adds each, x 2 flops)
              / 2 for causal             (half the scores are masked; every provider is credited the same)
    backward  2.5 x forward              (five matmuls instead of two; recomputation is not counted)

plus the peak extra CUDA memory of one forward + backward at T = 8192 (``peak_mem_MiB``): linear in T for
the fused kernels, quadratic for the manual one. Goal (H100): forward >= 1.1x sdpa-flash and >= 1.0x
sdpa-cudnn for T >= 2048, backward >= 1.0x sdpa-flash.

    python -m bench.bench_attention            # full sweep (GPU)
    python -m bench.bench_attention --quick    # D = 64, T in 1024, 4096
    python -m bench.bench_attention --smoke    # tiny shapes on the CPU (Triton interpreter): code paths only
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import (
    add_kernel_bench_args,
    format_table,
    results_dir,
    save_results,
    start_kernel_bench,
    time_ms,
)

METRIC = "TFLOP/s"  # what `python -m bench` plots
TOKENS = 16384  # tokens per batch: B = TOKENS // T
HIDDEN = 2048  # H = HIDDEN // D
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
QUICK_SEQ_LENS, QUICK_HEAD_DIMS = (1024, 4096), (64,)
MEMORY_T = 8192
PROVIDERS = ("triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "manual", "compile")


def attention_flops(B: int, H: int, T: int, D: int, causal: bool = True, backward: bool = False) -> float:
    """4 B H T^2 D (halved when causal) for the forward; 2.5x that for the backward."""
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return 2.5 * f if backward else f


def _providers(smoke: bool) -> dict:
    """name -> fn(q, k, v) returning the (B, H, T, D) causal attention output."""
    import torch.nn.functional as F

    import kernels
    from kernels import reference

    def triton_attention(q, k, v):
        with kernels.use_backend("triton"):
            return kernels.attention(q, k, v, causal=True)

    def sdpa(backend):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)

        def fn(q, k, v):
            with sdpa_kernel([chosen]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return fn

    def manual(q, k, v):
        return reference.attention(q, k, v, causal=True)

    out = {"triton": triton_attention, "manual": manual}
    if smoke:
        out["sdpa-math"] = sdpa("MATH")
        return out
    out.update({"sdpa-flash": sdpa("FLASH_ATTENTION"), "sdpa-cudnn": sdpa("CUDNN_ATTENTION"),
                "sdpa-efficient": sdpa("EFFICIENT_ATTENTION"), "compile": torch.compile(manual)})
    return {name: out[name] for name in PROVIDERS}


def _inputs(B, H, T, D, device, dtype):
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D, device=device, dtype=dtype)


def _measure(fn, B, H, T, D, device, dtype, repeats_kw) -> dict:
    """Forward and backward time of one provider at one shape; an error string where it cannot run."""
    try:
        q, k, v, do = _inputs(B, H, T, D, device, dtype)
        fwd = time_ms(lambda: fn(q, k, v), **repeats_kw)
        out = fn(q, k, v)
        bwd = time_ms(lambda: out.backward(do, retain_graph=True), **repeats_kw)
        return {"fwd_ms": fwd, "bwd_ms": bwd}
    except (RuntimeError, torch.OutOfMemoryError) as e:  # backend unavailable for this shape/GPU, or OOM
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80] if str(e).strip() else ''}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _peak_memory_mib(fn, B, H, T, D, dtype) -> float | None:
    """Peak extra CUDA memory (MiB) of one forward + backward, over the inputs already allocated."""
    from bench.common import peak_memory

    try:
        q, k, v, do = _inputs(B, H, T, D, "cuda", dtype)
        fn(q, k, v).backward(do)  # warm up: autotuning and compilation allocate too
        q.grad = k.grad = v.grad = None
        return peak_memory(lambda: fn(q, k, v).backward(do)) / 2**20
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    finally:
        torch.cuda.empty_cache()


def run(quick: bool = False, smoke: bool = False, seq_lens=None, head_dims=None) -> list[dict]:
    """Every number of the sweep (GPU), one dict each; or a tiny CPU pass through the code with ``smoke``."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `kernels` is not imported yet
        device, dtype, tokens, hidden = "cpu", torch.float32, 128, 32
        seq_lens, head_dims, repeats_kw = seq_lens or (32, 64), head_dims or (16,), {"repeats": 1, "warmup": 1}
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("bench_attention needs a CUDA GPU (use smoke=True for a CPU pass)")
        device, dtype, tokens, hidden, repeats_kw = "cuda", torch.bfloat16, TOKENS, HIDDEN, {}
        seq_lens = seq_lens or (QUICK_SEQ_LENS if quick else SEQ_LENS)
        head_dims = head_dims or (QUICK_HEAD_DIMS if quick else HEAD_DIMS)
    providers = _providers(smoke)
    rows = []
    for D in head_dims:
        H = max(1, hidden // D)
        for T in seq_lens:
            B = max(1, tokens // T)
            for name, fn in providers.items():
                r = _measure(fn, B, H, T, D, device, dtype, repeats_kw)
                for pass_, ms_key in (("fwd", "fwd_ms"), ("bwd", "bwd_ms")):
                    row = {"provider": name, "case": f"{pass_} D={D} T={T}", "pass": pass_, "D": D, "T": T,
                           "B": B, "H": H}
                    if "error" in r:
                        row.update(ms=None, **{"TFLOP/s": None}, error=r["error"])
                    else:
                        flops = attention_flops(B, H, T, D, backward=pass_ == "bwd")
                        row.update(ms=r[ms_key], **{"TFLOP/s": flops / (r[ms_key] * 1e-3) / 1e12})
                    rows.append(row)
            if not smoke and T == MEMORY_T:
                for name, fn in providers.items():
                    rows.append({"provider": name, "case": f"memory D={D} T={T}", "pass": "fwd+bwd", "D": D,
                                 "T": T, "B": B, "H": H, "peak_mem_MiB": _peak_memory_mib(fn, B, H, T, D, dtype)})
    return rows


def wide_table(rows: list[dict]) -> str:
    """One line per (pass, D, T): every provider's TFLOP/s, and ours relative to SDPA's flash and cuDNN."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = []
    for key in dict.fromkeys((r["pass"], r["D"], r["T"]) for r in rows if "TFLOP/s" in r):
        by = {r["provider"]: r.get("TFLOP/s") for r in rows if (r["pass"], r["D"], r["T"]) == key}
        line = {"pass": key[0], "D": key[1], "T": key[2]}
        line.update({f"{p} TFLOP/s": by.get(p) for p in providers})
        for base in ("sdpa-flash", "sdpa-cudnn"):
            if by.get("triton") and by.get(base):
                line[f"x {base}"] = by["triton"] / by[base]
        out.append(line)
    mem = [{"D": r["D"], "T": r["T"], **{p: None for p in providers}} for r in rows if "peak_mem_MiB" in r]
    mem = list({(m["D"], m["T"]): m for m in mem}.values())
    for m in mem:
        for r in rows:
            if "peak_mem_MiB" in r and (r["D"], r["T"]) == (m["D"], m["T"]):
                m[r["provider"]] = r["peak_mem_MiB"]
    cols = list(dict.fromkeys(k for line in out for k in line))
    text = format_table(out, cols)
    if mem:
        text += "\n\npeak extra memory of forward + backward (MiB)\n" + format_table(mem, ["D", "T", *providers],
                                                                                    floatfmt=".0f")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_attention", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"D {QUICK_HEAD_DIMS}, T {QUICK_SEQ_LENS}")
    p.add_argument("--seq-lens", type=int, nargs="+", help=f"sequence lengths (default {SEQ_LENS})")
    p.add_argument("--head-dims", type=int, nargs="+", help=f"head dims (default {HEAD_DIMS})")
    add_kernel_bench_args(p)
    args = p.parse_args(argv)
    if not start_kernel_bench('attention', args.smoke):
        return 0
    rows = run(quick=args.quick, smoke=args.smoke, seq_lens=args.seq_lens, head_dims=args.head_dims)
    print(wide_table(rows))
    errors = {(r["provider"], r["error"]) for r in rows if r.get("error")}
    for provider, error in sorted(errors):
        print(f"{provider}: did not run ({error})")
    if args.smoke:
        print("smoke run: interpreter timings on the CPU, not a measurement")
        return 0
    if not args.no_save:
        print(f"saved {save_results('attention', rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
