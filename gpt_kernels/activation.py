"""GELU and the feed-forward's bias + GELU, as Triton kernels.

Both GELU forms, computed in float32 whatever the storage dtype:

- ``"tanh"`` (GPT-2): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Since 1 + tanh(u) =
  2 sigmoid(2u), this is x * sigmoid(2u), written with exp only (runs under the interpreter, and no
  cancellation in 1 + tanh(u) for negative x). d/dx = s + x s (1 - s) 2 du/dx, s = sigmoid(2u).
- ``"none"`` (exact): 0.5 x (1 + erf(x / sqrt 2)); d/dx = Phi(x) + x phi(x).

``gelu`` is elementwise over the flattened tensor (masked tail). ``bias_gelu`` works on (M, N) tiles so
the bias is loaded once per tile; it saves only x and the bias and recomputes x + bias in the backward,
whose bias gradient (a sum of dz over rows) is reduced in float32 per group of rows into a (G, N)
buffer and finished with ``.sum(0)``: no atomics, deterministic. The bias may be float32 beside a bf16
activation (under autocast it is rounded to the activation's dtype in the kernel, as ``nn.Linear`` casts
its bias; see :mod:`gpt_kernels.autocast`); its gradient comes back in its own dtype.

Layers: the ``@triton.jit`` kernels; the launchers; the ``torch.library`` custom ops
``gpt_triton::gelu`` / ``gelu_backward`` and ``gpt_triton::bias_gelu`` / ``bias_gelu_backward`` with fake
implementations and the autograd formulas; the functional entries ``gelu`` and ``bias_gelu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .autocast import autocast_dtype
from .backend import select
from .common import (
    LAUNCH_OPTIONS,
    as_rows,
    check_same_device,
    check_tensor,
    check_vector,
    new_buffer,
    next_pow2,
    on_inputs_device,
    resident_programs,
    split_rows,
)

_APPROXIMATE = ("none", "tanh")

GELU_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, two 16-byte vectors of 16-bit values
GELU_WARPS = 8


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gelu(x, APPROX_TANH: tl.constexpr):
    """GELU of float32 ``x`` (any shape). Constants: sqrt(2/pi) = 0.79788..., 1/sqrt(2) = 0.70710...,
    1/sqrt(2 pi) = 0.39894... (in ``_gelu_grad``)."""
    if APPROX_TANH:
        u2 = 2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)  # 2u, u = sqrt(2/pi)(x + 0.044715 x^3)
        s = 1.0 / (1.0 + tl.exp(-tl.maximum(u2, -80.0)))  # sigmoid(2u); the clamp keeps exp finite
        s = tl.where(u2 < -80.0, 0.0, s)  # sigmoid < 2e-35 there: 0, so x * s stays 0 for any x
        return x * s  # == 0.5 x (1 + tanh(u))
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x, APPROX_TANH: tl.constexpr):
    """d gelu(x) / dx for float32 ``x`` (any shape).

    tanh form: with e = exp(-2u), s = sigmoid(2u) = 1 / (1 + e) and 1 - s = e s, so one exponential and
    one reciprocal give both (no cancellation in 1 - s as s -> 1): the op stays bandwidth-bound.
    """
    if APPROX_TANH:
        x2 = x * x
        u2 = 2.0 * 0.7978845608028654 * (x + 0.044715 * x2 * x)
        tail = tl.abs(u2) > 80.0  # sigmoid(2u) is 0 or 1 to within 2e-35: the derivative is s
        e = tl.exp(-tl.minimum(tl.maximum(u2, -80.0), 80.0))  # exp(-2u), kept finite
        s = 1.0 / (1.0 + e)  # sigmoid(2u)
        du2 = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)  # d(2u)/dx
        return tl.where(tail, tl.where(u2 > 0.0, 1.0, 0.0), s + x * s * (e * s) * du2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return cdf + x * pdf


@triton.jit
def _load_bias(BIAS, cols, col_mask, x_dtype: tl.constexpr, ROUND: tl.constexpr):
    """The bias at ``cols`` in float32, first rounded to ``x_dtype`` when ROUND."""
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0)
    if ROUND:
        b = b.to(x_dtype)
    return b.to(tl.float32)


@triton.jit
def _gelu_fwd_kernel(
    X,  # input, (n_elements,) contiguous
    Y,  # out: gelu(X), (n_elements,) contiguous, X's dtype
    n_elements,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
    APPROX_TANH: tl.constexpr,  # True: GPT-2's tanh form; False: the erf form
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) int64
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, _gelu(x, APPROX_TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    X,  # the forward's input, (n_elements,) contiguous
    DY,  # gradient of the output, (n_elements,) contiguous
    DX,  # out: gradient of the input, (n_elements,) contiguous, X's dtype
    n_elements,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
    APPROX_TANH: tl.constexpr,  # True: GPT-2's tanh form; False: the erf form
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) int64
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * _gelu_grad(x, APPROX_TANH)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # input rows, (M, N), row stride stride_x, unit column stride
    BIAS,  # bias, (N,)
    Y,  # out: gelu(X + BIAS), (M, N) contiguous (row stride N), Y's dtype
    stride_x,  # elements between rows of X
    M,  # number of rows
    N,  # row width (the bias length)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
    APPROX_TANH: tl.constexpr,  # True: GPT-2's tanh form; False: the erf form
    ROUND_BIAS: tl.constexpr,  # round the bias to X's dtype first, as nn.Linear casts its bias under autocast
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
    b = _load_bias(BIAS, cols, col_mask, X.dtype.element_ty, ROUND_BIAS)  # (BLOCK_N,) fp32
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _gelu(x + b[None, :], APPROX_TANH)  # (BLOCK_M, BLOCK_N)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])  # its value follows the GPU's size: one compile for all
def _bias_gelu_bwd_kernel(
    X,  # the forward's input rows, (M, N), row stride stride_x
    BIAS,  # bias, (N,)
    DY,  # gradient of the output, (M, N), row stride stride_dy
    DX,  # out: gradient of X, (M, N) contiguous (row stride N), X's dtype
    DB_PART,  # out: per-row-group sums of the gradient over its rows, (G, N) float32
    stride_x,  # elements between rows of X
    stride_dy,  # elements between rows of DY
    M,  # number of rows
    N,  # row width
    rows_per_program,  # rows each row group owns, a multiple of BLOCK_M; group g: [g*rpp, (g+1)*rpp)
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_N: tl.constexpr,  # columns per program
    APPROX_TANH: tl.constexpr,  # True: GPT-2's tanh form; False: the erf form
    ROUND_BIAS: tl.constexpr,  # as in the forward: recompute exactly the forward's x + bias
):
    pid_g = tl.program_id(0).to(tl.int64)  # row group
    pid_n = tl.program_id(1).to(tl.int64)  # column tile
    row_start = pid_g * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    col_mask = cols < N
    b = _load_bias(BIAS, cols, col_mask, X.dtype.element_ty, ROUND_BIAS)  # (BLOCK_N,) fp32
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum over this group's rows of the gradient
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
        mask = (rows < row_end)[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dz = dy * _gelu_grad(x + b[None, :], APPROX_TANH)  # (BLOCK_M, BLOCK_N), zero where masked
        tl.store(DX + rows[:, None] * N + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dz, axis=0)
    tl.store(DB_PART + pid_g * N + cols, db, mask=col_mask)


# ------------------------------------------------------------------------------------------ launchers


def bias_gelu_config(n: int) -> dict:
    """Tile of the bias + GELU kernels for rows of width ``n`` (any dtype): up to 1024 columns, so the
    four warps sit side by side along a row (the backward's column sums stay inside each thread) and
    each thread holds 16-byte vectors; rows stacked to 4096 elements a tile (32 values per thread)."""
    block_n = min(1024, next_pow2(n))
    block_m = min(64, max(1, 4096 // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4}


@on_inputs_device
def _gelu_fwd(x, approx_tanh: bool):
    """Launch the GELU forward on ``x`` (any shape); returns y shaped and typed like x, contiguous."""
    xc = x.contiguous()
    y = new_buffer(x.shape, x.dtype, x.device)
    n = xc.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](xc, y, n, BLOCK=GELU_BLOCK, APPROX_TANH=approx_tanh,
                                                       num_warps=GELU_WARPS, **LAUNCH_OPTIONS)
    return y


@on_inputs_device
def _gelu_bwd(dy, x, approx_tanh: bool):
    """Launch the GELU backward; returns dx shaped and typed like the forward's input x."""
    xc, dyc = x.contiguous(), dy.contiguous()
    dx = new_buffer(x.shape, x.dtype, x.device)
    n = xc.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](xc, dyc, dx, n, BLOCK=GELU_BLOCK, APPROX_TANH=approx_tanh,
                                                       num_warps=GELU_WARPS, **LAUNCH_OPTIONS)
    return dx


