"""LayerNorm and residual-add + LayerNorm over the last dimension, as Triton kernels.

Forward: each program normalizes a tile of ``BLOCK_M`` whole rows held in registers (``BLOCK_N`` =
the width rounded up to a power of two, masked), two-pass mean and variance in float32, and keeps the
float32 mean and 1/std of every row for the backward. ``add_layer_norm`` adds the residual in the same
pass and writes the sum (the new residual stream) beside the norm. Input, residual, sum and output may
each have their own dtype: under autocast the fp32 residual stream meets a bf16 branch, and the norm's
output goes to the next matmul in bf16 (the policy is in :mod:`gpt_kernels.autocast`).

Backward: dx = rstd * (w*dy - mean(w*dy) - xhat * mean(xhat * w*dy)) per row (plus the gradient that
arrives on the sum output for ``add_layer_norm``, written once per input dtype). The weight and bias
gradients are sums over rows: each program walks its own contiguous group of rows, accumulates
``dy * xhat`` and ``dy`` in float32 registers and writes one row of a (G, N) float32 partial buffer;
``partials.sum(1)`` finishes the sum. No atomics, so the result is deterministic.

Layers: the ``@triton.jit`` kernels; the launchers ``_layer_norm_fwd`` / ``_layer_norm_bwd``; the
``torch.library`` custom ops ``gpt_triton::layer_norm``, ``gpt_triton::add_layer_norm`` and
``gpt_triton::layer_norm_backward`` (fake implementations for ``torch.compile``, autograd formulas
registered on the forward ops); the functional entries, which apply the dtype policy and pick the backend.

Limit: a row must fit one block, N <= MAX_N = 8192 (every GPT-2 width; gpt2-xl's is 6400). Wider rows
raise a ValueError that names the limit and points to the torch backend (no silent fallback).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .autocast import autocast_dtype, matmul_dtype
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

MAX_N = 8192  # widest row one program holds in registers (backward: x, dy, w and two sums, no spills)


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input rows, (M, N), row stride stride_x, unit column stride
    R,  # residual rows, (M, N), row stride stride_r (read only when HAS_RESIDUAL)
    S,  # out: X + R in S's dtype, (M, N), row stride stride_out (written only when HAS_RESIDUAL)
    Y,  # out: the normalized rows in Y's dtype, (M, N), row stride stride_out
    W,  # weight, (N,) (read only when HAS_WEIGHT)
    B,  # bias, (N,) (read only when HAS_BIAS)
    Mean,  # out: mean of each row, (M,) float32
    Rstd,  # out: 1 / sqrt(var + eps) of each row, (M,) float32
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    stride_out,  # elements between rows of S and Y
    M,  # number of rows
    N,  # row width: the normalized dimension
    eps,  # added to the variance
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N: one whole row per block row
    HAS_RESIDUAL: tl.constexpr,  # add R first and write the sum to S
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # the sum as stored: the norm and its backward both see this
        tl.store(S + rows[:, None] * stride_out + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=1) / N  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)  # (BLOCK_M, BLOCK_N), zero past the row's end
    var = tl.sum(xc * xc, axis=1) / N  # (BLOCK_M,) biased variance, as torch
    rstd = 1.0 / tl.sqrt(var + eps)  # (BLOCK_M,)
    y = xc * rstd[:, None]  # (BLOCK_M, BLOCK_N)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_out + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["rows_per_program"])  # its value follows the GPU's size: one compile for all
def _layer_norm_bwd_kernel(
    X,  # the normalized rows as the forward saw them (x, or the sum for add_layer_norm), (M, N), stride_x
    W,  # weight, (N,) (read only when HAS_WEIGHT)
    Mean,  # mean of each row from the forward, (M,) float32
    Rstd,  # 1 / std of each row from the forward, (M,) float32
    DY,  # gradient of the norm's output, (M, N), row stride stride_dy
    DS,  # gradient arriving on add_layer_norm's sum output, (M, N), row stride stride_ds (when HAS_DS)
    DX,  # out: gradient of the input (and of the residual when not HAS_DR), (M, N), row stride stride_dx
    DR,  # out: gradient of the residual in its own dtype, (M, N), row stride stride_dx (when HAS_DR)
    DW_PART,  # out: per-program sums over its rows of dy * xhat, (G, N) float32 (when HAS_WEIGHT)
    DB_PART,  # out: per-program sums over its rows of dy, (G, N) float32 (when HAS_BIAS)
    stride_x,  # elements between rows of X
    stride_dy,  # elements between rows of DY
    stride_ds,  # elements between rows of DS
    stride_dx,  # elements between rows of DX
    M,  # number of rows
    N,  # row width
    rows_per_program,  # rows each program owns, a multiple of BLOCK_M; program g owns rows [g*rpp, (g+1)*rpp)
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_N: tl.constexpr,  # power of two >= N
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,  # add DS to the input gradient
    HAS_DR: tl.constexpr,  # also write the gradient to DR (add_layer_norm with residual and input dtypes apart)
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    # running sums of dy * xhat and dy over this program's rows, kept per row slot and summed over the
    # slots once at the end: no reduction across warps inside the loop
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)  # (BLOCK_M,)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)  # (BLOCK_M,)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # (BLOCK_M, BLOCK_N)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        # both row sums in one reduction (one exchange across warps for the two, not two)
        c1, c2 = tl.reduce((xhat * wdy, wdy), 1, _add_pair)  # (BLOCK_M,) each
        c1 = c1 / N  # mean of xhat * w*dy
        c2 = c2 / N  # mean of w*dy
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # (BLOCK_M, BLOCK_N)
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DR:
            tl.store(DR + rows[:, None] * stride_dx + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db, axis=0), mask=col_mask)


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


# ------------------------------------------------------------------------------------------ launchers


def fwd_config(n: int) -> dict:
    """Block sizes and warps of the forward for rows of width ``n`` (any dtype).

    Warps grow with the width so each thread holds one 16-byte vector (8 x 16-bit) per row at widths up
    to 4096, two at 8192; narrow rows are stacked BLOCK_M to a program so each thread has about 32 values
    in flight (more bytes per program, fewer programs to schedule).
    """
    block_n = next_pow2(n)
    num_warps = min(16, max(1, block_n // 256))
    block_m = min(64, max(1, 32 * 32 * num_warps // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def bwd_config(n: int) -> dict:
    """Block sizes and warps of the backward: 8 warps (16 from 8192), and about 16 values per thread per
    tensor, since x, dy, the weight and the two running sums all live in registers.

    Why 8 warps rather than the forward's width-scaled count: the grid is one wave of these programs
    (``split_rows``), each writing one row of fp32 weight-gradient partials, so bigger programs mean
    fewer partials; and at widths >= 3072 two 8-warp programs per SM overlap each other's cross-warp
    row reductions, where one 16-warp program would stall on its own.
    """
    block_n = next_pow2(n)
    num_warps = 16 if block_n >= 8192 else 8
    block_m = min(64, max(1, 16 * 32 * num_warps // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


# the (G, N) fp32 weight-gradient partials then cost < 8% of the backward's 16-bit row traffic (16 G N
# bytes written and read back, against 3 M N e for x, dy and dx)
MIN_ROWS_PER_PROGRAM = 32


@on_inputs_device
def _layer_norm_fwd(x, weight, bias, eps, out_dtype, residual=None):
    """Launch the forward. Returns ``(y, s, mean, rstd)``: y (x's shape, ``out_dtype``), the sum s (x's
    shape, x and residual's promoted dtype; None without a residual), mean and rstd (M,) float32."""
    n = x.shape[-1]
    x2 = as_rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = new_buffer(x.shape, out_dtype, x.device)
    s = new_buffer(x.shape, torch.promote_types(x.dtype, residual.dtype), x.device) if residual is not None else None
    mean = new_buffer((m,), torch.float32, x.device)
    rstd = new_buffer((m,), torch.float32, x.device)
    if m * n == 0:
        return y, s, mean, rstd
    r2 = as_rows(residual, n) if residual is not None else x2  # (M, N)
    w = weight.contiguous() if weight is not None else x2  # (N,) (x2 stands in for an unused pointer)
    b = bias.contiguous() if bias is not None else x2
    cfg = fwd_config(n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _layer_norm_fwd_kernel[grid](
        x2, r2, s if s is not None else y, y, w, b, mean, rstd,
        x2.stride(0), r2.stride(0), n, m, n, float(eps),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, num_warps=cfg["num_warps"],
        **LAUNCH_OPTIONS)
    return y, s, mean, rstd


@on_inputs_device
def _layer_norm_bwd(dy, xn, weight, has_bias, mean, rstd, dx_dtype, ds=None, dr_dtype=None):
    """Launch the backward. ``xn``: what the forward normalized (x, or the sum s), any shape (..., N);
    ``dy`` and ``ds`` (optional) shaped like it. Returns ``(dx, dr, dweight, dbias)``: dx in ``dx_dtype``,
    dr the same gradient in ``dr_dtype`` (None unless given), dweight/dbias (N,) float32 (None when the
    forward had no weight / bias)."""
    n = xn.shape[-1]
    x2 = as_rows(xn, n)  # (M, N)
    m = x2.shape[0]
    dx = new_buffer(xn.shape, dx_dtype, xn.device)
    dr = new_buffer(xn.shape, dr_dtype, xn.device) if dr_dtype is not None else None
    if m * n == 0:  # no rows: the sums over rows are zero, as torch gives
        dw = torch.zeros(n, dtype=torch.float32, device=xn.device) if weight is not None else None
        db = torch.zeros(n, dtype=torch.float32, device=xn.device) if has_bias else None
        return dx, dr, dw, db
    dy2 = as_rows(dy, n)  # (M, N)
    ds2 = as_rows(ds, n) if ds is not None else dy2  # (M, N)
    w = weight.contiguous() if weight is not None else x2
    cfg = bwd_config(n)
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_WEIGHT=weight is not None,
                HAS_BIAS=has_bias, HAS_DS=ds is not None, HAS_DR=dr is not None, num_warps=cfg["num_warps"],
                **LAUNCH_OPTIONS)

    def args(dw_part, db_part, rows_per_program):
        return (x2, w, mean, rstd, dy2, ds2, dx, dr if dr is not None else dx, dw_part, db_part,
                x2.stride(0), dy2.stride(0), ds2.stride(0), n, m, n, rows_per_program)

    # the warm-up compiles what the launch runs: the fp32 partials (fresh, so aligned, buffers) stand in as a
    # dtype, and the kernel does not specialize on rows_per_program
    key = (tuple(meta.items()), x2.dtype, dy2.dtype, ds2.dtype, w.dtype, dx.dtype, n % 16 == 0)
    resident = resident_programs(_layer_norm_bwd_kernel, args(torch.float32, torch.float32, 0), meta, xn.device,
                                 key)
    g, rows_per_program = split_rows(m, cfg["BLOCK_M"], resident, min_rows=MIN_ROWS_PER_PROGRAM)
    dw_part = new_buffer((g, n), torch.float32, xn.device)  # (G, N) dweight partials
    db_part = new_buffer((g, n), torch.float32, xn.device)  # (G, N) dbias partials
    _layer_norm_bwd_kernel[(g,)](*args(dw_part, db_part, rows_per_program), **meta)
    dw = dw_part.sum(0) if weight is not None else None  # (N,) float32
    db = db_part.sum(0) if has_bias else None
    return dx, dr, dw, db


# -------------------------------------------------------------------------------------- custom ops
# torch.library ops, so torch.compile(fullgraph=True) keeps each kernel as one opaque call with a known
# output (the fake implementations) and autograd knows the backward (register_autograd below).


@torch.library.custom_op("gpt_triton::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): the normalized x (x's shape, ``out_dtype``), and each row's float32 statistics."""
    y, _, mean, rstd = _layer_norm_fwd(x, weight, bias, eps, out_dtype)
    return y, mean, rstd


@torch.library.custom_op("gpt_triton::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, y, mean, rstd): s = x + residual (promoted dtype), y its norm in ``out_dtype``, row statistics."""
    y, s, mean, rstd = _layer_norm_fwd(x, weight, bias, eps, out_dtype, residual=residual)
    return s, y, mean, rstd


@torch.library.custom_op("gpt_triton::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, xn: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                            rstd: torch.Tensor, ds: torch.Tensor | None, bias_dtype: torch.dtype | None,
                            dx_dtype: torch.dtype, dr_dtype: torch.dtype | None) -> list[torch.Tensor]:
    """[dx, dr if dr_dtype, dweight if weight, dbias if bias_dtype]: the input gradient in ``dx_dtype`` (and
    again in ``dr_dtype`` for a residual of another dtype), the parameters' summed in float32, then cast."""
    dx, dr, dw, db = _layer_norm_bwd(dy, xn, weight, bias_dtype is not None, mean, rstd, dx_dtype, ds=ds,
                                     dr_dtype=dr_dtype)
    out = [dx] + ([dr] if dr is not None else [])
    if dw is not None:
        out.append(dw.to(weight.dtype))
    if db is not None:
        out.append(db.to(bias_dtype))
    return out


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    m = math.prod(x.shape[:-1])
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32))


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    m = math.prod(x.shape[:-1])
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32))


