"""Cross-entropy over a large vocabulary, and the output projection + cross-entropy in chunks of tokens.

At GPT-2 scale the loss holds most of the training memory: 16 x 1024 tokens x 50,257 logits is 3.3 GB in
fp32, and PyTorch's ``F.cross_entropy`` keeps the log-probabilities (same size) for its backward and
builds two more tensors of that size there. Two things here cut that down:

``cross_entropy(logits, target)``
    One Triton program per row. Pass 1 walks the row in BLOCK_V-wide chunks keeping a running max and a
    running sum of exp (the online log-sum-exp), so V need not be a power of two and any V fits. Pass 2
    walks the row again and writes the gradient ``softmax - onehot`` (label smoothing: ``- eps / V``
    on every column and ``(1 - eps)`` on the one-hot), already scaled by ``1 / n_valid`` for the mean
    and zero on ignored rows, into a SEPARATE buffer: never into the logits, whose version counter
    autograd would not see bumped. The backward only multiplies that buffer by the incoming gradient.
    Loss rows are float32 and reduced by ``torch.sum`` (deterministic, no atomics).

``linear_cross_entropy(hidden, weight, target)``
    ``cross_entropy(hidden @ weight.T + bias, target)`` without ever holding the (N, V) logits: the tokens
    are taken ``chunk_size`` rows at a time; per chunk the logits come from a cuBLAS matmul, the Triton
    kernel turns them into loss rows and, IN PLACE in that temporary (our own buffer, not an input), into
    their gradient, and that gradient is consumed at once: ``d_hidden[chunk] = dlogits @ weight``,
    ``d_weight += dlogits.T @ hidden[chunk]``, ``d_bias += dlogits.sum(0)``. All of it runs in the
    forward; the backward scales the saved ``d_hidden`` / ``d_weight`` / ``d_bias`` by the incoming
    gradient. Peak extra memory is one chunk of logits plus the gradients themselves.

Choices, and why:

- The gradient buffer of ``cross_entropy`` is in the logits' dtype (fp16/bf16/fp32), computed in fp32 and
  rounded once: that is the dtype autograd hands back for the logits anyway, and it halves the buffer and
  its write traffic against fp32 for half-precision logits.
- ``d_weight`` is accumulated in the weight's dtype with ``addmm_`` (each chunk's product accumulates in
  fp32 inside cuBLAS; the running sum is rounded to the weight dtype once per chunk, i.e. N / chunk_size
  times). An fp32 accumulator for bf16 weights would need either a (V, C) temporary per chunk plus an
  fp32 add (about a third more time per chunk on an H100) or the ``out_dtype`` GEMM overloads, which exist
  only on CUDA and in recent torch. With fp32 weights (mixed precision with fp32 masters cast outside)
  the accumulation is fp32.
- Targets are checked on the host: one small reduction over the N targets and ONE device-to-host sync of
  two integers per call (the number of out-of-range targets and the number of valid ones, which the mean
  needs anyway). Against the kernel's N x V reads this is noise, but it is a sync: it stops the CPU from
  running ahead of the GPU at the loss, once per step.
- Only 2-D (N, V) logits with (N,) targets (and 2-D (N, C) hidden): ``F.cross_entropy`` reads a 3-D
  input as (N, C, d1), class dimension second, so accepting (B, T, V) here would silently differ from the
  torch path. Flatten first: ``logits.view(-1, V)``, ``target.view(-1)``.
- ``reduction="none"`` in the chunked path cannot fold per-row gradient scales into the accumulated
  ``d_weight``, so there the forward computes only the loss rows and the backward recomputes the chunks
  (one matmul more) with the kernel scaling each row by its incoming gradient.
- Class ``weight`` in ``cross_entropy`` is not supported by the kernel: with it, every backend uses torch.
- Where every target is ``ignore_index`` the mean is 0, not torch's 0/0 = NaN, on every backend (the
  torch path is guarded the same way; see ``kernels.reference.cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .backend import select
from .compile_check import CompileCase

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK_V = 4096  # widest vocabulary chunk one program loads at a time: 16 fp32 per thread at 8 warps
# bytes of logits one chunk of linear_cross_entropy may hold: ~1280 tokens x 50,257 in bf16. Small enough
# that the chunk is a few % of what projection + F.cross_entropy holds at 4K tokens, large enough that
# each chunk's matmuls run near peak and d_weight is rounded only N / chunk_size times.
_CHUNK_BYTES = 128 * 2**20


# ---------------------------------------------------------------------------------------------- kernel


@triton.jit
def _cross_entropy_kernel(
    X,  # logits, (N, V), row stride stride_x, unit column stride; fp32 / fp16 / bf16
    stride_x,  # elements between consecutive rows of X
    G,  # gradient out, (N, V), row stride stride_g, X's dtype; may BE X (linear CE's own temporary)
    stride_g,  # elements between consecutive rows of G
    T,  # targets, (N,), int32 / int64 class ids in [0, V) or ignore_index
    LOSS,  # loss out, (N,), fp32: the row's loss, 0 on ignored rows
    ROW_SCALE,  # per-row gradient factor, (N,), fp32; read only if HAS_ROW_SCALE
    V,  # vocabulary size: columns of X and G
    ignore_index,  # target value whose row counts zero and gets a zero gradient
    grad_scale,  # fp32 factor on every gradient: 1 / n_valid for the mean, 1 otherwise
    smoothing,  # fp32 label smoothing eps in [0, 1]
    BLOCK_V: tl.constexpr,  # columns per chunk (power of two); V need not be a multiple
    HAS_SMOOTHING: tl.constexpr,  # eps > 0: also sum the row for the uniform part of the target
    WRITE_GRAD: tl.constexpr,  # run pass 2 and write the gradient into G
    HAS_ROW_SCALE: tl.constexpr,  # multiply row i's gradient by ROW_SCALE[i] as well
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t = tl.load(T + row)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)  # an ignored row still reads a real column
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)

    # pass 1: online log-sum-exp over the row; m = running max, s = sum exp(x - m)
    m = -float("inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=-float("inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)
    x_t = tl.load(x_row + t_safe).to(tl.float32)
    loss = lse - x_t
    if HAS_SMOOTHING:
        # (1 - eps) * (lse - x_t) + eps * mean_j (lse - x_j)
        loss = (1.0 - smoothing) * loss + smoothing * (lse - sum_x / V)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    # pass 2: d loss / d x_j = (softmax_j - (1 - eps) [j == t] - eps / V) * scale
    if WRITE_GRAD:
        scale = grad_scale
        if HAS_ROW_SCALE:
            scale = scale * tl.load(ROW_SCALE + row)
        hit = 1.0
        uniform = 0.0
        if HAS_SMOOTHING:
            hit = 1.0 - smoothing
            uniform = smoothing / V
        g_row = G + row * stride_g
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_V,)
            g = tl.exp(x - lse) - tl.where(offs == t_safe, hit, 0.0) - uniform
            g = tl.where(valid, g * scale, 0.0)  # exact zeros on ignored rows, whatever the logits
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- launcher


def _launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits: chunks up to 4096 wide, 16 elements per thread at most."""
    block_v = min(triton.next_power_of_2(max(V, 1)), _MAX_BLOCK_V)
    num_warps = max(1, min(8, block_v // 512))  # 8 -> 1, 1024 -> 2, 2048 -> 4, 4096 -> 8
    return block_v, num_warps


def _check_common(reduction, label_smoothing, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target(target: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class ids, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer class ids (int64 or int32), got {target.dtype}; "
                        f"class-probability targets are not supported by the Triton path (use GPT_KERNELS=torch)")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},) to match {what}, got {tuple(target.shape)}; "
                         f"flatten (B, T) targets with target.view(-1)")


