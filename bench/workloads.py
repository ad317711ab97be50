"""What the GPU check's suites launch on the Triton backend, once each: workloads for ``gpt_kernels.precompile``.

Each function runs one suite's Triton calls at its ``--quick`` shapes and dtype (forward and backward, the
input makers and constants are the suite's own), so that ``gpt_kernels.precompile`` can plan them and compile
every kernel they need in parallel before the suite runs and times them::

    python -m gpt_kernels.precompile bench.workloads:gpu_check     # every suite below, on this GPU

Nothing here is timed. On a machine without a GPU the same workloads run on the CPU (only ever planned there:
``gpt_kernels.precompile`` records the kernel launches instead of running them), at the same shapes but with
the batch of the large ones cut down (which changes no kernel specialization: see ``_rows``).
"""

from __future__ import annotations

import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rows(n: int) -> int:
    """Rows of a batch: as many as the suite on a GPU; on the CPU (a plan only) 64, a multiple of 16 as the
    suites' row counts are, so that every pointer and integer specializes as it does there."""
    return n if torch.cuda.is_available() else 64


def _backward(out, inputs) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(outs, wrt, [torch.randn_like(o) for o in outs])


def norm() -> None:
    """bench_norm's quick widths: layer_norm and add_layer_norm, bf16, forward and backward."""
    from bench.bench_norm import QUICK_ROWS, QUICK_WIDTHS, norm_ops

    _sweep(norm_ops(), QUICK_WIDTHS, QUICK_ROWS)


def activation() -> None:
    """bench_activation's quick widths: gelu and bias_gelu (tanh), bf16, forward and backward."""
    from bench.bench_activation import activation_ops
    from bench.bench_norm import QUICK_ROWS, QUICK_WIDTHS

    _sweep(activation_ops(), QUICK_WIDTHS, QUICK_ROWS)


def _sweep(ops: dict, widths, rows) -> None:
    for n in widths:
        for m in rows:
            for make, impls, _ in ops.values():
                inputs, _ = make(_rows(m), n, _device(), torch.bfloat16)
                _backward(impls["triton"](*inputs), inputs)


def attention() -> None:
    """bench_attention's quick cases: D = 64, T = 1024 and 4096, causal; plain, dropout and the atomic backward."""
    from bench.bench_attention import HIDDEN, QUICK_HEAD_DIMS, QUICK_SEQ_LENS, TOKENS, inputs, providers

    ours = providers(smoke=not torch.cuda.is_available())
    for D in QUICK_HEAD_DIMS:
        for T in QUICK_SEQ_LENS:
            B = max(1, _rows(TOKENS) // T)
            q, k, v, do = inputs(B, max(1, HIDDEN // D), T, D, _device(), torch.bfloat16)
            for name in ("triton", "triton-atomic", "triton-dropout"):
                ours[name](q, k, v).backward(do)


def cross_entropy() -> None:
    """bench_cross_entropy's quick sizes: the fused loss on (N, 50,257) bf16 logits and the chunked linear loss."""
    import gpt_kernels
    from bench.bench_cross_entropy import C_GPT2, QUICK_SIZES, V_GPT2

    device = _device()
    for n in QUICK_SIZES:
        n = _rows(n)
        t = torch.randint(0, V_GPT2, (n,), device=device)  # (N,)
        x = torch.randn(n, V_GPT2, device=device).to(torch.bfloat16).requires_grad_()  # (N, V)
        h = torch.randn(n, C_GPT2, device=device).to(torch.bfloat16).requires_grad_()  # (N, C)
        w = (torch.randn(V_GPT2, C_GPT2, device=device) * 0.02).to(torch.bfloat16).requires_grad_()  # (V, C)
        with gpt_kernels.use_backend("triton"):
            gpt_kernels.cross_entropy(x, t).backward()
            gpt_kernels.linear_cross_entropy(h, w, t).backward()


def e2e_train() -> None:
    """One training step of e2e_train's ``ours`` (gpt2-small, 1024 tokens, bf16 autocast, dropout 0.1)."""
    from bench.e2e_train import make_step

    _, step = make_step("ours", 16 if torch.cuda.is_available() else 1, 1024, "gpt2-small", _device())
    step()


def generate() -> None:
    """bench_generate's model (gpt2-small in bf16, or fp32 without bf16) generating with its KV cache: the prompt's
    forward, then one-token decoding steps (flash-decoding)."""
    from bench.bench_generate import PROMPT_TOKENS, prompts
    from gpt import GPT
    from gpt import generate as gen

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float32
    model = GPT.from_preset("gpt2-small", dropout=0.0, kernel_backend="triton").to(_device(), dtype).eval()
    for batch in (1, 8):
        gen(model, prompts(batch, PROMPT_TOKENS).to(_device()), 2)


SUITES = {"attention": attention, "e2e_train": e2e_train, "cross_entropy": cross_entropy, "norm": norm,
          "activation": activation, "generate": generate}


def gpu_check() -> None:
    """Every suite's workload, in the GPU check's order. One that fails (a missing package, say) is reported and
    the others still run, so that their kernels are still planned and compiled."""
    import traceback

    for name, workload in SUITES.items():
        try:
            workload()
        except Exception as e:  # the suite itself will fail with its own error later; its kernels compile then
            traceback.print_exc()
            print(f"bench.workloads: the {name} workload stopped ({type(e).__name__}: {e}); the others go on",
                  flush=True)
