"""Cross-entropy over a large vocabulary, and the output projection + cross-entropy in chunks of tokens.

At GPT-2 scale the loss holds most of the training memory: 16 x 1024 tokens x 50,257 logits is 3.3 GB in
fp32, and PyTorch's ``F.cross_entropy`` keeps the log-probabilities (same size) for its backward and
builds two more tensors of that size there. Two things here cut that down:

``cross_entropy(logits, target)``
    One Triton program per row, three passes over the (N, V) logits in all, the fewest a loss that keeps
    no (N, V) state between forward and backward can make. The forward walks the row once in
    BLOCK_V-wide chunks keeping a running max and a running sum of exp (the online log-sum-exp, so V need
    not be a power of two and any V fits) and writes each row's loss and log-sum-exp (fp32). The backward
    reads the logits once more and writes the gradient ``(softmax - onehot) * g_row`` (label smoothing:
    ``- eps / V`` on every column and ``(1 - eps)`` on the one-hot) into a fresh buffer, never into the
    logits, with each row's incoming gradient ``g_row`` read by the kernel from device memory: no
    separate scaling pass and no host sync. Reductions (``mean`` over the valid rows, ``sum``) are plain
    torch ops on the (N,) loss rows, so their gradients reach the kernel as those per-row factors.

``linear_cross_entropy(hidden, weight, target)``
    ``cross_entropy(hidden @ weight.T + bias, target)`` without ever holding the (N, V) logits: the tokens
    are taken ``chunk_size`` rows at a time; per chunk the logits come from a cuBLAS matmul, the Triton
    kernel turns them into loss rows and, IN PLACE in that temporary (our own buffer, not an input), into
    their gradient (two passes over the chunk, fused in one launch), and that gradient is consumed at
    once: ``d_hidden[chunk] = dlogits @ weight``, ``d_weight += dlogits.T @ hidden[chunk]``, ``d_bias +=
    dlogits.sum(0)``. For bf16 and fp32 all of it runs in the forward and the backward scales the saved
    ``d_hidden`` / ``d_weight`` / ``d_bias`` by the incoming gradient; for fp16 the forward makes only the
    loss and the backward sweeps the chunks again with the incoming gradient in hand (see below). Peak
    extra memory is one chunk of logits plus the gradients themselves. ``num_classes`` lets the weight
    carry padding rows (a vocabulary padded to a multiple of 64 for the GEMMs, whose logit rows are then
    16-byte aligned for the kernel's vector loads): they take no part in the softmax and get zero gradient.

Choices, and why:

- Gradients are in the logits' dtype (fp16/bf16/fp32), computed in fp32 and rounded once: that is the
  dtype autograd hands back for the logits anyway, and it halves the buffer and its write traffic against
  fp32 for half-precision logits.
- ``d_weight`` is accumulated in the weight's dtype with ``addmm_`` (each chunk's product accumulates in
  fp32 inside cuBLAS; the running sum is rounded to the weight dtype once per chunk, i.e. N / chunk_size
  times). An fp32 accumulator for bf16 weights would need either a (V, C) temporary per chunk plus an
  fp32 add (about a third more time per chunk on an H100) or the ``out_dtype`` GEMM overloads, which exist
  only on CUDA and in recent torch. With fp32 weights (mixed precision with fp32 masters cast outside)
  the accumulation is fp32.
- Target ids outside [0, V) that are not ``ignore_index`` raise a clear error in eager mode: one small
  reduction and ONE device-to-host sync of two integers per call, in the functional entry point, outside
  the ops. Under ``torch.compile`` that check is skipped (it would break the graph) and the kernel marks
  such a row's loss NaN instead, so a bad target never reads out of bounds and never goes unnoticed.
- Only 2-D (N, V) logits with (N,) targets (and 2-D (N, C) hidden): ``F.cross_entropy`` reads a 3-D
  input as (N, C, d1), class dimension second, so accepting (B, T, V) here would silently differ from the
  torch path. Flatten first: ``logits.view(-1, V)``, ``target.view(-1)``.
- ``reduction="none"`` in the chunked path cannot fold per-row gradient scales into the accumulated
  ``d_weight``, so there the forward computes only the loss rows and the backward recomputes the chunks
  (one matmul more) with the kernel scaling each row by its incoming gradient.
- float16 takes that same path for every reduction: its gradients are made in the backward, where the
  incoming gradient (a GradScaler's loss scale, times 1 / n_valid for the mean) is known, and applied in
  float32 before the one rounding to fp16, as torch's own fp16 loss does. Made in the forward, they would
  be ``(softmax - onehot) / n_valid`` rounded to fp16 before the scale exists: at 8,192 tokens and
  V = 50,257 every non-target entry (~2e-9) flushes to zero, fp16's smallest subnormal being 6e-8; and
  the scale applied afterwards in fp16 turns a GradScaler's initial 65,536 into inf (65,504 is fp16's
  largest). The price is the one extra matmul per chunk (4 instead of 3 over the head: ~+1/3 of its time);
  bf16 (fp32's range) and fp32 keep the single sweep in the forward.
- Class ``weight`` in ``cross_entropy`` is not supported by the kernel: with it, every backend uses torch.
- Where every target is ``ignore_index`` the mean is 0, not torch's 0/0 = NaN, on every backend (the
  torch path is guarded the same way; see ``gpt_kernels.reference.cross_entropy``).
- Under autocast the loss is float32 on every backend, as autocast runs torch's cross-entropy
  (:mod:`gpt_kernels.autocast`); the projection of ``linear_cross_entropy`` runs in autocast's dtype.

Layers: the ``@triton.jit`` kernel; the launcher ``_cross_entropy_rows`` and the chunk loop
``_chunked_linear_ce``; the ``torch.library`` custom ops (``gpt_triton::cross_entropy`` and its
backward, ``gpt_triton::linear_cross_entropy`` for mean/sum, ``gpt_triton::linear_cross_entropy_rows`` and
its backward for ``none``) with fake implementations and autograd formulas; the functional entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .autocast import autocast_dtype
from .backend import select
from .common import FLOAT_DTYPES, LAUNCH_OPTIONS, check_same_device, new_buffer, on_inputs_device

_REDUCTIONS = ("mean", "sum", "none")
_MAX_BLOCK_V = 4096  # widest vocabulary chunk one program loads at a time: 16 fp32 per thread at 8 warps
# bytes of logits one chunk of linear_cross_entropy may hold: ~1280 tokens x 50,257 in bf16. Small enough
# that the chunk is a few % of what projection + F.cross_entropy holds at 4K tokens, large enough that
# each chunk's matmuls run near peak and d_weight is rounded only N / chunk_size times.
_CHUNK_BYTES = 128 * 2**20


# ---------------------------------------------------------------------------------------------- kernel


@triton.jit
def _cross_entropy_kernel(
    X,  # logits, (N, >= V) rows, row stride stride_x, unit column stride; fp32 / fp16 / bf16
    stride_x,  # elements between consecutive rows of X
    G,  # gradient out, (N, V_PAD), row stride stride_g, G's dtype; may BE X (linear CE's own temporary)
    stride_g,  # elements between consecutive rows of G
    T,  # targets, (N,), int32 / int64 class ids in [0, V) or ignore_index
    LOSS,  # loss out, (N,), fp32: the row's loss, 0 on ignored rows, NaN for a target outside [0, V)
    LSE,  # log-sum-exp of each row, (N,) fp32: written by the FORWARD pass, read by a gradient-only launch
    ROW_SCALE,  # each row's gradient factor, (N,) fp32 at stride stride_rs (0: one factor for all rows)
    stride_rs,  # elements between consecutive entries of ROW_SCALE
    V,  # number of classes: the softmax runs over columns [0, V)
    V_PAD,  # row width present in X and written in G, >= V: V, or the padded width of our own buffer, whose
    # columns [V, V_PAD) (padding classes) are read, left out in registers, and get a zero gradient
    ignore_index,  # target value whose row counts zero and gets a zero gradient
    smoothing,  # fp32 label smoothing eps in [0, 1]
    BLOCK_V: tl.constexpr,  # columns per chunk (power of two); V need not be a multiple
    HAS_SMOOTHING: tl.constexpr,  # eps > 0: also sum the row for the uniform part of the target
    FORWARD: tl.constexpr,  # pass 1: the row's log-sum-exp and loss, written to LSE and LOSS
    WRITE_GRAD: tl.constexpr,  # pass 2: the gradient into G (the lse from pass 1, or read from LSE)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t = tl.load(T + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    t_safe = tl.where(valid & in_range, t, 0)  # an ignored or bad row still reads a real column
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    v_full = (V // BLOCK_V) * BLOCK_V  # chunks below this need no mask: plain (vector) loads
    # the last chunks are masked at V_PAD (a multiple of 16 for padded rows, so the loads stay vectorized)
    # and the columns past V are left out in registers

    if FORWARD:
        # online log-sum-exp over the row: m = running max, s = sum exp(x - m); unmasked body, masked tail
        m = -float("inf")
        s = 0.0
        sum_x = 0.0
        for start in range(0, v_full, BLOCK_V):
            x = tl.load(x_row + start + cols).to(tl.float32)  # (BLOCK_V,)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(x, axis=0)
        if v_full < V:
            offs = v_full + cols
            x = tl.load(x_row + offs, mask=offs < V_PAD, other=-float("inf")).to(tl.float32)  # (BLOCK_V,)
            x = tl.where(offs < V, x, -float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(offs < V, x, 0.0), axis=0)
        lse = m + tl.log(s)
        loss = lse - tl.load(x_row + t_safe).to(tl.float32)
        if HAS_SMOOTHING:
            # (1 - eps) * (lse - x_t) + eps * mean_j (lse - x_j)
            loss = (1.0 - smoothing) * loss + smoothing * (lse - sum_x / V)
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)

    # pass 2: d loss / d x_j = (softmax_j - (1 - eps) [j == t] - eps / V) * scale; 0 on padding columns
    if WRITE_GRAD:
        scale = tl.load(ROW_SCALE + row * stride_rs)
        scale = tl.where(valid, scale, 0.0)  # exact zeros on ignored rows, whatever the logits
        scale = tl.where(in_range | ~valid, scale, float("nan"))
        hit = 1.0
        uniform = 0.0
        if HAS_SMOOTHING:
            hit = 1.0 - smoothing
            uniform = smoothing / V
        g_row = G + row * stride_g
        for start in range(0, v_full, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs).to(tl.float32)  # (BLOCK_V,)
            g = (tl.exp(x - lse) - tl.where(offs == t_safe, hit, 0.0) - uniform) * scale
            tl.store(g_row + offs, g.to(G.dtype.element_ty))
        for start in range(v_full, V_PAD, BLOCK_V):  # the ragged last chunk, and any padding columns
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < V_PAD, other=0.0).to(tl.float32)  # (BLOCK_V,)
            g = (tl.exp(x - lse) - tl.where(offs == t_safe, hit, 0.0) - uniform) * scale
            g = tl.where(offs < V, g, 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=offs < V_PAD)


# -------------------------------------------------------------------------------------------- launcher


def _launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits: chunks up to 4096 wide, 16 elements per thread at most."""
    block_v = min(triton.next_power_of_2(max(V, 1)), _MAX_BLOCK_V)
    num_warps = max(1, min(8, block_v // 512))  # 8 -> 1, 1024 -> 2, 2048 -> 4, 4096 -> 8
    return block_v, num_warps


@on_inputs_device
def _cross_entropy_rows(x, target, V, ignore_index, label_smoothing, loss=None, lse=None, grad=None,
                        row_scale=None, forward=True):
    """Launch the kernel on (n, >= V) rows ``x`` with unit column stride.

    ``forward``: compute each row's loss and log-sum-exp into ``loss`` and ``lse`` ((n,) fp32, allocated
    when None). ``grad`` (n, V_PAD >= V), optional: also write the gradient there, each row scaled by
    ``row_scale`` ((n,) fp32, any stride; 1 when None); without ``forward`` ``lse`` must hold the rows'
    log-sum-exp. ``grad`` may be ``x`` itself (overwriting the logits with their gradient) only for
    buffers we own; with a wider ``grad`` (padding classes) x must have as many columns. Returns
    ``(loss, lse)``.
    """
    n = x.shape[0]
    if loss is None:
        loss = new_buffer((n,), torch.float32, x.device)
    if lse is None:
        lse = new_buffer((n,), torch.float32, x.device)
    if n == 0:
        return loss, lse
    if row_scale is None:
        row_scale = torch.ones((), device=x.device, dtype=torch.float32).expand(n)
    block_v, num_warps = _launch_config(V)
    g = grad if grad is not None else x  # never written without a gradient
    _cross_entropy_kernel[(n,)](
        x, x.stride(0), g, g.stride(0), target, loss, lse, row_scale, row_scale.stride(0),
        V, g.shape[1] if grad is not None else V, ignore_index, float(label_smoothing),
        BLOCK_V=block_v, HAS_SMOOTHING=label_smoothing > 0.0, FORWARD=forward, WRITE_GRAD=grad is not None,
        num_warps=num_warps, **LAUNCH_OPTIONS)
    return loss, lse


def _chunked_linear_ce(hidden, weight, bias, target, V, ignore_index, label_smoothing, chunk, need_h, need_w,
                       need_b, loss_rows, row_scale=None):
    """One sweep over the tokens in chunks: loss rows into ``loss_rows`` and the requested gradients.

    hidden (N, C), weight (Vp, C) of which the first V rows are classes, bias (Vp,) or None, target (N,),
    row_scale (N,) fp32 (any stride) or None for 1. Returns (d_hidden (N, C) or None, d_weight (Vp, C) or
    None, d_bias (Vp,) fp32 or None), every gradient already scaled by its row's factor.
    """
    N, C = hidden.shape
    need_any = need_h or need_w or need_b
    d_hidden = torch.empty_like(hidden) if need_h else None  # (N, C)
    d_weight = torch.zeros_like(weight) if need_w else None  # (Vp, C), weight's dtype (see module doc)
    d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None  # (Vp,)
    w_t = weight.t()  # (C, Vp) view
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h_c = hidden[start:end]  # (n, C)
        logits_c = torch.addmm(bias, h_c, w_t) if bias is not None else torch.mm(h_c, w_t)  # (n, Vp)
        # the kernel turns logits_c into its own gradient in place: logits_c is our temporary, not an input
        _cross_entropy_rows(logits_c, target[start:end], V, ignore_index, label_smoothing,
                            loss=loss_rows[start:end], grad=logits_c if need_any else None,
                            row_scale=None if row_scale is None else row_scale[start:end])
        if need_h:
            torch.mm(logits_c, weight, out=d_hidden[start:end])  # (n, Vp) @ (Vp, C) -> (n, C)
        if need_w:
            d_weight.addmm_(logits_c.t(), h_c)  # (Vp, n) @ (n, C) -> (Vp, C)
        if need_b:
            d_bias += logits_c.sum(dim=0, dtype=torch.float32)  # (Vp,)
        del logits_c
    return d_hidden, d_weight, d_bias


# ------------------------------------------------------------------------------------------ custom ops
# torch.library ops, so torch.compile(fullgraph=True) keeps the kernels as opaque calls with known outputs
# (the fake implementations) and autograd knows the backward (register_autograd below).


@torch.library.custom_op("gpt_triton::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss rows, log-sum-exp rows), both (N,) float32, of (N, V) logits with unit column stride."""
    return _cross_entropy_rows(logits, target, logits.shape[1], ignore_index, label_smoothing)


@torch.library.custom_op("gpt_triton::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                               lse: torch.Tensor, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """d loss_rows . grad_rows / d logits: (N, V) in the logits' dtype, one pass over the logits."""
    grad = new_buffer(logits.shape, logits.dtype, logits.device)  # (N, V)
    _cross_entropy_rows(logits, target, logits.shape[1], ignore_index, label_smoothing, lse=lse, grad=grad,
                        row_scale=grad_rows.float(), forward=False)
    return grad


@torch.library.custom_op("gpt_triton::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                  row_scale: torch.Tensor, num_classes: int, ignore_index: int, label_smoothing: float, chunk: int,
                  need_h: bool, need_w: bool, need_b: bool) -> list[torch.Tensor]:
    """[loss, d_hidden if need_h, d_weight if need_w, d_bias if need_b]: loss = sum_i row_scale_i * loss_i
    (float32, 0-d) and its gradients for an incoming gradient of 1, made in the same sweep."""
    loss_rows = new_buffer((hidden.shape[0],), torch.float32, hidden.device)  # (N,)
    grads = _chunked_linear_ce(hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk,
                               need_h, need_w, need_b, loss_rows, row_scale=row_scale)
    return [(loss_rows * row_scale).sum()] + [g for g in grads if g is not None]


@torch.library.custom_op("gpt_triton::linear_cross_entropy_rows", mutates_args=())
def _linear_ce_rows_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                       num_classes: int, ignore_index: int, label_smoothing: float, chunk: int) -> torch.Tensor:
    """The (N,) float32 loss rows alone (``reduction="none"``); the backward recomputes the chunks."""
    loss_rows = new_buffer((hidden.shape[0],), torch.float32, hidden.device)  # (N,)
    _chunked_linear_ce(hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk,
                       False, False, False, loss_rows)
    return loss_rows


@torch.library.custom_op("gpt_triton::linear_cross_entropy_rows_backward", mutates_args=())
def _linear_ce_rows_backward_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None, target: torch.Tensor, num_classes: int, ignore_index: int,
                                label_smoothing: float, chunk: int, need_h: bool, need_w: bool,
                                need_b: bool) -> list[torch.Tensor]:
    """[d_hidden if need_h, d_weight if need_w, d_bias if need_b] for per-row incoming gradients."""
    scratch = new_buffer((hidden.shape[0],), torch.float32, hidden.device)  # (N,) the loss rows, unused
    grads = _chunked_linear_ce(hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk,
                               need_h, need_w, need_b, scratch, row_scale=grad_rows.float())
    return [g for g in grads if g is not None]


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, label_smoothing):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


@_cross_entropy_backward_op.register_fake
def _(grad_rows, logits, target, lse, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape)


def _fake_linear_grads(hidden, weight, need_h, need_w, need_b) -> list:
    return ([hidden.new_empty(hidden.shape)] if need_h else []) + ([weight.new_empty(weight.shape)] if need_w
                                                                    else []) + (
        [weight.new_empty((weight.shape[0],), dtype=torch.float32)] if need_b else [])


@_linear_ce_op.register_fake
def _(hidden, weight, bias, target, row_scale, num_classes, ignore_index, label_smoothing, chunk, need_h, need_w,
      need_b):
    return [hidden.new_empty((), dtype=torch.float32)] + _fake_linear_grads(hidden, weight, need_h, need_w, need_b)


@_linear_ce_rows_op.register_fake
def _(hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk):
    return hidden.new_empty((hidden.shape[0],), dtype=torch.float32)


@_linear_ce_rows_backward_op.register_fake
def _(grad_rows, hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk, need_h, need_w,
      need_b):
    return _fake_linear_grads(hidden, weight, need_h, need_w, need_b)


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing = inputs
    _, lse = output
    ctx.save_for_backward(logits, target, lse)
    ctx.args = (ignore_index, label_smoothing)
    ctx.mark_non_differentiable(lse)


def _ce_vjp(ctx, grad_rows, _dlse):
    logits, target, lse = ctx.saved_tensors
    return _cross_entropy_backward_op(grad_rows, logits, target, lse, *ctx.args), None, None, None


def _linear_grads_in_order(ctx, grads: list, scale: torch.Tensor | None = None) -> tuple:
    """(d_hidden, d_weight, d_bias) from the ops' lists of the gradients that were made, scaled by ``scale``
    (the incoming 0-d gradient, or None when they are final), d_bias in the bias' dtype."""
    out = []
    for needed in ctx.needs:
        g = grads.pop(0) if needed else None
        if g is not None and scale is not None:
            g = g * scale  # the fp32 0-d factor, not rounded to g's dtype first (a 1/3 in bf16 is 0.334)
        out.append(g)
    if out[2] is not None:
        out[2] = out[2].to(ctx.bias_dtype)
    return tuple(out)


def _linear_ce_setup(ctx, inputs, output):
    hidden, weight, bias, target, row_scale, num_classes, ignore_index, label_smoothing, chunk, *needs = inputs
    ctx.needs = needs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _linear_ce_vjp(ctx, grads):
    d_hidden, d_weight, d_bias = _linear_grads_in_order(ctx, list(ctx.saved_tensors), scale=grads[0])
    return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None, None


def _linear_ce_rows_setup(ctx, inputs, output):
    hidden, weight, bias, target, num_classes, ignore_index, label_smoothing, chunk = inputs
    ctx.save_for_backward(hidden, weight, bias, target)
    ctx.args = (num_classes, ignore_index, label_smoothing, chunk)
    ctx.needs = tuple(ctx.needs_input_grad[:3])
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_ce_rows_vjp(ctx, grad_rows):
    hidden, weight, bias, target = ctx.saved_tensors
    grads = _linear_ce_rows_backward_op(grad_rows, hidden, weight, bias, target, *ctx.args, *ctx.needs)
    return (*_linear_grads_in_order(ctx, grads), None, None, None, None, None)


_cross_entropy_op.register_autograd(_ce_vjp, setup_context=_ce_setup)
_linear_ce_op.register_autograd(_linear_ce_vjp, setup_context=_linear_ce_setup)
_linear_ce_rows_op.register_autograd(_linear_ce_rows_vjp, setup_context=_linear_ce_rows_setup)


# ------------------------------------------------------------------------------------------ functional


def _check_common(reduction, label_smoothing, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target(target: torch.Tensor, n: int, what: str, like: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class ids, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer class ids (int64 or int32), got {target.dtype}; "
                        f"class-probability targets are not supported by the Triton path (use GPT_KERNELS=torch)")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},) to match {what}, got {tuple(target.shape)}; "
                         f"flatten (B, T) targets with target.view(-1)")
    if target.device != like.device:
        raise ValueError(f"target is on {target.device} but the {what.split()[0]} is on {like.device}")