@_layer_norm_backward_op.register_fake
def _(dy, xn, weight, mean, rstd, ds, bias_dtype, dx_dtype, dr_dtype):
    n = xn.shape[-1]
    out = [xn.new_empty(xn.shape, dtype=dx_dtype)]
    if dr_dtype is not None:
        out.append(xn.new_empty(xn.shape, dtype=dr_dtype))
    if weight is not None:
        out.append(xn.new_empty((n,), dtype=weight.dtype))
    if bias_dtype is not None:
        out.append(xn.new_empty((n,), dtype=bias_dtype))
    return out


def _param_grads(ctx, grads: list, weight_index: int):
    """(dweight, dbias) from the tail of layer_norm_backward's list, None where not wanted."""
    dw = grads.pop(0) if ctx.has_weight else None
    db = grads.pop(0) if ctx.bias_dtype is not None else None
    return (dw if ctx.needs_input_grad[weight_index] else None,
            db if ctx.needs_input_grad[weight_index + 1] else None)


def _save_params(ctx, weight, bias):
    ctx.has_weight = weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    _save_params(ctx, weight, bias)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_vjp(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grads = _layer_norm_backward_op(dy, x, weight, mean, rstd, None, ctx.bias_dtype, x.dtype, None)
    dx = grads.pop(0)
    return (dx, *_param_grads(ctx, grads, 1), None, None)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    _save_params(ctx, weight, bias)
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # a None gradient (an unused output) costs no pass over memory


def _add_layer_norm_vjp(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    if dy is None:  # only the sum was used: d(x + residual) passes straight through, in each input's dtype
        return ds.to(x_dtype), ds.to(r_dtype), None, None, None, None
    grads = _layer_norm_backward_op(dy, s, weight, mean, rstd, ds, ctx.bias_dtype, x_dtype,
                                    r_dtype if r_dtype != x_dtype else None)
    dx = grads.pop(0)
    dr = grads.pop(0) if r_dtype != x_dtype else dx  # x and residual get the same gradient, as torch's add
    return (dx, dr, *_param_grads(ctx, grads, 2), None, None)


_layer_norm_op.register_autograd(_layer_norm_vjp, setup_context=_layer_norm_setup)
_add_layer_norm_op.register_autograd(_add_layer_norm_vjp, setup_context=_add_layer_norm_setup)


# ---------------------------------------------------------------------------------- functional API


def _check_inputs(op: str, x, weight, bias, residual=None) -> None:
    """Raise a clear error for inputs the kernels do not take."""
    check_tensor(op, "input", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: input must have at least one dimension")
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"{op}: width {n} exceeds the Triton kernel's one-block limit of {MAX_N} "
                         "(a whole row lives in registers); use gpt_kernels.use_backend('torch') for wider rows")
    if residual is not None:
        check_tensor(op, "residual", residual, like=x)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} must equal the input's "
                             f"{tuple(x.shape)} (no broadcasting)")
    check_vector(op, "weight", weight, n, x)
    check_vector(op, "bias", bias, n, x)


