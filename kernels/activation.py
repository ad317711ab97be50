"""GELU and the feed-forward's bias + GELU, as Triton kernels.

Both GELU forms, computed in float32 whatever the storage dtype:

- ``"tanh"`` (GPT-2): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Since 1 + tanh(u) =
  2 sigmoid(2u), this is x * sigmoid(2u), written with exp only (runs under the interpreter, and no
  cancellation in 1 + tanh(u) for negative x). d/dx = s + x s (1 - s) 2 du/dx, s = sigmoid(2u).
- ``"none"`` (exact): 0.5 x (1 + erf(x / sqrt 2)); d/dx = Phi(x) + x phi(x).

``gelu`` is elementwise over the flattened tensor (masked tail). ``bias_gelu`` works on (M, N) tiles so
the bias is loaded once per tile; it saves only x and the bias and recomputes x + bias in the backward,
whose bias gradient (a sum of dz over rows) is reduced in float32 per group of rows into a (G, N)
buffer and finished with ``.sum(0)``: no atomics, deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .backend import select
from .norm import new_buffer, next_pow2, resident_programs

GPT2_WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)  # the widths the compile check covers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_APPROXIMATE = ("none", "tanh")

GELU_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, two 16-byte vectors of 16-bit values
GELU_WARPS = 8

# Tests set this to fill every buffer the launchers allocate with NaN (unwritten elements then fail).
POISON_OUTPUTS = False


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
    """d gelu(x) / dx for float32 ``x`` (any shape)."""
    if APPROX_TANH:
        x2 = x * x
        u2 = 2.0 * 0.7978845608028654 * (x + 0.044715 * x2 * x)
        tail = tl.abs(u2) > 80.0  # sigmoid(2u) is 0 or 1 to within 2e-35: the derivative is s
        u2 = tl.minimum(tl.maximum(u2, -80.0), 80.0)  # keeps exp finite
        s = 1.0 / (1.0 + tl.exp(-u2))  # sigmoid(2u)
        s_neg = 1.0 / (1.0 + tl.exp(u2))  # 1 - s, without the cancellation of 1 - s as s -> 1
        du2 = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)  # d(2u)/dx
        return tl.where(tail, tl.where(u2 > 0.0, 1.0, 0.0), s + x * s * s_neg * du2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return cdf + x * pdf


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
    Y,  # out: gelu(X + BIAS), (M, N) contiguous (row stride N), X's dtype
    stride_x,  # elements between rows of X
    M,  # number of rows
    N,  # row width (the bias length)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
    APPROX_TANH: tl.constexpr,  # True: GPT-2's tanh form; False: the erf form
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _gelu(x + b[None, :], APPROX_TANH)  # (BLOCK_M, BLOCK_N)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
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
):
    pid_g = tl.program_id(0).to(tl.int64)  # row group
    pid_n = tl.program_id(1).to(tl.int64)  # column tile
    row_start = pid_g * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    col_mask = cols < N
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
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


def _new(shape, dtype, device) -> torch.Tensor:
    return new_buffer(shape, dtype, device, poison=POISON_OUTPUTS)


def _check_approximate(approximate) -> bool:
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def _check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: the Triton kernel takes float16, bfloat16 or float32 input, got {x.dtype}; "
                        "use kernels.use_backend('torch') for other dtypes")


def _gelu_fwd(x, approx_tanh: bool):
    """Launch the GELU forward on ``x`` (any shape); returns (y, the contiguous x the backward rereads)."""
    _check_input("gelu", x)
    xc = x.contiguous()
    y = _new(x.shape, x.dtype, x.device)
    n = xc.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](xc, y, n, BLOCK=GELU_BLOCK, APPROX_TANH=approx_tanh,
                                                       num_warps=GELU_WARPS)
    return y, xc


def _gelu_bwd(dy, xc, approx_tanh: bool):
    """Launch the GELU backward; returns dx shaped and typed like the forward's input."""
    dyc = dy.contiguous()
    dx = _new(xc.shape, xc.dtype, xc.device)
    n = xc.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, GELU_BLOCK),)](xc, dyc, dx, n, BLOCK=GELU_BLOCK, APPROX_TANH=approx_tanh,
                                                       num_warps=GELU_WARPS)
    return dx


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (M, n) rows with unit column stride: a view when the layout allows, else a copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n)  # (M, N)
    return t2 if t2.stride(1) == 1 or t2.numel() == 0 else t2.contiguous()