def _count_targets(target: torch.Tensor, V: int, ignore_index: int) -> int:
    """Number of targets that are not ignore_index; raises if any is outside [0, V).

    One device-to-host sync of two integers (see the module docstring).
    """
    keep = target != ignore_index  # (N,)
    bad = keep & ((target < 0) | (target >= V))  # (N,)
    n_bad, n_valid = torch.stack([bad.sum(), keep.sum()]).tolist()
    if n_bad:
        first = target[bad][0].item()
        raise ValueError(f"{n_bad} target(s) outside [0, {V}) (e.g. {first}) that are not ignore_index "
                         f"({ignore_index}): targets must be class ids below the vocabulary size")
    return n_valid


def _cross_entropy_rows(x, target, ignore_index, label_smoothing, grad_scale, grad=None, loss=None,
                        row_scale=None):
    """Launch the kernel on contiguous-row (n, V) ``x``: fills ``loss`` (n,) fp32, and ``grad`` if given.

    ``grad`` may be ``x`` itself (overwriting the logits with their gradient) only for buffers we own.
    """
    n, V = x.shape
    if loss is None:
        loss = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return loss
    block_v, num_warps = _launch_config(V)
    write_grad = grad is not None
    g = grad if write_grad else x  # never written when not WRITE_GRAD
    _cross_entropy_kernel[(n,)](
        x, x.stride(0), g, g.stride(0), target, loss,
        row_scale if row_scale is not None else loss,
        V, ignore_index, float(grad_scale), float(label_smoothing),
        BLOCK_V=block_v, HAS_SMOOTHING=label_smoothing > 0.0, WRITE_GRAD=write_grad,
        HAS_ROW_SCALE=row_scale is not None, num_warps=num_warps)
    return loss