def _check_normalized_shape(input, normalized_shape) -> None:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"layer_norm: the Triton kernel normalizes over the last dimension only, so "
                         f"normalized_shape must be (input.shape[-1],); got {shape}. Use "
                         "gpt_kernels.use_backend('torch') to normalize over several dimensions")
    if input.dim() == 0 or shape[0] != input.shape[-1]:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not match the input's last dimension "
                         f"(input shape {tuple(input.shape)})")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` over the last dimension, on the selected backend.

    Under autocast the output is in autocast's dtype (what the next matmul reads); see :mod:`gpt_kernels.autocast`.
    """
    check_same_device("layer_norm", input=input, weight=weight, bias=bias)
    impl = select(input)
    if impl == "torch":
        return F.layer_norm(input, normalized_shape, weight, bias, eps).to(matmul_dtype(input))
    if impl == "reference":
        return reference.layer_norm(input, normalized_shape, weight, bias, eps).to(matmul_dtype(input))
    _check_inputs("layer_norm", input, weight, bias)
    _check_normalized_shape(input, normalized_shape)
    return _layer_norm_op(input, weight, bias, float(eps), matmul_dtype(input))[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns ``(x + residual, layer_norm(x + residual))``: the new residual stream and its norm.

    The sum has the dtype ``x + residual`` has (the fp32 residual stream stays fp32 beside a bf16 branch);
    the norm is in autocast's dtype under autocast, else in the sum's.
    """
    check_same_device("add_layer_norm", x=x, residual=residual, weight=weight, bias=bias)
    impl = select(x, residual)
    if impl == "torch":
        s = x + residual
        return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps).to(matmul_dtype(s))
    if impl == "reference":
        s, y = reference.add_layer_norm(x, residual, weight, bias, eps)
        return s, y.to(matmul_dtype(s))
    _check_inputs("add_layer_norm", x, weight, bias, residual)
    out_dtype = autocast_dtype(x) or torch.promote_types(x.dtype, residual.dtype)
    s, y, _, _ = _add_layer_norm_op(x, residual, weight, bias, float(eps), out_dtype)
    return s, y


# ------------------------------------------------------------------------------------- compile check


# The dtypes the launchers run with, as the model and the benchmarks call them: name -> the pointer types of
# the forward and the backward (an unused pointer gets what the launcher passes in its place: x or y, dy or
# dx), and whether the forward adds a residual / the backward adds the sum's gradient (with a separate
# residual gradient when the dtypes differ). fp16 is compiled as bf16 (compile_check.stand_in).
DTYPE_VARIANTS = {
    # layer_norm on 16-bit rows: the benchmarks, bf16 generation
    "bf16": ({"X": "bf16", "R": "bf16", "S": "bf16", "Y": "bf16", "W": "bf16", "B": "bf16"}, False,
             {"X": "bf16", "W": "bf16", "DY": "bf16", "DS": "bf16", "DX": "bf16", "DR": "bf16"}, False),
    "bf16 +res": ({"X": "bf16", "R": "bf16", "S": "bf16", "Y": "bf16", "W": "bf16", "B": "bf16"}, True,
                  {"X": "bf16", "W": "bf16", "DY": "bf16", "DS": "bf16", "DX": "bf16", "DR": "bf16"}, True),
    # autocast: ln1 and the final norm read the fp32 residual stream and give bf16 to the next matmul
    "amp": ({"X": "fp32", "R": "fp32", "S": "bf16", "Y": "bf16", "W": "fp32", "B": "fp32"}, False,
            {"X": "fp32", "W": "fp32", "DY": "bf16", "DS": "bf16", "DX": "fp32", "DR": "fp32"}, False),
    # autocast: add_layer_norm of a bf16 branch into the fp32 residual stream
    "amp +res": ({"X": "bf16", "R": "fp32", "S": "fp32", "Y": "bf16", "W": "fp32", "B": "fp32"}, True,
                 {"X": "fp32", "W": "fp32", "DY": "bf16", "DS": "fp32", "DX": "bf16", "DR": "fp32"}, True),
    # float32 training and generation
    "fp32": ({"X": "fp32", "R": "fp32", "S": "fp32", "Y": "fp32", "W": "fp32", "B": "fp32"}, False,
             {"X": "fp32", "W": "fp32", "DY": "fp32", "DS": "fp32", "DX": "fp32", "DR": "fp32"}, False),
    "fp32 +res": ({"X": "fp32", "R": "fp32", "S": "fp32", "Y": "fp32", "W": "fp32", "B": "fp32"}, True,
                  {"X": "fp32", "W": "fp32", "DY": "fp32", "DS": "fp32", "DX": "fp32", "DR": "fp32"}, True),
}


def compile_cases():
    """Every forward/backward configuration the launchers pick for the compile check's widths (the configs
    depend on the width only), in every dtype variant of :data:`DTYPE_VARIANTS`."""
    from .compile_check import ARCHS, BENCH_WIDTHS, MODEL_WIDTHS, PRIMARY, CompileCase

    fwd_sig = {"Mean": "*fp32", "Rstd": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_out": "i32",
               "M": "i32", "N": "i32", "eps": "fp32"}
    bwd_sig = {"Mean": "*fp32", "Rstd": "*fp32", "DW_PART": "*fp32", "DB_PART": "*fp32", "stride_x": "i32",
               "stride_dy": "i32", "stride_ds": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
               "rows_per_program": "i32"}

    def configs(pick, widths):  # config -> the widths that use it, e.g. "768,1024"
        seen = {}
        for n in widths:
            key = tuple(pick(n).items())
            seen[key] = f"{seen[key]},{n}" if key in seen else str(n)
        return seen

    cases = []
    for which, kernel, base, pick in (("fwd", "_layer_norm_fwd_kernel", fwd_sig, fwd_config),
                                      ("bwd", "_layer_norm_bwd_kernel", bwd_sig, bwd_config)):
        for name, (fwd_ptrs, residual, bwd_ptrs, ds) in DTYPE_VARIANTS.items():
            # the model at its widths in every dtype; the benchmarks, in bf16, at theirs
            widths = sorted(set(MODEL_WIDTHS + (BENCH_WIDTHS if name.startswith("bf16") else ())))
            ptrs = fwd_ptrs if which == "fwd" else bwd_ptrs
            sig = {**{k: f"*{t}" for k, t in ptrs.items()}, **base}
            if which == "fwd":
                flags = {"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True}
            else:  # a separate residual gradient where the residual's and the input's dtypes differ
                flags = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_DS": ds, "HAS_DR": ds and ptrs["DR"] != ptrs["DX"]}
            # as the JIT specializes them at these widths: aligned pointers, strides and widths that are
            # multiples of 16 (rows M and rows_per_program can be anything)
            aligned = [k for k in sig if k not in ("M", "rows_per_program", "eps")]
            for cfg_items, n in configs(pick, widths).items():
                cfg = dict(cfg_items)
                warps = cfg.pop("num_warps")
                # every target for what a GPU runs by default (16-bit and autocast at GPT-2's widths)
                default = "fp32" not in name and int(n.split(",")[0]) >= 768
                label = f"N={n} {name if which == 'fwd' else name.replace('+res', '+ds')}"
                cases.append(CompileCase("gpt_kernels.norm", kernel, sig, {**cfg, **flags}, num_warps=warps,
                                         label=label, extra={"divisible_by_16": aligned},
                                         archs=ARCHS if default else PRIMARY))
    return cases
