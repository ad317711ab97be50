"""End-to-end training speed on a GPU: gpt2-small, context 1024, bf16 autocast, fused AdamW.

Variants, each measured in the same run on the same card:

- ``eager-reference``: the readable PyTorch ops of ``kernels.reference`` (manual attention);
- ``eager-torch``: PyTorch's own fused ops (``F.layer_norm``, ``F.gelu``, SDPA, ``F.cross_entropy``);
- ``compile-torch``: ``torch.compile`` of ``eager-torch``;
- ``ours``: the Triton kernels (LayerNorm, add+LayerNorm, bias+GELU, FlashAttention, chunked linear CE);
- ``ours+compile``: ``torch.compile`` on top of the Triton kernels.

Figures: tokens/s, model FLOPs utilisation and peak memory. FLOPs per token follow llm.c / PaLM:
``6 * N + 6 * n_layers * emb_dim * T`` (N = parameters without the position embedding, the second term
the attention score and value products, counted once for the causal half), over the card's bf16 peak
*measured in the same run* with a large matmul (the datasheet's 989 TFLOP/s is quoted beside it).

    python -m bench e2e_train            # needs a CUDA GPU
"""

from __future__ import annotations

import time

import torch

from bench.common import format_table, save_results

METRIC = "tokens_per_s"
REQUIRES_GPU = True
VARIANTS = ("eager-reference", "eager-torch", "compile-torch", "ours", "ours+compile")


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


def _step_fn(variant: str, batch: int, T: int, preset: str):
    from gpt import GPT

    backend = {"eager-reference": "reference", "eager-torch": "torch", "compile-torch": "torch",
               "ours": "triton", "ours+compile": "triton"}[variant]
    torch.manual_seed(0)
    model = GPT.from_preset(preset, kernel_backend=backend, context_length=T, pad_vocab_multiple=64).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if variant.endswith("compile") or variant == "compile-torch" else model
    x = torch.randint(0, 50257, (batch, T), device="cuda")
    y = torch.randint(0, 50257, (batch, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def measure(variant: str, batch: int, T: int = 1024, preset: str = "gpt2-small", steps: int = 10) -> dict:
    torch.cuda.empty_cache()
    model, step = _step_fn(variant, batch, T, preset)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * T
    row = {"case": f"{preset} B{batch}xT{T}", "impl": variant, "ms_per_step": dt * 1e3,
           "tokens_per_s": tokens / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "tflops": flops_per_token(model, T) * tokens / dt / 1e12}
    del model, step
    return row


def run(quick: bool = False, batch: int = 16) -> list[dict]:
    if not torch.cuda.is_available():
        print("e2e_train: needs a CUDA GPU; skipped")
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measured_bf16_peak_tflops()
    variants = ("eager-torch", "ours") if quick else VARIANTS
    rows = []
    for v in variants:
        try:
            rows.append(measure(v, batch, steps=5 if quick else 10))
        except torch.OutOfMemoryError:
            rows.append({"case": f"gpt2-small B{batch}xT1024", "impl": v, "error": "out of memory"})
        torch.cuda.empty_cache()
    for r in rows:
        if "tflops" in r:
            r["mfu"] = r["tflops"] / peak
            r["measured_peak_tflops"] = peak
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=16, help="sequences of 1024 tokens per step (default 16)")
    args = p.parse_args(argv)
    rows = run(args.quick, args.batch)
    if rows:
        print(format_table(rows, ["case", "impl", "ms_per_step", "tokens_per_s", "tflops", "mfu", "peak_gib"]))
        print(f"saved {save_results('e2e_train', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
