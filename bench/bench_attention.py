"""How fast is the fused attention kernel against SDPA's backends, manual attention and torch.compile?

Causal self-attention, bf16, head dims 64 and 128, heads H = 2048 / D (hidden size 2048), sequence
length T = 512..16384 at a fixed 16K tokens per batch (B = 16384 / T), as in the FlashAttention-2/3
papers. Providers, each measured in the same run:

- ``triton``: ``gpt_kernels.attention`` on the Triton backend (ours, autotuned on first call; deterministic
  7-matmul backward);
- ``triton-atomic``: the same with the 5-matmul backward (atomic fp32 dQ, ``ATOMIC_DQ_BACKWARD``);
- ``triton-dropout``, ``sdpa-flash-dropout``: ours and SDPA's flash backend with dropout_p = 0.1 on the
  attention weights (goal: ours within 1.3x of ``triton`` over forward + backward);
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention(is_causal=True)``
  restricted to one backend with ``torch.nn.attention.sdpa_kernel`` (skipped where it cannot run);
- ``manual``: ``gpt_kernels.reference.attention`` (q k^T, mask, softmax, @ v: materialises T x T), eager;
- ``compile``: ``torch.compile`` of that manual attention.

Unit: TFLOP/s of the matmul work, counted the usual way:

    forward   4 * B * H * T^2 * D        (q k^T and p v: 2 * T^2 * D multiply-adds each, x 2 flops)
              / 2 for causal             (half the scores are masked; every provider is credited the same)
    backward  2.5 x forward              (five matmuls instead of two; recomputation is not counted)

plus the peak extra CUDA memory of one forward + backward at T = 8192 (``peak_mem_MiB``): linear in T for
the fused kernels, quadratic for the manual one. Goal (H100): forward >= 1.1x sdpa-flash and >= 1.0x
sdpa-cudnn for T >= 2048, backward >= 1.0x sdpa-flash.

Decoding (``pass = decode``): gpt2-small's attention for one prompt with a KV cache, B = 1, H = 12,
D = 64, Tq new queries (1 and 16) against Tk = 1K..16K cached keys, forward only: ``triton`` (split-K
flash-decoding where it pays, the default), ``triton-nosplit`` (the plain kernel: B * H programs),
``sdpa`` (its default backend; an explicit end-aligned causal mask for Tq > 1). Memory-bound, so also
GB/s of K and V read: ``2 * B * H * Tk * D * 2`` bytes.

    python -m bench.bench_attention            # full sweep (GPU), decoding cases included
    python -m bench.bench_attention --quick    # D = 64, T in 1024, 4096 (--decode: also decoding, 2 cases)
    python -m bench.bench_attention --smoke    # tiny shapes on the CPU (Triton interpreter): code paths only
"""

from __future__ import annotations

import argparse
import contextlib
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
PROVIDERS = ("triton", "triton-atomic", "triton-dropout", "sdpa-flash", "sdpa-flash-dropout", "sdpa-cudnn",
             "sdpa-efficient", "manual", "compile")
DROPOUT_P = 0.1  # GPT-2's attention dropout when training
DECODE_CASES = ((1, 1024), (1, 4096), (1, 16384), (16, 1024), (16, 4096), (16, 16384))  # (Tq, Tk)
QUICK_DECODE_CASES = ((1, 4096), (16, 4096))
DECODE_HEADS, DECODE_D = 12, 64


def attention_flops(B: int, H: int, T: int, D: int, causal: bool = True, backward: bool = False) -> float:
    """4 B H T^2 D (halved when causal) for the forward; 2.5x that for the backward."""
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return 2.5 * f if backward else f