@on_inputs_device
def _bias_gelu_fwd(x, bias, approx_tanh: bool, round_bias: bool, out_dtype):
    """Launch gelu(x + bias); returns y shaped like x, in ``out_dtype``."""
    n = x.shape[-1]
    x2 = as_rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = new_buffer(x.shape, out_dtype, x.device)
    if m * n:
        cfg = bias_gelu_config(n)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _bias_gelu_fwd_kernel[grid](x2, bias.contiguous(), y, x2.stride(0), m, n, BLOCK_M=cfg["BLOCK_M"],
                                    BLOCK_N=cfg["BLOCK_N"], APPROX_TANH=approx_tanh, ROUND_BIAS=round_bias,
                                    num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)
    return y


@on_inputs_device
def _bias_gelu_bwd(dy, x, bias, approx_tanh: bool, round_bias: bool):
    """Launch the bias + GELU backward; returns (dx shaped and typed like x, dbias (N,) float32)."""
    n = x.shape[-1]
    x2 = as_rows(x, n)  # (M, N)
    m = x2.shape[0]
    dx = new_buffer(x.shape, x.dtype, x.device)
    if m * n == 0:  # no rows: the bias gradient is an empty sum
        return dx, torch.zeros(n, dtype=torch.float32, device=x.device)
    dy2 = as_rows(dy, n)  # (M, N)
    b = bias.contiguous()
    cfg = bias_gelu_config(n)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], APPROX_TANH=approx_tanh, ROUND_BIAS=round_bias,
                num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)

    def args(part, rows_per_program):
        return (x2, b, dy2, dx, part, x2.stride(0), dy2.stride(0), m, n, rows_per_program)

    # the warm-up compiles what the launch runs: the fp32 partials (a fresh, so aligned, buffer) stand in as a
    # dtype, and the kernel does not specialize on rows_per_program
    key = (tuple(meta.items()), x2.dtype, dy2.dtype, b.dtype, n % 16 == 0)
    resident = resident_programs(_bias_gelu_bwd_kernel, args(torch.float32, 0), meta, x.device, key)
    # row groups: one wave of (groups x column tiles) programs, each walking >= 4 row tiles
    groups, rows_per_program = split_rows(m, cfg["BLOCK_M"], max(1, resident // n_tiles))
    part = new_buffer((groups, n), torch.float32, x.device)
    _bias_gelu_bwd_kernel[(groups, n_tiles)](*args(part, rows_per_program), **meta)
    return dx, part.sum(0)


# -------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, approx_tanh: bool) -> torch.Tensor:
    return _gelu_fwd(x, approx_tanh)


@torch.library.custom_op("gpt_triton::gelu_backward", mutates_args=())
def _gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, approx_tanh: bool) -> torch.Tensor:
    return _gelu_bwd(dy, x, approx_tanh)


@torch.library.custom_op("gpt_triton::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, approx_tanh: bool, round_bias: bool,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """gelu(x + bias) in ``out_dtype``; with ``round_bias`` the bias is first rounded to x's dtype."""
    return _bias_gelu_fwd(x, bias, approx_tanh, round_bias, out_dtype)


@torch.library.custom_op("gpt_triton::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approx_tanh: bool,
                           round_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dbias in the bias' dtype, summed in float32)."""
    dx, db = _bias_gelu_bwd(dy, x, bias, approx_tanh, round_bias)
    return dx, db.to(bias.dtype)


@_gelu_op.register_fake
def _(x, approx_tanh):
    return x.new_empty(x.shape)


@_gelu_backward_op.register_fake
def _(dy, x, approx_tanh):
    return x.new_empty(x.shape)


@_bias_gelu_op.register_fake
def _(x, bias, approx_tanh, round_bias, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias, approx_tanh, round_bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _gelu_setup(ctx, inputs, output):
    x, approx_tanh = inputs
    ctx.save_for_backward(x)
    ctx.approx_tanh = approx_tanh


def _gelu_vjp(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_backward_op(dy, x, ctx.approx_tanh), None


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approx_tanh, round_bias, _ = inputs
    ctx.save_for_backward(x, bias)  # x and the bias only: x + bias is recomputed
    ctx.flags = (approx_tanh, round_bias)


def _bias_gelu_vjp(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_backward_op(dy, x, bias, *ctx.flags)
    return dx, db if ctx.needs_input_grad[1] else None, None, None, None


_gelu_op.register_autograd(_gelu_vjp, setup_context=_gelu_setup)
_bias_gelu_op.register_autograd(_bias_gelu_vjp, setup_context=_bias_gelu_setup)


# ---------------------------------------------------------------------------------- functional API


def _check_approximate(approximate) -> bool:
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def gelu(input, approximate="none"):
    """``torch.nn.functional.gelu`` (same signature and default), on the selected backend; the output has
    the input's dtype, under autocast too."""
    impl = select(input)
    if impl == "torch":
        return F.gelu(input, approximate=approximate)
    if impl == "reference":
        return reference.gelu(input, approximate)
    approx_tanh = _check_approximate(approximate)
    check_tensor("gelu", "input", input)
    return _gelu_op(input, approx_tanh)


def bias_gelu(x, bias, approximate="tanh"):
    """``gelu(x + bias)`` in one pass: the feed-forward's bias add and activation.

    Without autocast the output has the dtype ``x + bias`` has; under autocast x and the bias are rounded
    to autocast's dtype, as ``nn.Linear`` would give them, and so is the output.
    """
    check_same_device("bias_gelu", input=x, bias=bias)
    amp = autocast_dtype(x)
    impl = select(x, bias)
    if impl in ("torch", "reference"):
        if amp is not None:
            x, bias = x.to(amp), bias.to(amp)
        return F.gelu(x + bias, approximate=approximate) if impl == "torch" else reference.bias_gelu(
            x, bias, approximate)
    approx_tanh = _check_approximate(approximate)
    _check_bias(x, bias)
    if amp is not None:
        return _bias_gelu_op(x.to(amp), bias, approx_tanh, bias.dtype != amp, amp)
    return _bias_gelu_op(x, bias, approx_tanh, False, torch.promote_types(x.dtype, bias.dtype))


def _check_bias(x, bias) -> None:
    check_tensor("bias_gelu", "input", x)
    if x.dim() == 0:
        raise ValueError("bias_gelu: input must have at least one dimension (the bias runs along the last)")
    check_vector("bias_gelu", "bias", bias, x.shape[-1], x)


# ------------------------------------------------------------------------------------- compile check


def compile_cases():
    """Every kernel at the configurations its launcher picks for the compile check's widths: GELU's fixed
    block (the benchmarks' bf16, both forms; the backward in float32 too); bias + GELU's tile for each width
    class (256, and every width >= 768 share one) in the dtypes the model runs it in (bf16; autocast's mix, a
    bf16 activation with its fp32 bias rounded in the kernel; float32) with GPT-2's tanh form, and the erf
    form at the GPT-2 widths. fp16 is compiled as bf16 (compile_check.stand_in). Pointers, strides, widths and
    GELU's element count are 16-divisible, as at every GPT-2 size (M * N with N a multiple of 16): the JIT
    specializes on that at run time, and it is what lets the loads and stores be 128-bit."""
    from .compile_check import ARCHS, BENCH_WIDTHS, FF_WIDTHS, PRIMARY, CompileCase

    cases = []
    for ty in ("bf16", "fp32"):
        for tanh in (True, False):
            form = "tanh" if tanh else "erf"
            archs = ARCHS if tanh and ty == "bf16" else PRIMARY  # the benchmarks' GELU: every target
            if ty == "bf16":
                cases.append(CompileCase(
                    "gpt_kernels.activation", "_gelu_fwd_kernel", {"X": f"*{ty}", "Y": f"*{ty}", "n_elements": "i32"},
                    {"BLOCK": GELU_BLOCK, "APPROX_TANH": tanh}, num_warps=GELU_WARPS, label=f"{form} {ty}",
                    extra={"divisible_by_16": ["X", "Y", "n_elements"]}, archs=archs))
            cases.append(CompileCase(
                "gpt_kernels.activation", "_gelu_bwd_kernel",
                {"X": f"*{ty}", "DY": f"*{ty}", "DX": f"*{ty}", "n_elements": "i32"},
                {"BLOCK": GELU_BLOCK, "APPROX_TANH": tanh}, num_warps=GELU_WARPS, label=f"{form} {ty}",
                extra={"divisible_by_16": ["X", "DY", "DX", "n_elements"]}, archs=archs))
    fwd_sig = {"X": "", "BIAS": "", "Y": "", "stride_x": "i32", "M": "i32", "N": "i32"}
    bwd_sig = {"X": "", "BIAS": "", "DY": "", "DX": "", "DB_PART": "*fp32", "stride_x": "i32", "stride_dy": "i32",
               "M": "i32", "N": "i32", "rows_per_program": "i32"}
    configs = {}  # config -> the widths it serves: the model's feed-forward widths, the benchmarks' (bf16)
    for n in sorted(set(FF_WIDTHS + BENCH_WIDTHS)):
        configs.setdefault(tuple(bias_gelu_config(n).items()), []).append(n)
    # "amp": what autocast gives the model, a bf16 activation with its fp32 bias (rounded in the kernel)
    for cfg_items, widths in configs.items():
        cfg = dict(cfg_items)
        warps = cfg.pop("num_warps")
        n = widths[0]
        for ty in ("bf16", "amp", "fp32") if set(widths) & set(FF_WIDTHS) else ("bf16",):
            for tanh in (True, False) if n >= 768 else (True,):
                form = "tanh" if tanh else "erf"
                for kernel, base in (("_bias_gelu_fwd_kernel", fwd_sig), ("_bias_gelu_bwd_kernel", bwd_sig)):
                    sig = {k: (v or f"*{'bf16' if ty == 'amp' else ty}") for k, v in base.items()}
                    if ty == "amp":
                        sig["BIAS"] = "*fp32"
                    default = n >= 768 and tanh and ty != "fp32"  # GPT-2's, bf16 or autocast: every target
                    cases.append(CompileCase(
                        "gpt_kernels.activation", kernel, sig, {**cfg, "APPROX_TANH": tanh, "ROUND_BIAS": ty == "amp"},
                        num_warps=warps, label=f"N>={n} {form} {ty}",
                        extra={"divisible_by_16": [k for k in base if k not in ("M", "rows_per_program")]},
                        archs=ARCHS if default else PRIMARY))
    return cases
