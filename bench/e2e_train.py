"""End-to-end training speed on a GPU: gpt2-small, context 1024, bf16 autocast, fused AdamW.

Variants, each measured in the same run on the same card:

- ``eager-reference``: the readable PyTorch ops of ``gpt_kernels.reference`` (manual attention);
- ``eager-torch``: PyTorch's own fused ops (``F.layer_norm``, ``F.gelu``, SDPA, ``F.cross_entropy``);
- ``compile-torch``: ``torch.compile`` of ``eager-torch``;
- ``ours``: the Triton kernels (LayerNorm, add+LayerNorm, bias+GELU, FlashAttention, chunked linear CE);
- ``ours+compile``: ``torch.compile`` on top of the Triton kernels.

Figures: tokens/s, model FLOPs utilisation and peak memory. FLOPs per token follow llm.c / PaLM:
``6 * N + 6 * n_layers * emb_dim * T`` (N = parameters without the position embedding, the second term
the attention score and value products, counted once for the causal half), over the card's bf16 peak
*measured in the same run* with a large matmul (the datasheet's 989 TFLOP/s is quoted beside it).

A variant that fails (out of memory, a compile error, a kernel that does not launch) becomes a row with
its ``error``; the other variants still run. ``smoke`` runs the same loop on the CPU with the tiny preset
(bf16 autocast, the Triton interpreter for ``ours``, ``torch.compile`` with the ``aot_eager`` backend, so
no C++ toolchain is needed): it checks the code paths and measures nothing.

    python -m bench e2e_train            # needs a CUDA GPU
    python -m bench.e2e_train --quick --variants ours compile-torch
    python -m bench.e2e_train --smoke    # tiny model on the CPU: code paths only
"""

from __future__ import annotations

import os
import time
import traceback

import torch

from bench.common import add_output_args, format_table, results_dir, save_results

METRIC = "tokens_per_s"
REQUIRES_GPU = True
VARIANTS = ("eager-reference", "eager-torch", "compile-torch", "ours", "ours+compile")
# --quick: ours against both baselines the goals name; compile-torch last, as it compiles the longest
QUICK_VARIANTS = ("eager-torch", "ours", "compile-torch")
# the measured run: gpt2-small at its full context, 16 sequences a step
FULL = {"preset": "gpt2-small", "T": 1024, "batch": 16}
# --smoke: the tiny preset on the CPU, one timed step
SMOKE = {"preset": "tiny", "T": 32, "batch": 2, "steps": 1, "warmup": 1}


def measured_bf16_peak_tflops(n: int = 8192) -> float:
    """bf16 matmul rate of this card, TFLOP/s: the ceiling MFU is measured against."""
    from bench.common import cuda_time_ms

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup_ms=100, rep_ms=500)
    return 2 * n**3 / ms / 1e9


def flops_per_token(model, T: int) -> float:
    cfg = model.config
    n = model.num_parameters() - model.pos_emb.weight.numel()
    return 6 * n + 6 * cfg.n_layers * cfg.emb_dim * T


def make_step(variant: str, batch: int, T: int, preset: str, device: str):
    """(model, step): ``step()`` runs one training step of ``variant`` on random tokens (B, T): forward under
    bf16 autocast, backward, fused AdamW. The benchmark tests time the same step."""
    from gpt import GPT

    backend = {"eager-reference": "reference", "eager-torch": "torch", "compile-torch": "torch",
               "ours": "triton", "ours+compile": "triton"}[variant]
    torch.manual_seed(0)
    model = GPT.from_preset(preset, kernel_backend=backend, context_length=T, pad_vocab_multiple=64).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    fwd = model
    if variant.endswith("compile") or variant == "compile-torch":
        # on the CPU (smoke) no code generation: aot_eager traces forward and backward like inductor does
        fwd = torch.compile(model) if device == "cuda" else torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 50257, (batch, T), device=device)
    y = torch.randint(0, 50257, (batch, T), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(variant: str, batch: int, T: int = FULL["T"], preset: str = FULL["preset"], steps: int = 10,
            warmup: int = 3, device: str = "cuda") -> dict:
    model, step = make_step(variant, batch, T, preset, device)
    for _ in range(warmup):  # compilation, autotuning, allocator
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * T
    return {"case": f"{preset} B{batch}xT{T}", "impl": variant, "ms_per_step": dt * 1e3,
            "tokens_per_s": tokens / dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "tflops": flops_per_token(model, T) * tokens / dt / 1e12}


def _error(e: BaseException) -> str:
    """One line for a failed variant's row: the exception's type and the first line of its message."""
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory"
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _release(device: str) -> None:
    """Free what a variant left behind; after a CUDA error this can fail too, and must not hide it."""
    try:
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    except Exception as e:  # the variant's own error is already in its row
        print(f"e2e_train: cleaning up after a variant failed: {_error(e)}")


def run(quick: bool = False, batch: int = FULL["batch"], variants=None, smoke: bool = False) -> list[dict]:
    """One row per variant: tokens/s, TFLOP/s, MFU and peak memory, or the ``error`` that stopped it."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # takes effect only if `gpt_kernels` is not imported yet
        device, preset, T, batch = "cpu", SMOKE["preset"], SMOKE["T"], SMOKE["batch"]
        steps, warmup = SMOKE["steps"], SMOKE["warmup"]
    elif not torch.cuda.is_available():
        print("e2e_train: needs a CUDA GPU; skipped")
        return []
    else:
        device, preset, T, steps, warmup = "cuda", FULL["preset"], FULL["T"], 5 if quick else 10, 3
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = tuple(variants or (QUICK_VARIANTS if quick else VARIANTS))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown e2e_train variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    peak = measured_bf16_peak_tflops() if device == "cuda" else None
    rows = []
    for v in variants:
        try:
            rows.append(measure(v, batch, T, preset, steps=steps, warmup=warmup, device=device))
        except Exception as e:  # one variant's failure must not lose the others' numbers
            traceback.print_exc()
            rows.append({"case": f"{preset} B{batch}xT{T}", "impl": v, "error": _error(e)})
        _release(device)
    for r in rows:
        if "tflops" in r and peak:
            r["mfu"] = r["tflops"] / peak
            r["measured_peak_tflops"] = peak
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"variants {', '.join(QUICK_VARIANTS)}; 5 timed steps")
    p.add_argument("--batch", type=int, default=FULL["batch"],
                   help=f"sequences of {FULL['T']} tokens per step (default {FULL['batch']})")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="which variants (default: all, or --quick's)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code, times nothing real")
    add_output_args(p)
    args = p.parse_args(argv)
    rows = run(args.quick, args.batch, args.variants, args.smoke)
    if rows:
        print(format_table(rows, ["case", "impl", "ms_per_step", "tokens_per_s", "tflops", "mfu", "peak_gib",
                                  "error"]))
        if not args.smoke:
            print(f"saved {save_results('e2e_train', rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