def providers(smoke: bool, backend: str = "triton") -> dict:
    """name -> fn(q, k, v) returning the (B, H, T, D) causal attention output. ``backend``: where the
    ``triton*`` providers (ours) run: the Triton kernels, or their ``torch`` path (the benchmark tests' choice
    on a CPU, where the interpreter is not timed). ``smoke`` (the CPU): SDPA's math backend, and SDPA as it
    chooses (``sdpa``, ``sdpa-dropout``: what ours calls on the torch path), instead of the GPU backends."""
    import torch.nn.functional as F

    import gpt_kernels
    from gpt_kernels import reference

    def triton_attention(q, k, v, dropout_p=0.0):
        with gpt_kernels.use_backend(backend):
            return gpt_kernels.attention(q, k, v, causal=True, dropout_p=dropout_p)

    def triton_atomic(q, k, v):
        with _setting("ATOMIC_DQ_BACKWARD", True):  # read at the forward, kept for its backward
            return triton_attention(q, k, v)

    def sdpa(sdpa_backend, dropout_p=0.0):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(q, k, v):
            if sdpa_backend is None:  # torch's own choice
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            with sdpa_kernel([getattr(SDPBackend, sdpa_backend)]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)

        return fn

    def manual(q, k, v):
        return reference.attention(q, k, v, causal=True)

    out = {"triton": triton_attention, "triton-atomic": triton_atomic, "manual": manual,
           "triton-dropout": lambda q, k, v: triton_attention(q, k, v, DROPOUT_P)}
    if smoke:
        out.update({"sdpa-math": sdpa("MATH"), "sdpa": sdpa(None), "sdpa-dropout": sdpa(None, DROPOUT_P)})
        return out
    out.update({"sdpa-flash": sdpa("FLASH_ATTENTION"), "sdpa-cudnn": sdpa("CUDNN_ATTENTION"),
                "sdpa-flash-dropout": sdpa("FLASH_ATTENTION", DROPOUT_P),
                "sdpa-efficient": sdpa("EFFICIENT_ATTENTION"), "compile": torch.compile(manual)})
    return {name: out[name] for name in PROVIDERS}


@contextlib.contextmanager
def _setting(name: str, value):
    """Set ``gpt_kernels.flash_attention.<name>`` for the block (the path switches the benchmark compares)."""
    from gpt_kernels import flash_attention as fa

    old = getattr(fa, name)
    setattr(fa, name, value)
    try:
        yield
    finally:
        setattr(fa, name, old)


def _decode_providers(smoke: bool) -> dict:
    """name -> fn(q, k, v) for decoding: Tq queries at the end of Tk keys, causal (end-aligned)."""
    import torch.nn.functional as F

    import gpt_kernels
    from gpt_kernels import reference

    def triton_attention(q, k, v):
        with gpt_kernels.use_backend("triton"):
            return gpt_kernels.attention(q, k, v, causal=True)

    def triton_nosplit(q, k, v):
        with _setting("SPLIT_K", 1):
            return triton_attention(q, k, v)

    def sdpa(q, k, v):
        tq, tk = q.shape[2], k.shape[2]
        mask = reference.causal_mask(tq, tk, q.device) if tq > 1 else None  # one query sees every key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return {"triton": triton_attention, "triton-nosplit": triton_nosplit, "sdpa": sdpa}


def run_decode(quick: bool = False, smoke: bool = False) -> list[dict]:
    """Forward time of decoding with a KV cache (see the module docstring), one row per provider and case."""
    if smoke:
        device, dtype, cases, repeats_kw = "cpu", torch.float32, ((1, 300), (16, 300)), {"repeats": 1, "warmup": 1}
        H, D = 2, 16
    else:
        device, dtype, repeats_kw = "cuda", torch.bfloat16, {}
        cases, H, D = QUICK_DECODE_CASES if quick else DECODE_CASES, DECODE_HEADS, DECODE_D
    rows = []
    with torch.no_grad():
        for Tq, Tk in cases:
            q = torch.randn(1, H, Tq, D, device=device, dtype=dtype)
            k, v = (torch.randn(1, H, Tk, D, device=device, dtype=dtype) for _ in range(2))
            for name, fn in _decode_providers(smoke).items():
                row = {"provider": name, "case": f"decode Tq={Tq} Tk={Tk}", "pass": "decode", "D": D, "T": Tk,
                       "Tq": Tq, "B": 1, "H": H}
                try:
                    ms = time_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), **repeats_kw)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    row.update(ms=None, **{"TFLOP/s": None, "GB/s": None}, error=str(e).strip().splitlines()[0][:80])
                    rows.append(row)
                    continue
                flops = 4.0 * H * Tq * Tk * D
                kv_bytes = 2 * H * Tk * D * q.element_size()
                row.update(ms=ms, **{"TFLOP/s": flops / (ms * 1e-3) / 1e12, "GB/s": kv_bytes / (ms * 1e-3) / 1e9})
                rows.append(row)
    return rows


def inputs(B, H, T, D, device, dtype):
    """q, k, v (B, H, T, D) requiring gradients, and an output gradient do (B, H, T, D): random, never zeros."""
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D, device=device, dtype=dtype)


def _measure(fn, B, H, T, D, device, dtype, repeats_kw) -> dict:
    """Forward and backward time of one provider at one shape; an error string where it cannot run."""
    try:
        q, k, v, do = inputs(B, H, T, D, device, dtype)
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
        q, k, v, do = inputs(B, H, T, D, "cuda", dtype)
        fn(q, k, v).backward(do)  # warm up: autotuning and compilation allocate too
        q.grad = k.grad = v.grad = None
        return peak_memory(lambda: fn(q, k, v).backward(do)) / 2**20
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    finally:
        torch.cuda.empty_cache()


