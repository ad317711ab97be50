"""LayerNorm and residual-add + LayerNorm over the last dimension, as Triton kernels.

Forward: each program normalizes a tile of ``BLOCK_M`` whole rows held in registers (``BLOCK_N`` =
the width rounded up to a power of two, masked), two-pass mean and variance in float32, and keeps the
float32 mean and 1/std of every row for the backward. ``add_layer_norm`` adds the residual in the same
pass and writes the sum (the new residual stream) beside the norm.

Backward: dx = rstd * (w*dy - mean(w*dy) - xhat * mean(xhat * w*dy)) per row (plus the gradient that
arrives on the sum output for ``add_layer_norm``). The weight and bias gradients are sums over rows: each
program walks its own contiguous group of rows, accumulates ``dy * xhat`` and ``dy`` in float32
registers and writes one row of a (G, N) float32 partial buffer; ``partials.sum(1)`` finishes the sum.
No atomics, so the result is deterministic.

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
from .backend import select

MAX_N = 8192  # widest row one program holds in registers (backward: x, dy, w and two sums, no spills)
GPT2_WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400)  # the widths the compile check covers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tests set this to fill every buffer the launchers allocate with NaN, so an element a kernel forgets
# to write fails the comparison instead of passing on leftover memory.
POISON_OUTPUTS = False


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input rows, (M, N), row stride stride_x, unit column stride
    R,  # residual rows, (M, N), row stride stride_r (read only when HAS_RESIDUAL)
    S,  # out: X + R in X's dtype, (M, N), row stride stride_out (written only when HAS_RESIDUAL)
    Y,  # out: the normalized rows, (M, N), row stride stride_out
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


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # the normalized rows as the forward saw them (x, or the sum for add_layer_norm), (M, N), stride_x
    W,  # weight, (N,) (read only when HAS_WEIGHT)
    Mean,  # mean of each row from the forward, (M,) float32
    Rstd,  # 1 / std of each row from the forward, (M,) float32
    DY,  # gradient of the norm's output, (M, N), row stride stride_dy
    DS,  # gradient arriving on add_layer_norm's sum output, (M, N), row stride stride_ds (when HAS_DS)
    DX,  # out: gradient of the input (and of the residual), (M, N), row stride stride_dx
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
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of dy * xhat over this program's rows
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of dy
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
        c1 = tl.sum(xhat * wdy, axis=1) / N  # (BLOCK_M,) mean of xhat * w*dy
        c2 = tl.sum(wdy, axis=1) / N  # (BLOCK_M,) mean of w*dy
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # (BLOCK_M, BLOCK_N)
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * N + cols, dw, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, db, mask=col_mask)


# ------------------------------------------------------------------------------------------ launchers


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


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
    """Block sizes and warps of the backward: as the forward but about 16 values per thread per tensor,
    since x, dy, the weight and the two running sums all live in registers."""
    block_n = next_pow2(n)
    num_warps = min(16, max(1, block_n // 256))
    block_m = min(64, max(1, 16 * 32 * num_warps // block_n))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


_RESIDENT: dict = {}  # (kernel, device, config key) -> how many of its programs one SM holds at once


def resident_programs(kernel, args, meta: dict, device: torch.device, key) -> int:
    """How many programs of ``kernel`` (launched with ``args`` and ``meta``) the whole GPU runs at once.

    Per SM: the fewest of what its registers, threads and shared memory allow, read from the compiled
    kernel (``kernel.warmup`` compiles without launching) and cached per ``key``. A grid of exactly this
    many programs finishes in one wave; a few more would leave most SMs idle for a second one. Under the
    CPU interpreter: 4, so the tests run several programs with several loop steps each.
    """
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    num_warps = meta["num_warps"]
    cache_key = (getattr(kernel, "__name__", id(kernel)), index, key)
    if cache_key not in _RESIDENT:
        props = torch.cuda.get_device_properties(index)
        threads = getattr(props, "max_threads_per_multi_processor", 2048)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **meta)
            compiled._init_handles()  # loads the binary, which fills in n_regs
            regs_per_warp = -(-max(int(compiled.n_regs), 1) * 32 // 256) * 256  # allocated in 256s per warp
            by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // num_warps
            smem = int(compiled.metadata.shared)
            by_smem = getattr(props, "shared_memory_per_multiprocessor", 0) // smem if smem else 32
            fit = min(by_regs, by_smem or 32, threads // (32 * num_warps), 32)
        except Exception:  # an older/newer Triton without these fields: assume ~64 registers a thread
            fit = threads // (64 * num_warps)
        _RESIDENT[cache_key] = props.multi_processor_count * max(1, fit)
    return _RESIDENT[cache_key]


def _split_rows(m: int, block_m: int, resident: int) -> tuple[int, int]:
    """(G, rows per program) for a backward whose programs each walk a contiguous group of rows.

    At most one wave of programs (``resident``), and at least 4 row tiles per program so the (G, N)
    float32 partial sums stay small next to the rows themselves. Rows per program is a multiple of
    ``block_m``, so only the last program's last tile is ragged.
    """
    tiles = triton.cdiv(m, block_m)
    g = max(1, min(tiles, resident, triton.cdiv(tiles, 4)))
    rows_per_program = triton.cdiv(tiles, g) * block_m
    return triton.cdiv(m, rows_per_program), rows_per_program


def _new(shape, dtype, device) -> torch.Tensor:
    return new_buffer(shape, dtype, device, poison=POISON_OUTPUTS)


def new_buffer(shape, dtype, device, poison: bool = False) -> torch.Tensor:
    """``torch.empty``, or filled with NaN when ``poison`` (the tests' check for unwritten elements)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if poison else t


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (M, n) rows with unit column stride: a view when the layout allows, else a copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n)  # (M, N); not -1, which is ambiguous when N == 0
    return t2 if t2.stride(1) == 1 or t2.numel() == 0 else t2.contiguous()