def _check_target_range(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise if a target that is not ignore_index lies outside [0, V): one host sync, skipped while compiling
    (the kernel then marks the row's loss NaN)."""
    if torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))  # (N,)
    n_bad = int(bad.sum())
    if n_bad:
        example = target[bad][0].item()
        raise ValueError(f"{n_bad} target(s) outside [0, {V}) (e.g. {example}) that are not ignore_index "
                         f"({ignore_index}): targets must be class ids below the vocabulary size")


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """fp32 loss rows -> the reduced loss (the mean over the valid rows; 0 when there are none), on device."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()  # fp32, deterministic
    if reduction == "mean":
        total = total / (target != ignore_index).sum().clamp(min=1)
    return total


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
    (with ``weight`` every backend runs torch). Where every target is ignored the mean is 0, not NaN. The
    loss is in the logits' dtype, or float32 under autocast (see :mod:`gpt_kernels.autocast`).
    """
    check_same_device("cross_entropy", input=input, target=target, weight=weight)
    impl = select(input)
    out_dtype = torch.float32 if autocast_dtype(input) is not None else input.dtype
    if impl != "triton":
        target = _as_long(target)
    if impl == "torch" or weight is not None:
        loss = F.cross_entropy(input, _as_long(target), weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
        return _torch_mean_guard(loss, target, weight, ignore_index, reduction).to(out_dtype)
    if impl == "reference":
        return reference.cross_entropy(input, target, ignore_index, reduction, label_smoothing).to(out_dtype)
    _check_common(reduction, label_smoothing, ignore_index)
    if not isinstance(input, torch.Tensor) or input.dim() != 2:
        raise ValueError(f"cross_entropy's Triton path takes (N, V) logits, got shape "
                         f"{tuple(getattr(input, 'shape', ()))}; flatten (B, T, V) logits with logits.view(-1, V) "
                         f"and targets with target.view(-1)")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {input.dtype}")
    N, V = input.shape
    if V == 0:
        raise ValueError("logits have no classes (V = 0)")
    _check_target(target, N, f"logits of shape {tuple(input.shape)}", input)
    _check_target_range(target, V, ignore_index)
    logits = input if input.stride(1) == 1 else input.contiguous()  # unit column stride; any row stride
    loss_rows, _ = _cross_entropy_op(logits, target.contiguous(), ignore_index, float(label_smoothing))
    return _reduce(loss_rows, target, ignore_index, reduction).to(out_dtype)


def _default_chunk(V: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: about _CHUNK_BYTES of logits, a multiple of 64 rows (GEMM tile friendly)."""
    rows = _CHUNK_BYTES // (V * torch.finfo(dtype).bits // 8)
    return max(64, rows // 64 * 64)


def _check_linear(hidden, weight, bias, num_classes) -> int:
    """Shape checks every backend shares; returns the number of classes."""
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError("hidden and weight must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy takes hidden (N, C) and weight (V, C), got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}; flatten (B, T, C) hidden "
                         f"with hidden.view(-1, C)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if num_classes is None:
        return weight.shape[0]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= weight.shape[0]:
        raise ValueError(f"num_classes must be an int in [1, {weight.shape[0]}] (the weight's rows), "
                         f"got {num_classes!r}")
    return num_classes


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, chunk_size=None, num_classes=None):
    """cross_entropy(hidden @ weight^T + bias, target) for (N, C) hidden and (V, C) weight.

    ``num_classes``: only the first ``num_classes`` rows of ``weight`` (and ``bias``) are classes; the
    rest are padding (a vocabulary padded for speed): left out of the softmax, zero gradient. On the
    Triton backend the tokens run ``chunk_size`` at a time (default: about 128 MB of logits per chunk), so
    the (N, V) logits never exist; the torch and reference backends ignore ``chunk_size`` and build the
    full logits. Returns the loss in hidden's dtype, or float32 under autocast (the projection then runs
    in autocast's dtype, as ``F.linear`` would).
    """
    check_same_device("linear_cross_entropy", hidden=hidden, weight=weight, target=target, bias=bias)
    V = _check_linear(hidden, weight, bias, num_classes)
    impl = select(hidden, weight)
    amp = autocast_dtype(hidden)
    out_dtype = torch.float32 if amp is not None else hidden.dtype
    if impl != "triton":
        target = _as_long(target)
        # (V, C), (V,) views, also when V is every row: slice_backward then hands autograd a fresh contiguous
        # gradient, which a weight tied to the embedding sums into in place (2 (V, C) tensors at the peak;
        # the whole weight's gradient is a transposed view that the sum must copy: 3)
        w, b = weight[:V], None if bias is None else bias[:V]
    if impl == "reference":
        if amp is not None:  # the projection as F.linear runs it under autocast
            hidden, w, b = hidden.to(amp), w.to(amp), None if b is None else b.to(amp)
        return reference.linear_cross_entropy(hidden, w, target, b, ignore_index, reduction,
                                              label_smoothing).to(out_dtype)
    if impl == "torch":
        loss = F.cross_entropy(F.linear(hidden, w, b), target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
        return _torch_mean_guard(loss, target, None, ignore_index, reduction).to(out_dtype)

    _check_common(reduction, label_smoothing, ignore_index)
    if amp is not None:  # what F.linear does under autocast: run the projection in autocast's dtype
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must share one dtype; cast them, or run "
                        f"under torch.autocast")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; move them to one device")
    N = hidden.shape[0]
    _check_target(target, N, f"hidden of shape {tuple(hidden.shape)}", hidden)
    if chunk_size is None:
        chunk_size = _default_chunk(weight.shape[0], hidden.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    _check_target_range(target, V, ignore_index)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    args = (V, ignore_index, float(label_smoothing), chunk_size)
    if reduction == "none" or hidden.dtype == torch.float16:  # fp16: gradients made in the backward (module doc)
        loss_rows = _linear_ce_rows_op(hidden, weight, bias, target, *args)  # (N,) fp32
        return _reduce(loss_rows, target, ignore_index, reduction).to(out_dtype)
    n_valid = (target != ignore_index).sum().clamp(min=1) if reduction == "mean" else None
    row_scale = (1.0 / n_valid if n_valid is not None else torch.ones((), device=hidden.device)).float().expand(N)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _linear_ce_op(hidden, weight, bias, target, row_scale, *args, *needs)[0].to(out_dtype)


# --------------------------------------------------------------------------------------- compile check


def compile_cases():
    """The kernel in each role at the configurations the launcher picks for GPT-2's vocabulary and small V.

    Roles: "fwd" (loss and log-sum-exp: cross_entropy's forward), "bwd" (gradient from a saved lse, with the
    rows' incoming gradient: cross_entropy's backward), "fused" (both in one launch, gradient in place: every
    chunk of linear_cross_entropy). V = 50,257 in bf16 and fp32 (fp16 compiles as bf16: compile_check.stand_in):
    rows 50,257 apart in every role, as the benchmarks and an unpadded model or a user's logits give them; the
    model's padded head (rows 50,304 apart, 16-byte aligned: vector loads) in training (fused) and evaluation
    (fwd, a view of the padded logits); label smoothing; int32 targets; small V: 7 -> (8, 1 warp), 1000 ->
    (1024, 2).
    """
    from .compile_check import ARCHS, PRIMARY, CompileCase

    roles = {"fwd": (True, False), "bwd": (False, True), "fused": (True, True)}

    def case(V, t, role, smoothing=False, target="*i64", row_stride=None):
        block_v, num_warps = _launch_config(V)
        sig = {"X": f"*{t}", "stride_x": "i32", "G": f"*{t}", "stride_g": "i32", "T": target, "LOSS": "*fp32",
               "LSE": "*fp32", "ROW_SCALE": "*fp32", "stride_rs": "i32", "V": "i32", "V_PAD": "i32",
               "ignore_index": "i32", "smoothing": "fp32"}
        forward, write_grad = roles[role]
        consts = {"BLOCK_V": block_v, "HAS_SMOOTHING": smoothing, "FORWARD": forward, "WRITE_GRAD": write_grad}
        # fresh torch allocations are 16-byte aligned and the JIT specializes on it; a row stride that is a
        # multiple of 16 (the padded vocabulary) too, which is what makes 128-bit loads possible. The row
        # factors are one value expanded (stride 0) unless reduction="none" hands in a row of them
        divisible = ["X", "G", "T", "LOSS", "LSE", "ROW_SCALE", "stride_rs"]
        row_stride = V if row_stride is None else row_stride
        if row_stride % 16 == 0:
            divisible += ["stride_x", "stride_g"] + (["V_PAD"] if role == "fused" else [])
        label = f"V={V} {t} {role}{' smooth' if smoothing else ''}{' i32' if target == '*i32' else ''}"
        if row_stride != V:
            label += f" rows={row_stride}"
        default = V == 50257 and t == "bf16" and not smoothing and target == "*i64"  # a GPU's default: every target
        return CompileCase(module=__name__, kernel="_cross_entropy_kernel", signature=sig, constexprs=consts,
                           num_warps=num_warps, num_stages=3, label=label, extra={"divisible_by_16": divisible},
                           archs=ARCHS if default else PRIMARY)

    cases = []
    for t in ("bf16", "fp32"):
        for role in ("fwd", "bwd", "fused"):
            cases += [case(50257, t, role), case(50257, t, role, smoothing=True)]
        # the model's padded head: training (chunks, in place) and evaluation (the logits' view)
        cases += [case(50257, t, "fused", row_stride=50304), case(50257, t, "fused", True, row_stride=50304),
                  case(50257, t, "fwd", row_stride=50304)]
    cases += [
        case(50257, "bf16", "fwd", target="*i32"),
        case(7, "fp32", "fused", smoothing=True),
        case(1000, "bf16", "fused", smoothing=True),
    ]
    return cases