def device_dtype(smoke: bool) -> tuple[str, torch.dtype]:
    """(device, dtype) of the sweep: the GPU in bf16; the CPU in fp32 for ``smoke``."""
    return ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)


def shapes(quick: bool = False, smoke: bool = False, seq_lens=None, head_dims=None) -> list[tuple[int, ...]]:
    """The sweep's (B, H, T, D): H = hidden / D heads, B = tokens / T sequences (16K tokens and hidden 2048;
    128 and 32 for ``smoke``), for every head dim and sequence length (``quick``'s, ``smoke``'s, or given)."""
    if smoke:
        tokens, hidden, seq_lens, head_dims = 128, 32, seq_lens or (32, 64), head_dims or (16,)
    else:
        tokens, hidden = TOKENS, HIDDEN
        seq_lens = seq_lens or (QUICK_SEQ_LENS if quick else SEQ_LENS)
        head_dims = head_dims or (QUICK_HEAD_DIMS if quick else HEAD_DIMS)
    return [(max(1, tokens // T), max(1, hidden // D), T, D) for D in head_dims for T in seq_lens]


def run(quick: bool = False, smoke: bool = False, seq_lens=None, head_dims=None,
        decode: bool | None = None) -> list[dict]:
    """Every number of the sweep (GPU), one dict each, the decoding cases last (``pass`` = "decode"; by
    default in the full sweep and the smoke pass, not in ``quick`` runs); or a tiny CPU pass through the
    code with ``smoke``."""
    if decode is None:
        decode = smoke or not quick
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `gpt_kernels` is not imported yet
    elif not torch.cuda.is_available():
        raise RuntimeError("bench_attention needs a CUDA GPU (use smoke=True for a CPU pass)")
    device, dtype = device_dtype(smoke)
    repeats_kw = {"repeats": 1, "warmup": 1} if smoke else {}
    fns = providers(smoke)
    rows = []
    for B, H, T, D in shapes(quick, smoke, seq_lens, head_dims):
        for name, fn in fns.items():
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
            for name, fn in fns.items():
                rows.append({"provider": name, "case": f"memory D={D} T={T}", "pass": "fwd+bwd", "D": D,
                             "T": T, "B": B, "H": H, "peak_mem_MiB": _peak_memory_mib(fn, B, H, T, D, dtype)})
    return rows + (run_decode(quick=quick, smoke=smoke) if decode else [])


def wide_table(rows: list[dict]) -> str:
    """One line per (pass, D, T): every provider's TFLOP/s, ours relative to SDPA's flash and cuDNN, our
    time with dropout over our time without, and the atomic backward's speedup."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = []
    for key in dict.fromkeys((r["pass"], r["D"], r["T"]) for r in rows if "TFLOP/s" in r):
        by = {r["provider"]: r.get("TFLOP/s") for r in rows if (r["pass"], r["D"], r["T"]) == key}
        line = {"pass": key[0], "D": key[1], "T": key[2]}
        line.update({f"{p} TFLOP/s": by.get(p) for p in providers})
        for base in ("sdpa-flash", "sdpa-cudnn"):
            if by.get("triton") and by.get(base):
                line[f"x {base}"] = by["triton"] / by[base]
        if by.get("triton") and by.get("triton-dropout"):  # time with dropout / time without (goal <= 1.3)
            line["dropout time x"] = by["triton"] / by["triton-dropout"]
        if by.get("triton") and by.get("triton-atomic"):  # > 1: the atomic backward is faster
            line["atomic speedup"] = by["triton-atomic"] / by["triton"]
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
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=None,
                   help="time the decoding (KV cache) cases (default: in the full sweep, not with --quick)")
    add_kernel_bench_args(p)
    args = p.parse_args(argv)
    if not start_kernel_bench('attention', args.smoke):
        return 0
    rows = run(quick=args.quick, smoke=args.smoke, seq_lens=args.seq_lens, head_dims=args.head_dims,
               decode=args.decode)
    decode = [r for r in rows if r.get("pass") == "decode"]
    print(wide_table([r for r in rows if r.get("pass") != "decode"]))
    if decode:
        print("\ndecoding (forward only, B=1): ms and GB/s of K and V read")
        print(format_table(decode, ["case", "provider", "ms", "GB/s"]))
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