def _check_bias(x, bias) -> int:
    _check_input("bias_gelu", x)
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias_gelu: bias must be a torch.Tensor, got {type(bias).__name__}")
    if x.dim() == 0:
        raise ValueError("bias_gelu: input must have at least one dimension (the bias runs along the last)")
    n = x.shape[-1]
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias_gelu: bias must have shape ({n},) to match the input's last dimension, "
                         f"got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias_gelu: bias dtype {bias.dtype} must equal the input's {x.dtype}; cast one of them")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but the input is on {x.device}")
    return n


def _bias_gelu_fwd(x, bias, approx_tanh: bool):
    """Launch gelu(x + bias); returns (y shaped like x, the (M, N) rows of x the backward rereads)."""
    n = _check_bias(x, bias)
    x2 = _rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = _new(x.shape, x.dtype, x.device)
    if m * n:
        cfg = bias_gelu_config(n)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _bias_gelu_fwd_kernel[grid](x2, bias.contiguous(), y, x2.stride(0), m, n, BLOCK_M=cfg["BLOCK_M"],
                                    BLOCK_N=cfg["BLOCK_N"], APPROX_TANH=approx_tanh, num_warps=cfg["num_warps"])
    return y, x2


def _bias_gelu_bwd(dy, x2, bias, approx_tanh: bool):
    """Launch the bias + GELU backward; returns (dx shaped like dy, dbias (N,) float32)."""
    m, n = x2.shape
    dx = _new(dy.shape, x2.dtype, x2.device)
    if m * n == 0:  # no rows: the bias gradient is an empty sum
        return dx, torch.zeros(n, dtype=torch.float32, device=x2.device)
    dy2 = _rows(dy, n)  # (M, N)
    b = bias.contiguous()
    cfg = bias_gelu_config(n)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], APPROX_TANH=approx_tanh, num_warps=cfg["num_warps"])

    def args(part, rows_per_program):
        return (x2, b, dy2, dx, part, x2.stride(0), dy2.stride(0), m, n, rows_per_program)

    key = (tuple(meta.items()), x2.dtype, dy2.dtype, n % 16 == 0)
    resident = resident_programs(_bias_gelu_bwd_kernel, args(b, 3), meta, x2.device, key)
    # row groups: one wave of (groups x column tiles) programs, each walking >= 4 row tiles
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    groups = max(1, min(tiles, resident // n_tiles, triton.cdiv(tiles, 4)))
    rows_per_program = triton.cdiv(tiles, groups) * cfg["BLOCK_M"]
    groups = triton.cdiv(m, rows_per_program)
    part = _new((groups, n), torch.float32, x2.device)
    _bias_gelu_bwd_kernel[(groups, n_tiles)](*args(part, rows_per_program), **meta)
    return dx, part.sum(0)


# ------------------------------------------------------------------------------------ autograd glue


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approx_tanh):
        y, xc = _gelu_fwd(x, approx_tanh)
        ctx.save_for_backward(xc)
        ctx.approx_tanh = approx_tanh
        return y

    @staticmethod
    def backward(ctx, dy):
        (xc,) = ctx.saved_tensors
        return _gelu_bwd(dy, xc, ctx.approx_tanh), None


class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        y, x2 = _bias_gelu_fwd(x, bias, approx_tanh)
        ctx.save_for_backward(x2, bias)  # x and the bias only: x + bias is recomputed
        ctx.approx_tanh = approx_tanh
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dx, db = _bias_gelu_bwd(dy, x2, bias, ctx.approx_tanh)
        return dx, db.to(bias.dtype) if ctx.needs_input_grad[1] else None, None


# ---------------------------------------------------------------------------------- functional API


def gelu(input, approximate="none"):
    """``torch.nn.functional.gelu`` (same signature and default), on the selected backend."""
    impl = select(input)
    if impl == "torch":
        return F.gelu(input, approximate=approximate)
    if impl == "reference":
        return reference.gelu(input, approximate)
    return _GeluFn.apply(input, _check_approximate(approximate))


def bias_gelu(x, bias, approximate="tanh"):
    """``gelu(x + bias)`` in one pass: the feed-forward's bias add and activation."""
    impl = select(x, bias)
    if impl == "torch":
        return F.gelu(x + bias, approximate=approximate)
    if impl == "reference":
        return reference.bias_gelu(x, bias, approximate)
    return _BiasGeluFn.apply(x, bias, _check_approximate(approximate))


# ------------------------------------------------------------------------------------- compile check


def compile_cases():
    """Every kernel at the configurations its launcher picks for GPT-2's widths, both GELU forms: bf16,
    and float32 for the backward (the heaviest in registers). GELU's block is fixed; bias + GELU's tile
    is the same for every width >= 1024 and for 768."""
    from .compile_check import CompileCase

    cases = []
    for ty in ("bf16", "fp32"):
        for tanh in (True, False):
            form = "tanh" if tanh else "erf"
            if ty == "bf16":
                cases.append(CompileCase(
                    "kernels.activation", "_gelu_fwd_kernel", {"X": f"*{ty}", "Y": f"*{ty}", "n_elements": "i32"},
                    {"BLOCK": GELU_BLOCK, "APPROX_TANH": tanh}, num_warps=GELU_WARPS, label=f"{form} {ty}",
                    extra={"divisible_by_16": ["X", "Y"]}))
            cases.append(CompileCase(
                "kernels.activation", "_gelu_bwd_kernel",
                {"X": f"*{ty}", "DY": f"*{ty}", "DX": f"*{ty}", "n_elements": "i32"},
                {"BLOCK": GELU_BLOCK, "APPROX_TANH": tanh}, num_warps=GELU_WARPS, label=f"{form} {ty}",
                extra={"divisible_by_16": ["X", "DY", "DX"]}))
    fwd_sig = {"X": "", "BIAS": "", "Y": "", "stride_x": "i32", "M": "i32", "N": "i32"}
    bwd_sig = {"X": "", "BIAS": "", "DY": "", "DX": "", "DB_PART": "*fp32", "stride_x": "i32", "stride_dy": "i32",
               "M": "i32", "N": "i32", "rows_per_program": "i32"}
    configs = {}
    for n in GPT2_WIDTHS:
        configs.setdefault(tuple(bias_gelu_config(n).items()), n)
    for cfg_items, n in configs.items():
        cfg = dict(cfg_items)
        warps = cfg.pop("num_warps")
        for ty in ("bf16", "fp32"):
            for tanh in (True, False):
                form = "tanh" if tanh else "erf"
                for kernel, base in (("_bias_gelu_fwd_kernel", fwd_sig), ("_bias_gelu_bwd_kernel", bwd_sig)):
                    if ty == "fp32" and kernel == "_bias_gelu_fwd_kernel":
                        continue
                    cases.append(CompileCase(
                        "kernels.activation", kernel, {k: (v or f"*{ty}") for k, v in base.items()},
                        {**cfg, "APPROX_TANH": tanh}, num_warps=warps, label=f"N>={n} {form} {ty}",
                        extra={"divisible_by_16": [k for k in base if k not in ("M", "rows_per_program")]}))
    return cases