def _check_inputs(name: str, x, weight, bias, residual=None) -> int:
    """Raise a clear error for inputs the kernels do not take; returns the width N."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: the Triton kernel takes float16, bfloat16 or float32 input, got {x.dtype}; "
                        "use kernels.use_backend('torch') for other dtypes")
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least one dimension")
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"{name}: width {n} exceeds the Triton kernel's one-block limit of {MAX_N} "
                         "(a whole row lives in registers); use kernels.use_backend('torch') for wider rows")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{name}: residual must be a torch.Tensor, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual shape {tuple(residual.shape)} must equal the input's "
                             f"{tuple(x.shape)} (no broadcasting)")
        if residual.dtype != x.dtype:
            raise TypeError(f"{name}: residual dtype {residual.dtype} must equal the input's {x.dtype}; "
                            "cast one of them")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device} but the input is on {x.device}")
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: {pname} must be a torch.Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != (n,):
            raise ValueError(f"{name}: {pname} must have shape ({n},) to match the input's last dimension, "
                             f"got {tuple(p.shape)}")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{name}: {pname} must be float16, bfloat16 or float32, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name}: {pname} is on {p.device} but the input is on {x.device}")
    return n


def _layer_norm_fwd(x, weight, bias, eps, residual=None):
    """Launch the forward. Returns ``(y, s, mean, rstd, rows)``: y and s (the sum, None without a
    residual) shaped like x; mean and rstd (M,) float32; the (M, N) rows the backward rereads."""
    n = _check_inputs("layer_norm" if residual is None else "add_layer_norm", x, weight, bias, residual)
    x2 = _rows(x, n)  # (M, N)
    m = x2.shape[0]
    y = _new(x.shape, x.dtype, x.device)
    s = _new(x.shape, x.dtype, x.device) if residual is not None else None
    mean = _new((m,), torch.float32, x.device)
    rstd = _new((m,), torch.float32, x.device)
    if m * n == 0:
        return y, s, mean, rstd, _rows(s if s is not None else x, n)
    r2 = _rows(residual, n) if residual is not None else x2  # (M, N)
    w = weight.contiguous() if weight is not None else x2  # (N,) (x2 stands in for an unused pointer)
    b = bias.contiguous() if bias is not None else x2
    cfg = fwd_config(n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _layer_norm_fwd_kernel[grid](
        x2, r2, s if s is not None else y, y, w, b, mean, rstd,
        x2.stride(0), r2.stride(0), n, m, n, float(eps),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, num_warps=cfg["num_warps"])
    saved = s.view(m, n) if s is not None else x2  # (M, N) what the norm normalized
    return y, s, mean, rstd, saved


def _layer_norm_bwd(dy, x2, weight, has_bias, mean, rstd, ds=None):
    """Launch the backward. ``x2`` (M, N) rows the forward normalized; ``dy`` and ``ds`` (optional)
    shaped like the forward's input. Returns ``(dx, dweight, dbias)``: dx in x2's dtype and dy's shape,
    dweight/dbias (N,) float32 (None when the forward had no weight / bias)."""
    m, n = x2.shape
    dx = _new(dy.shape, x2.dtype, x2.device)
    if m * n == 0:  # no rows: the sums over rows are zero, as torch gives
        dw = torch.zeros(n, dtype=torch.float32, device=x2.device) if weight is not None else None
        db = torch.zeros(n, dtype=torch.float32, device=x2.device) if has_bias else None
        return dx, dw, db
    dy2 = _rows(dy, n)  # (M, N)
    ds2 = _rows(ds, n) if ds is not None else dy2  # (M, N)
    w = weight.contiguous() if weight is not None else x2
    cfg = bwd_config(n)
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_WEIGHT=weight is not None,
                HAS_BIAS=has_bias, HAS_DS=ds is not None, num_warps=cfg["num_warps"])

    def args(part, rows_per_program):
        return (x2, w, mean, rstd, dy2, ds2, dx, part[0], part[1],
                x2.stride(0), dy2.stride(0), ds2.stride(0), n, m, n, rows_per_program)

    key = (tuple(meta.items()), x2.dtype, dy2.dtype, ds2.dtype, w.dtype, n % 16 == 0)
    resident = resident_programs(_layer_norm_bwd_kernel, args((mean, mean), 3), meta, x2.device, key)
    g, rows_per_program = _split_rows(m, cfg["BLOCK_M"], resident)
    part = _new((2, g, n), torch.float32, x2.device)  # [0]: dweight partials, [1]: dbias partials
    _layer_norm_bwd_kernel[(g,)](*args(part, rows_per_program), **meta)
    dw = db = None
    if weight is not None and has_bias:
        sums = part.sum(1)  # (2, N) float32, one reduction for both
        dw, db = sums[0], sums[1]
    elif weight is not None:
        dw = part[0].sum(0)
    elif has_bias:
        db = part[1].sum(0)
    return dx, dw, db


# ------------------------------------------------------------------------------------ autograd glue


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, _, mean, rstd, x2 = _layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_bwd(dy, x2, weight, ctx.has_bias, mean, rstd)
        dw = dw.to(weight.dtype) if dw is not None and ctx.needs_input_grad[1] else None
        db = db.to(ctx.bias_dtype) if db is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class _AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, s, mean, rstd, s2 = _layer_norm_fwd(x, weight, bias, eps, residual=residual)
        ctx.save_for_backward(s2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)  # a None gradient (an unused output) costs no pass over memory
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s2, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used: d(x + residual) passes straight through
            return ds, ds, None, None, None
        dx, dw, db = _layer_norm_bwd(dy, s2, weight, ctx.has_bias, mean, rstd, ds=ds)
        dw = dw.to(weight.dtype) if dw is not None and ctx.needs_input_grad[2] else None
        db = db.to(ctx.bias_dtype) if db is not None and ctx.needs_input_grad[3] else None
        return dx, dx, dw, db, None  # x and residual get the same gradient, as torch's add does


# ---------------------------------------------------------------------------------- functional API


def _check_normalized_shape(input, normalized_shape) -> None:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"layer_norm: the Triton kernel normalizes over the last dimension only, so "
                         f"normalized_shape must be (input.shape[-1],); got {shape}. Use "
                         "kernels.use_backend('torch') to normalize over several dimensions")
    if input.dim() == 0 or shape[0] != input.shape[-1]:
        raise ValueError(f"layer_norm: normalized_shape {shape} does not match the input's last dimension "
                         f"(input shape {tuple(input.shape)})")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` over the last dimension, on the selected backend."""
    impl = select(input)
    if impl == "torch":
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if impl == "reference":
        return reference.layer_norm(input, normalized_shape, weight, bias, eps)
    _check_normalized_shape(input, normalized_shape)
    return _LayerNormFn.apply(input, weight, bias, eps)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns ``(x + residual, layer_norm(x + residual))``: the new residual stream and its norm."""
    impl = select(x, residual)
    if impl == "torch":
        s = x + residual
        return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    if impl == "reference":
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    return _AddLayerNormFn.apply(x, residual, weight, bias, eps)


# ------------------------------------------------------------------------------------- compile check


def compile_cases():
    """Every forward/backward configuration the launchers pick for GPT-2's widths (the configs depend
    on the width only): bf16 for each, with and without the residual; float32 at the widest block."""
    from .compile_check import CompileCase

    fwd_sig = {"X": "", "R": "", "S": "", "Y": "", "W": "", "B": "", "Mean": "*fp32", "Rstd": "*fp32",
               "stride_x": "i32", "stride_r": "i32", "stride_out": "i32", "M": "i32", "N": "i32", "eps": "fp32"}
    bwd_sig = {"X": "", "W": "", "Mean": "*fp32", "Rstd": "*fp32", "DY": "", "DS": "", "DX": "",
               "DW_PART": "*fp32", "DB_PART": "*fp32", "stride_x": "i32", "stride_dy": "i32", "stride_ds": "i32",
               "stride_dx": "i32", "M": "i32", "N": "i32", "rows_per_program": "i32"}

    def sig(base, ty):
        return {k: (v or f"*{ty}") for k, v in base.items()}

    # as the JIT specializes them at GPT-2's widths: aligned pointers, strides and widths that are
    # multiples of 16 (rows M and rows_per_program can be anything)
    def aligned(base):
        return {"divisible_by_16": [k for k in base if k not in ("M", "rows_per_program", "eps")]}

    cases = []
    widest = next_pow2(max(GPT2_WIDTHS))
    fwd_seen, bwd_seen = {}, {}  # config -> the widths that use it, e.g. "768,1024"
    for n in GPT2_WIDTHS:
        key = tuple(fwd_config(n).items())
        fwd_seen[key] = f"{fwd_seen[key]},{n}" if key in fwd_seen else str(n)
        key = tuple(bwd_config(n).items())
        bwd_seen[key] = f"{bwd_seen[key]},{n}" if key in bwd_seen else str(n)
    for cfg_items, n in fwd_seen.items():
        cfg = dict(cfg_items)
        warps = cfg.pop("num_warps")
        for ty in ("bf16", "fp32") if cfg["BLOCK_N"] == widest else ("bf16",):
            for residual in (False, True):
                cases.append(CompileCase(
                    "kernels.norm", "_layer_norm_fwd_kernel", sig(fwd_sig, ty),
                    {**cfg, "HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True},
                    num_warps=warps, label=f"N={n} {ty}{' +res' if residual else ''}", extra=aligned(fwd_sig)))
    for cfg_items, n in bwd_seen.items():
        cfg = dict(cfg_items)
        warps = cfg.pop("num_warps")
        for ty in ("bf16", "fp32") if cfg["BLOCK_N"] == widest else ("bf16",):
            for has_ds in (False, True):
                cases.append(CompileCase(
                    "kernels.norm", "_layer_norm_bwd_kernel", sig(bwd_sig, ty),
                    {**cfg, "HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_DS": has_ds},
                    num_warps=warps, label=f"N={n} {ty}{' +ds' if has_ds else ''}", extra=aligned(bwd_sig)))
    return cases