def _reduce(loss_rows: torch.Tensor, reduction: str, n_valid: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 loss rows -> the returned loss, in ``dtype`` (the mean of zero valid rows is 0)."""
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()  # fp32, deterministic
    if reduction == "mean":
        total = total / max(n_valid, 1)
    return total.to(dtype)


def _cross_entropy_forward(logits, target, ignore_index, reduction, label_smoothing, need_grad):
    """Checks, then the kernel. Returns (loss, grad buffer or None)."""
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy's Triton path takes (N, V) logits, got shape {tuple(logits.shape)}; "
                         f"flatten (B, T, V) logits with logits.view(-1, V) and targets with target.view(-1)")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    N, V = logits.shape
    if V == 0:
        raise ValueError("logits have no classes (V = 0)")
    _check_target(target, N, f"logits of shape {tuple(logits.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    n_valid = _count_targets(target, V, ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel needs unit column stride; any row stride is fine
    target = target.contiguous()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None  # (N, V)
    grad_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    loss_rows = _cross_entropy_rows(logits, target, ignore_index, label_smoothing, grad_scale, grad=grad)
    return _reduce(loss_rows, reduction, n_valid, logits.dtype), grad


# ------------------------------------------------------------------------------------------- autograd


class _CrossEntropy(torch.autograd.Function):
    """Loss of (N, V) logits; the gradient is made in the forward into its own buffer, scaled in backward."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, need_grad):
        loss, grad = _cross_entropy_forward(logits, target, ignore_index, reduction, label_smoothing, need_grad)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors  # (N, V), already d loss / d logits for a grad_output of 1
        if grad is None:
            raise RuntimeError("cross_entropy was run with logits that did not require grad, so no gradient "
                               "buffer was made")
        if ctx.reduction == "none":
            d_logits = grad * grad_output[:, None].to(grad.dtype)  # (N, V)
        else:
            d_logits = grad * grad_output.to(grad.dtype)  # (N, V) times a 0-d tensor
        return d_logits, None, None, None, None, None


def _chunked_linear_ce(hidden, weight, bias, target, ignore_index, label_smoothing, chunk, grad_scale,
                       need_h, need_w, need_b, loss_rows, row_scale=None):
    """One sweep over the tokens in chunks: loss rows into ``loss_rows`` and the requested gradients.

    hidden (N, C), weight (V, C), bias (V,) or None, target (N,), row_scale (N,) fp32 or None.
    Returns (d_hidden (N, C) or None, d_weight (V, C) or None, d_bias (V,) fp32 or None).
    """
    N, C = hidden.shape
    need_any = need_h or need_w or need_b
    d_hidden = torch.empty_like(hidden) if need_h else None  # (N, C)
    d_weight = torch.zeros_like(weight) if need_w else None  # (V, C), weight's dtype (see module doc)
    d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None  # (V,)
    w_t = weight.t()  # (C, V) view
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h_c = hidden[start:end]  # (n, C)
        if bias is not None:
            logits_c = torch.addmm(bias, h_c, w_t)  # (n, V)
        else:
            logits_c = torch.mm(h_c, w_t)  # (n, V)
        # the kernel turns logits_c into its own gradient in place: logits_c is our temporary, not an input
        _cross_entropy_rows(logits_c, target[start:end], ignore_index, label_smoothing, grad_scale,
                            grad=logits_c if need_any else None, loss=loss_rows[start:end],
                            row_scale=None if row_scale is None else row_scale[start:end])
        if need_h:
            torch.mm(logits_c, weight, out=d_hidden[start:end])  # (n, V) @ (V, C) -> (n, C)
        if need_w:
            d_weight.addmm_(logits_c.t(), h_c)  # (V, n) @ (n, C) -> (V, C)
        if need_b:
            d_bias += logits_c.sum(dim=0, dtype=torch.float32)  # (V,)
        del logits_c
    return d_hidden, d_weight, d_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Projection + loss in chunks of tokens; gradients made in the forward (mean/sum) or recomputed (none)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, chunk, n_valid,
                need_h, need_w, need_b):
        N = hidden.shape[0]
        loss_rows = torch.empty(N, device=hidden.device, dtype=torch.float32)  # (N,)
        ctx.reduction = reduction
        ctx.args = (ignore_index, label_smoothing, chunk)
        ctx.needs = (need_h, need_w, need_b)
        ctx.bias_dtype = None if bias is None else bias.dtype  # d_bias is accumulated in fp32
        if reduction == "none":
            # per-row incoming gradients cannot be folded into an accumulated d_weight: loss now, grads later
            _chunked_linear_ce(hidden, weight, bias, target, ignore_index, label_smoothing, chunk, 1.0,
                               False, False, False, loss_rows)
            ctx.save_for_backward(hidden, weight, bias, target)
        else:
            grad_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
            grads = _chunked_linear_ce(hidden, weight, bias, target, ignore_index, label_smoothing, chunk,
                                       grad_scale, need_h, need_w, need_b, loss_rows)
            ctx.save_for_backward(*grads)
        return _reduce(loss_rows, reduction, n_valid, hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        need_h, need_w, need_b = ctx.needs
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            ignore_index, label_smoothing, chunk = ctx.args
            scratch = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)  # (N,)
            d_hidden, d_weight, d_bias = _chunked_linear_ce(
                hidden, weight, bias, target, ignore_index, label_smoothing, chunk, 1.0, need_h, need_w, need_b,
                scratch, row_scale=grad_output.float().contiguous())
        else:
            d_hidden, d_weight, d_bias = ctx.saved_tensors
            g = grad_output  # 0-d
            d_hidden = None if d_hidden is None else d_hidden * g.to(d_hidden.dtype)
            d_weight = None if d_weight is None else d_weight * g.to(d_weight.dtype)
            d_bias = None if d_bias is None else d_bias * g.float()
        if d_bias is not None:
            d_bias = d_bias.to(ctx.bias_dtype)
        return d_hidden, d_weight, None, d_bias, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ functional


def _as_long(target):
    """int32 class ids as int64 for torch's losses and gather, which take only int64 (the kernel takes both)."""
    if isinstance(target, torch.Tensor) and target.dtype == torch.int32:
        return target.long()
    return target


def _torch_mean_guard(loss, target, weight, ignore_index, reduction):
    """Torch's mean over zero valid targets is 0/0 = NaN; make it 0 as the reference does (no sync)."""
    if reduction != "mean" or target.is_floating_point():
        return loss
    keep = target != ignore_index
    if weight is None:
        has_mass = keep.any()
    else:
        has_mass = (weight[torch.where(keep, target, torch.zeros_like(target))] * keep).sum() != 0
    return torch.where(has_mass, loss, torch.zeros_like(loss))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` for (N, V) logits and (N,) targets, on the selected backend.

    The Triton path takes 2-D logits only (flatten (B, T, V) first), int64/int32 targets, no class weight
    (with ``weight`` every backend runs torch). Where every target is ignored the mean is 0, not NaN.
    """
    impl = select(input)
    if impl != "triton":
        target = _as_long(target)
    if impl == "torch" or weight is not None:
        loss = F.cross_entropy(input, _as_long(target), weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
        return _torch_mean_guard(loss, target, weight, ignore_index, reduction)
    if impl == "reference":
        return reference.cross_entropy(input, target, ignore_index, reduction, label_smoothing)
    _check_common(reduction, label_smoothing, ignore_index)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    return _CrossEntropy.apply(input, target, ignore_index, reduction, float(label_smoothing), need_grad)


def _default_chunk(V: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: about _CHUNK_BYTES of logits, a multiple of 64 rows (GEMM tile friendly)."""
    rows = _CHUNK_BYTES // (V * torch.finfo(dtype).bits // 8)
    return max(64, rows // 64 * 64)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, chunk_size=None):
    """cross_entropy(hidden @ weight^T + bias, target) for (N, C) hidden and (V, C) weight.

    On the Triton backend the tokens run ``chunk_size`` at a time (default: about 128 MB of logits per
    chunk), so the (N, V) logits never exist; the torch and reference backends ignore ``chunk_size`` and
    build the full logits. Returns the loss in hidden's dtype.
    """
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError("hidden and weight must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy takes hidden (N, C) and weight (V, C), got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}; flatten (B, T, C) hidden "
                         f"with hidden.view(-1, C)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    impl = select(hidden, weight)
    if impl != "triton":
        target = _as_long(target)
    if impl == "reference":
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                              label_smoothing)
    if impl == "torch":
        loss = F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
        return _torch_mean_guard(loss, target, None, ignore_index, reduction)

    _check_common(reduction, label_smoothing, ignore_index)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what F.linear would do: run the projection in autocast's dtype
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must share one dtype; cast them, or run "
                        f"under torch.autocast")
    if weight.device != hidden.device or target.device != hidden.device:
        raise ValueError("hidden, weight and target must be on one device")
    N, V = hidden.shape[0], weight.shape[0]
    _check_target(target, N, f"hidden of shape {tuple(hidden.shape)}")
    if chunk_size is None:
        chunk_size = _default_chunk(V, hidden.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    n_valid = _count_targets(target, V, ignore_index)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    return _LinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), bias, ignore_index, reduction,
        float(label_smoothing), chunk_size, n_valid, need_h, need_w, need_b)


# --------------------------------------------------------------------------------------- compile check


def compile_cases() -> list[CompileCase]:
    """The kernel at the configurations the launcher picks for GPT-2's vocabulary and for small V.

    V = 50,257 -> BLOCK_V 4096, 8 warps, in fp32/fp16/bf16 with every pass on; bf16 also loss-only (no
    gradient, no smoothing), with per-row scales (the chunked 'none' backward) and int32 targets; the padded
    50,304 (16-divisible strides: vectorized loads) in bf16/fp32; small V: 7 -> (8, 1 warp), 1000 -> (1024, 2).
    """
    tl_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

    # fresh torch allocations are 16-byte aligned, and the JIT specializes on it: compile that specialization
    # (row strides and V too when the vocabulary is padded to a multiple of 64, as 50,304 is)
    aligned = ["X", "G", "T", "LOSS", "ROW_SCALE"]

    def case(V, dtype, label, smoothing=True, write_grad=True, row_scale=False, target="*i64"):
        block_v, num_warps = _launch_config(V)
        t = tl_dtype[dtype]
        sig = {"X": f"*{t}", "stride_x": "i32", "G": f"*{t}", "stride_g": "i32", "T": target, "LOSS": "*fp32",
               "ROW_SCALE": "*fp32", "V": "i32", "ignore_index": "i32", "grad_scale": "fp32",
               "smoothing": "fp32"}
        consts = {"BLOCK_V": block_v, "HAS_SMOOTHING": smoothing, "WRITE_GRAD": write_grad,
                  "HAS_ROW_SCALE": row_scale}
        divisible = aligned + (["stride_x", "stride_g", "V"] if V % 16 == 0 else [])
        return CompileCase(module=__name__, kernel="_cross_entropy_kernel", signature=sig, constexprs=consts,
                           num_warps=num_warps, num_stages=3, label=f"V={V} {t} {label}",
                           extra={"divisible_by_16": divisible})

    return [
        case(50257, torch.float32, "full"),
        case(50257, torch.float16, "full"),
        case(50257, torch.bfloat16, "full"),
        case(50257, torch.bfloat16, "loss-only", smoothing=False, write_grad=False),
        case(50257, torch.bfloat16, "row-scale", smoothing=False, row_scale=True),
        case(50257, torch.bfloat16, "i32 targets", smoothing=False, target="*i32"),
        case(50304, torch.bfloat16, "padded V", smoothing=False),
        case(50304, torch.float32, "padded V", smoothing=False),
        case(7, torch.float32, "full"),
        case(1000, torch.float16, "full"),
    ]
