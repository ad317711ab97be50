"""Causal attention: a FlashAttention-2 style Triton kernel, forward and backward, with dropout and decoding.

``attention(q, k, v, causal=True, dropout_p=0.0, scale=None)`` computes
``softmax(q k^T * scale, masked) @ v`` for (B, H, Tq, D) queries and (B, H, Tk, D) keys and values, tile
by tile with an online softmax, so no (Tq x Tk) matrix exists in memory in the forward or the backward.

Forward (``_attn_fwd``), one program per (query block, batch*head):
    q tile stays in registers; loop over key blocks: s = q k^T (fp32), running row max m and row sum l
    in the log2 domain (log2(e) folded into the scale so every exponential is one ``exp2``), rescale the
    fp32 accumulator, acc += p v. Saves only O and the per-row log-sum-exp (natural log, fp32).
    Causal: key blocks above the diagonal are never visited (the loop stops there); the blocks that
    every row sees in full run without any mask, and only the few blocks that straddle the diagonal
    (or the ragged end of the keys) run the masked loop body: the two-stage loop of Triton's
    06-fused-attention tutorial, generalised to Tq <= Tk and to lengths that are not block multiples.

Backward, FlashAttention-2's split into three launches, with no atomics:
    1. ``_attn_bwd_preprocess``: delta_i = rowsum(dO_i * O_i) (fp32), one program per query block.
    2. ``_attn_bwd_dkdv``: one program per key block owns its dK, dV in fp32 registers and loops over
       the query blocks that can see it (recomputing P = exp2(s - lse) from the saved lse).
    3. ``_attn_bwd_dq``: one program per query block owns its dQ and loops over the key blocks it sees.
    Why split rather than one fused loop with ``atomic_add`` into dQ: every gradient element is written
    by exactly one program, so the backward is deterministic (bitwise repeatable) and needs no fp32 dQ
    scratch buffer, no zeroing and no conversion pass, and the autotuner can re-run it freely. The price
    is recomputing q k^T and dO v^T once more in the dQ kernel (7 tile matmuls instead of 5). The fused
    atomic version (FlashAttention-2's: the dK/dV kernel also adds dQ with fp32 atomics, no dQ kernel)
    is an option, ``ATOMIC_DQ_BACKWARD``, trading that for contention on dQ and non-deterministic sums.

Dropout on the attention weights uses Philox keyed by (seed, batch*head): one call gives 16 random
bytes, 16 keep-decisions with 8-bit thresholds (as FlashAttention-2), mapped onto the elements so that
the mask is built in the accumulator's own register layout (``_dropout_keep``): forward and backward
regenerate the same keep-mask tile by tile and it is never stored. The probability applied is a
multiple of 1/256 (:func:`effective_dropout_p`: 0.1 -> 26/256); kept weights are scaled by 1 / (1 - it);
the softmax normaliser l is taken before dropout, as in ``F.dropout(softmax(s))``. The seed is drawn by
``torch.randint`` on the inputs' device and read by the kernels from device memory, so choosing it needs
no host sync and ``torch.manual_seed`` makes runs repeatable. :func:`attention_dropout_mask`
materialises the very mask the kernels use (a small kernel calling the same jitted ``_dropout_keep``, so
identical by construction), for tests.

Decoding with a KV cache (Tq < Tk, down to Tq = 1): query i sits at position i + Tk - Tq of the sequence,
so under ``causal`` it sees keys j <= i + Tk - Tq. The autotuner offers BLOCK_M = 16 configurations for
short Tq, and where the B * H programs of such a grid leave SMs idle the forward splits the keys across
programs instead (flash-decoding, ``_attn_fwd_splitk``: each split's output and log-sum-exp, merged by
``_attn_splitk_combine``; see ``_splitk_plan``). Tq > Tk is an error when causal (the first queries would
see no key); without ``causal`` any Tq, Tk works.

Tiles: autotuned per kernel from short lists (``FWD_CONFIGS``, ``DKDV_CONFIGS``, ``DQ_CONFIGS``,
``BWD_ATOMIC_CONFIGS``, ``SPLITK_CONFIGS``) keyed on (Tq, Tk rounded up to powers of two, D, causal,
dropout, dtype) and pruned to the configs that serve the head dim, dtype, dropout setting and GPU family,
whose tile fits the length and whose compiled kernel fits the GPU's shared memory per program (99 KB on
sm_86/sm_89 against an A100's 163 KB; ``_candidates``); a launch listed once per head dim it serves is
timed once. ``compile_cases()`` compiles exactly those lists. Under TRITON_INTERPRET=1 one small fixed
config per kernel (``INTERPRET_CONFIGS``).

Layers: the ``@triton.jit`` kernels; ``_check_inputs`` and the launchers ``_forward`` / ``_backward``
(strides passed through, so q, k, v may be non-contiguous views, e.g. the (B, T, H, D) split of a fused
qkv projection, and outputs are laid out like the inputs); the ``torch.library`` custom ops
``gpt_triton::attention`` and ``gpt_triton::attention_backward`` (fake implementations for
``torch.compile``; the autograd formula registered on the forward); ``_attention`` (the Triton path, with
a ``seed`` for tests) and the public ``attention``, which applies the autocast policy
(:mod:`gpt_kernels.autocast`) and picks the backend once, before any op runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .autocast import autocast_dtype
from .backend import interpreter_enabled, planning, select
from .common import INTERPRETER, LAUNCH_OPTIONS, LN2, LOG2E, on_inputs_device, smem_per_block

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)

# =============================================================================================== kernels


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and columns >= HEAD_DIM read as 0."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _mm(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 inputs use 3xTF32 (near-fp32 accuracy on tensor cores).

    Triton's CPU interpreter multiplies bf16 operands wrongly (its numpy dot has no bf16), so there, and
    only there, they are widened to fp32 first: bf16 products are exact in fp32, as on the tensor cores.
    """
    if INTERPRETER:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    if FP32:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _philox_key(SEED, bh, DROPOUT: tl.constexpr):
    """The Philox key of one (batch, head): the seed (read from device memory, so no host sync picks
    it) in the low 32 bits, batch*head in the high 32. 0 without dropout (never used then)."""
    key = bh * 0
    if DROPOUT:
        key = bh * 4294967296 + tl.load(SEED)
    return key


@triton.jit
def _dropout_keep(seed_key, row0, col0, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    """Keep-mask (True = keep) of one (batch, head) for query rows row0 + [0, BLOCK_M) and key columns
    col0 + [0, BLOCK_N): (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) keys-by-queries if TRANSPOSED.

    One Philox-4x32-10 call, keyed by ``seed_key`` (seed in the low word, batch*head in the high word),
    gives 128 random bits: 16 bytes, one keep-decision each (kept when the byte is >= 256 * dropout_p,
    so dropout_p must be a multiple of 1/256, see :func:`effective_dropout_p`). Query i and key j use
    byte ``(j0 + 2 j4)`` of word ``(i3 + 2 j3)`` (jb = bit b of j) of the call whose counter is
    (j without bits 0, 3, 4; i without bit 3). Why those bits: in the accumulator layout of the MMA
    (the layout of s and p), bits 0 and 3.. of a key and bit 3 of a query index a thread's own
    registers, so the 16 bytes of a call land on 16 elements of one thread. Written element-wise, the
    compiler builds the mask directly in that layout (no layout conversion through shared memory) and,
    since the counter ignores the register bits, computes each call once per thread: in the forward
    and dQ kernels one call per 16 elements. In dK/dV's transposed tile (keys along rows) only bits j3
    and i3 are a thread's registers, so there one call serves 4 of a thread's elements.

    The mask depends only on (seed, batch*head, i, j), never on the tile sizes, so every kernel
    regenerates the same one. row0 is a multiple of 16, col0 of min(BLOCK_N, 32); BLOCK_M and BLOCK_N
    are multiples of 16.
    """
    if TRANSPOSED:
        li = tl.arange(0, BLOCK_M)[None, :]  # (1, BLOCK_M) query offsets in the block, along columns
        lj = tl.arange(0, BLOCK_N)[:, None]  # (BLOCK_N, 1) key offsets, along rows
    else:
        li = tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, 1)
        lj = tl.arange(0, BLOCK_N)[None, :]  # (1, BLOCK_N)
    # counter words: the query without bit 3 (row0 is 16-aligned), the key without bits 0, 3 and 4
    ctr_i = (row0 >> 4) * 8 + (((li >> 4) << 3) | (li & 7))
    if BLOCK_N % 32 == 0:  # col0 is 32-aligned: bit 4 comes from the offset in the block
        ctr_j = (col0 >> 5) * 4 + (((lj >> 5) << 2) | ((lj >> 1) & 3))
        j4 = (lj >> 4) & 1
    else:  # a 16-wide block: bit 4 is the block's
        ctr_j = (col0 >> 5) * 4 + ((lj >> 1) & 3)
        j4 = (col0 >> 4) & 1
    c0 = (ctr_j + ctr_i * 0).to(tl.uint32)  # (BLOCK_M, BLOCK_N) or its transpose
    c1 = (ctr_i + ctr_j * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed_key, c0, c1, zero, zero)
    word = ((li >> 3) & 1) + 2 * ((lj >> 3) & 1)  # i3 + 2 j3
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    byte = (r >> (8 * ((lj & 1) + 2 * j4)).to(tl.uint32)) & 255
    return byte >= tl.cast(dropout_p * 256.0 + 0.5, tl.uint32)


@triton.jit
def _key_range(start_m, Tk, OFF, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query rows start_m .. start_m + BLOCK_M - 1: keys [0, lo_full) are seen in full by every row
    (no mask), keys [lo_full, hi) need the causal mask or the tail mask past Tk, and no row sees a key from
    hi on. Query i sees key j <= i + OFF when causal (OFF = Tk - Tq: queries aligned to the keys' end)."""
    if CAUSAL:
        lo_full = ((start_m + OFF + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(Tk, start_m + BLOCK_M + OFF)
    else:
        lo_full = (Tk // BLOCK_N) * BLOCK_N
        hi = Tk
    return lo_full, hi


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  # running state: (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,), (BLOCK_M,), q tile
                    Kb, Vb,  # this (batch, head)'s K and V base pointers
                    stride_kt, stride_kd, stride_vt, stride_vd,  # time and feature strides of K and V
                    start_m, offs_m, offs_d,  # first query row; (BLOCK_M,) its rows; (BLOCK_D,) features
                    lo, hi,  # key range [lo, hi) of this stage, lo a multiple of BLOCK_N
                    Tk, OFF,  # number of keys; OFF = Tk - Tq (query i sees keys j <= i + OFF when causal)
                    qk_scale,  # softmax scale * log2(e)
                    dropout_p, seed_key,  # dropout probability and Philox key (used when DROPOUT)
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr,  # mask keys >= Tk and, if CAUSAL, keys above the diagonal
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, FP32: tl.constexpr,
                    GUARD_EMPTY: tl.constexpr = False):  # MASKED rows may have seen no key yet (split-K)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0  # (BLOCK_N,)
        k = _load_tile(Kb + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, offs_n, Tk, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        s = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), FP32)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = offs_n[None, :] < Tk  # (1, BLOCK_N)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + OFF)  # (BLOCK_M, BLOCK_N)
            s = tl.where(ok, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in its first block...
            if GUARD_EMPTY:  # ...unless the keys start later (a split): subtract 0, so exp2 gives 0, not NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_ref = m_new
            s = s - m_ref[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
            s = s * qk_scale - m_new[:, None]
        p = tl.math.exp2(s)  # (BLOCK_M, BLOCK_N) unnormalised weights
        alpha = tl.math.exp2(m_i - m_ref)  # (BLOCK_M,) rescales what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every weight, dropped or not
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed_key, start_m, start_n, dropout_p, q.shape[0], BLOCK_N, False), p, 0.0)
        v = _load_tile(Vb + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, offs_n, Tk, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        acc = _mm(p.to(v.dtype), v, acc, FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # (B, H, Tq, D) queries, (B, H, Tk, D) keys and values, any strides
    O,  # (B, H, Tq, D) output, strides stride_o*
    LSE,  # (B*H, Tq) fp32 output: natural-log log-sum-exp of each row's scaled, masked scores
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of Q (batch, head, time, feature)
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vt, stride_vd,  # strides of V
    stride_ob, stride_oh, stride_ot, stride_od,  # strides of O
    H,  # number of heads: program_id(1) = batch * H + head
    Tq, Tk,  # query and key lengths (Tq <= Tk when CAUSAL)
    sm_scale,  # softmax scale (1/sqrt(D) by default)
    dropout_p,  # probability of dropping an attention weight (used when DROPOUT)
    SEED,  # (1,) int64: the Philox seed of the dropout mask, < 2**31 (read only when DROPOUT)
    TQ_KEY, TK_KEY,  # autotune keys only: Tq and Tk rounded up to a power of two (not read)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two; columns >= D are masked
    CAUSAL: tl.constexpr,  # mask keys j > i + Tk - Tq
    DROPOUT: tl.constexpr,  # apply dropout to the attention weights
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
):
    FP32: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first: better balance across the last wave
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D), stays in registers
    qk_scale = sm_scale * LOG2E  # log2(e) folded in: exp(x) = exp2(x * log2(e))
    seed_key = _philox_key(SEED, bh, DROPOUT)
    OFF = Tk - Tq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of p v

    # keys every row of the block sees in full: j <= start_m + OFF; the diagonal band after that, up to the
    # last row's last key (start_m + BLOCK_M - 1 + OFF), is masked; nothing beyond it runs
    lo_full, hi = _key_range(start_m, Tk, OFF, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                                    start_m, offs_m, offs_d, 0, lo_full, Tk, OFF, qk_scale, dropout_p, seed_key,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DROPOUT, FP32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                                    start_m, offs_m, offs_d, lo_full, hi, Tk, OFF, qk_scale, dropout_p, seed_key,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DROPOUT, FP32)

    out = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D)
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log: * ln(2)
    row_ok = offs_m < Tq
    tl.store(LSE + bh * Tq + offs_m, lse, mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_fwd_splitk(
    Q, K, V,  # (B, H, Tq, D) queries (Tq <= BLOCK_M), (B, H, Tk, D) keys and values, any strides
    O_PART,  # (B*H, SPLITS, Tq, BLOCK_D) fp32 output: each split's normalised output
    LSE_PART,  # (B*H, SPLITS, Tq) fp32 output: each split's log-sum-exp (natural log; -inf: no key seen)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of Q (batch, head, time, feature)
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vt, stride_vd,  # strides of V
    H,  # number of heads: program_id(1) = batch * H + head
    Tq, Tk,  # query and key lengths
    sm_scale,  # softmax scale
    dropout_p,  # probability of dropping an attention weight (used when DROPOUT)
    SEED,  # (1,) int64: the Philox seed of the dropout mask (read only when DROPOUT)
    keys_per_split,  # keys of one split (program_id(0)), a multiple of BLOCK_N
    TQ_KEY, TK_KEY,  # autotune keys only: Tq and keys_per_split rounded up to a power of two (not read)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= Tq: every query row in one program
    BLOCK_N: tl.constexpr,  # keys per loop step
):
    """Flash-decoding: the forward over one split of the keys for all (<= BLOCK_M) query rows; the
    partial outputs and log-sum-exps are merged by ``_attn_splitk_combine``."""
    FP32: tl.constexpr = Q.dtype.element_ty == tl.float32
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * LOG2E
    seed_key = _philox_key(SEED, bh, DROPOUT)
    OFF = Tk - Tq
    lo = split * keys_per_split
    end = tl.minimum(lo + keys_per_split, Tk)
    lo_full, hi = _key_range(0, Tk, OFF, BLOCK_M, BLOCK_N, CAUSAL)  # every query row is in this program
    end = tl.minimum(end, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                                    0, offs_m, offs_d, lo, tl.minimum(end, lo_full), Tk, OFF, qk_scale, dropout_p,
                                    seed_key, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DROPOUT, FP32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                                    0, offs_m, offs_d, tl.maximum(lo, lo_full), end, Tk, OFF, qk_scale, dropout_p,
                                    seed_key, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DROPOUT, FP32, True)
    seen = l_i > 0.0  # (BLOCK_M,) False for a row none of whose keys lie in this split
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # (BLOCK_M, BLOCK_D), 0 where nothing was seen
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    row_ok = offs_m < Tq
    part = (bh * tl.num_programs(0) + split) * Tq + offs_m  # (BLOCK_M,) row index into the partials
    tl.store(LSE_PART + part, lse, mask=row_ok)
    tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])


@triton.jit
def _attn_splitk_combine(
    O_PART, LSE_PART,  # (B*H, SPLITS, Tq, BLOCK_D) and (B*H, SPLITS, Tq) fp32: the splits' results
    O,  # (B, H, Tq, D) output, strides stride_o*
    LSE,  # (B*H, Tq) fp32 output: the rows' log-sum-exp over all keys
    stride_ob, stride_oh, stride_ot, stride_od,  # strides of O
    H, Tq, SPLITS,  # heads, query length, number of splits
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits per loop step
):
    """One query row: lse = logsumexp_s lse_s and o = sum_s exp(lse_s - lse) o_s, over the splits s."""
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)  # running max of lse_s, per lane
    for s0 in range(0, SPLITS, BLOCK_S):
        part = (bh * SPLITS + s0 + offs_s) * Tq + row  # (BLOCK_S,)
        m = tl.maximum(m, tl.load(LSE_PART + part, mask=s0 + offs_s < SPLITS, other=float("-inf")))
    m_all = tl.max(m, 0)  # finite: every row sees at least one key, in some split
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        ok = s0 + offs_s < SPLITS
        part = (bh * SPLITS + s0 + offs_s) * Tq + row  # (BLOCK_S,)
        w = tl.exp(tl.load(LSE_PART + part, mask=ok, other=float("-inf")) - m_all)  # 0: split saw none of the row
        total += w
        acc += w[:, None] * tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    total_all = tl.sum(total, 0)
    out = tl.sum(acc, 0) / total_all  # (BLOCK_D,)
    tl.store(LSE + bh * Tq + row, m_all + tl.log(total_all))
    tl.store(O + b * stride_ob + h * stride_oh + row * stride_ot + offs_d * stride_od, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _attn_bwd_preprocess(
    O, DO,  # (B, H, Tq, D) forward output and its gradient, any strides
    DELTA,  # (B*H, Tq) fp32 output: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,  # strides of O
    stride_dob, stride_doh, stride_dot, stride_dod,  # strides of DO
    H, Tq,  # heads (program_id(1) = batch * H + head), query length
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D and D rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows per program
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :] * stride_dod, offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,  # (BLOCK_N, BLOCK_D) fp32 accumulators; this program's k, v tiles
                         Qb, DOb, LSEb, DELTAb,  # this (batch, head)'s Q, dO, lse and delta base pointers
                         stride_qt, stride_qd, stride_dot, stride_dod,  # time and feature strides of Q, dO
                         start_n, offs_d,  # first key of this program's block; (BLOCK_D,) feature columns
                         lo, hi,  # query range [lo, hi) of this stage, lo a multiple of BLOCK_M
                         Tq, Tk, OFF,  # lengths; OFF = Tk - Tq
                         qk_scale,  # softmax scale * log2(e)
                         dropout_p, seed_key,  # dropout probability and Philox key (used when DROPOUT)
                         DQb, stride_dqt, stride_dqd,  # fp32 dQ accumulator of this (batch, head) (ATOMIC_DQ)
                         sm_scale,  # softmax scale, folded into the dQ contributions (ATOMIC_DQ)
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr,
                         MASK_CAUSAL: tl.constexpr,  # zero the weights above the diagonal
                         MASK_ROWS: tl.constexpr,  # guard loads of query rows >= Tq
                         DROPOUT: tl.constexpr, FP32: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr):  # also add dS K (this key block's share of dQ) into DQb
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0  # (BLOCK_M,)
        q = _load_tile(Qb + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, offs_m, Tq, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_ROWS)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DOb + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, offs_m, Tq, offs_d,
                        HEAD_DIM, BLOCK_D, MASK_ROWS)  # (BLOCK_M, BLOCK_D)
        if MASK_ROWS:
            lse2 = tl.load(LSEb + offs_m, mask=offs_m < Tq, other=float("inf")) * LOG2E
            delta = tl.load(DELTAb + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
        else:
            lse2 = tl.load(LSEb + offs_m) * LOG2E  # (BLOCK_M,) lse in the log2 domain
            delta = tl.load(DELTAb + offs_m)
        sT = _mm(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])  # softmax weights, transposed; 0 on padded rows
        if MASK_CAUSAL:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + OFF, pT, 0.0)
        dpT = _mm(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32)  # dO v^T, transposed
        if DROPOUT:
            keepT = _dropout_keep(seed_key, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N, True)  # (BLOCK_N, BLOCK_M)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = _mm(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do, dv, FP32)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            dv = _mm(pT.to(do.dtype), do, dv, FP32)
        dsT = pT * (dpT - delta[None, :])  # (BLOCK_N, BLOCK_M) gradient of the scores, transposed
        dk = _mm(dsT.to(q.dtype), q, dk, FP32)
        if ATOMIC_DQ:  # the fifth matmul: dQ[rows] += dS K * scale, summed over key blocks by atomics
            dqT = _mm(tl.trans(k), dsT.to(k.dtype), tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32), FP32)
            dq_ptrs = DQb + offs_m[None, :] * stride_dqt + offs_d[:, None] * stride_dqd  # (BLOCK_D, BLOCK_M)
            tl.atomic_add(dq_ptrs, dqT * sm_scale, mask=(offs_m[None, :] < Tq) & (offs_d[:, None] < HEAD_DIM),
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D) forward inputs, any strides
    DO,  # (B, H, Tq, D) gradient of the output, any strides
    DK, DV,  # (B, H, Tk, D) outputs: gradients of K and V, strides stride_dk*
    DQ,  # (B, H, Tq, D) fp32, zeroed: dQ accumulated with atomics when ATOMIC_DQ (else unused)
    LSE, DELTA,  # (B*H, Tq) fp32: forward log-sum-exp (natural log) and rowsum(dO * O)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vt, stride_vd,  # strides of V
    stride_dob, stride_doh, stride_dot, stride_dod,  # strides of DO
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # strides of DK and DV (allocated alike)
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,  # strides of DQ (when ATOMIC_DQ)
    H,  # number of heads: program_id(1) = batch * H + head
    Tq, Tk,  # query and key lengths
    sm_scale,  # softmax scale
    dropout_p,  # dropout probability (used when DROPOUT)
    SEED,  # (1,) int64: the Philox seed of the forward's dropout mask (read only when DROPOUT)
    TQ_KEY, TK_KEY,  # autotune keys only: Tq and Tk rounded up to a power of two (not read)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D and D rounded up to a power of two
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,  # as in the forward
    ATOMIC_DQ: tl.constexpr,  # also compute dQ (the 5-matmul backward; the dQ kernel is then not run)
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # keys per program
):
    FP32: tl.constexpr = Q.dtype.element_ty == tl.float32
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                   offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                   offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, BLOCK_D)
    Qb = Q + b * stride_qb + h * stride_qh
    DOb = DO + b * stride_dob + h * stride_doh
    DQb = DQ + b * stride_dqb + h * stride_dqh
    LSEb = LSE + bh * Tq
    DELTAb = DELTA + bh * Tq
    qk_scale = sm_scale * LOG2E
    seed_key = _philox_key(SEED, bh, DROPOUT)
    OFF = Tk - Tq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    m_full = (Tq // BLOCK_M) * BLOCK_M  # query blocks below this have no rows past Tq
    if CAUSAL:
        # query i sees key j iff i >= j - OFF: start at the block holding the first row that sees
        # start_n; rows >= start_n + BLOCK_N - 1 - OFF see the whole key block, the rest are masked
        m_lo = (tl.maximum(start_n - OFF, 0) // BLOCK_M) * BLOCK_M
        m_diag = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - OFF, 0), BLOCK_M) * BLOCK_M
        m_diag = tl.minimum(m_diag, tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qt, stride_qd, stride_dot,
                                      stride_dod, start_n, offs_d, m_lo, m_diag, Tq, Tk, OFF, qk_scale, dropout_p,
                                      seed_key, DQb, stride_dqt, stride_dqd, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                      BLOCK_N, True, True, DROPOUT, FP32, ATOMIC_DQ)
    else:
        m_diag = 0
    # rows that see every key of this block: no masks, then the ragged last query block (if any)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qt, stride_qd, stride_dot,
                                  stride_dod, start_n, offs_d, m_diag, m_full, Tq, Tk, OFF, qk_scale, dropout_p,
                                  seed_key, DQb, stride_dqt, stride_dqd, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                  BLOCK_N, False, False, DROPOUT, FP32, ATOMIC_DQ)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qt, stride_qd, stride_dot,
                                  stride_dod, start_n, offs_d, tl.maximum(m_diag, m_full), Tq, Tq, Tk, OFF,
                                  qk_scale, dropout_p, seed_key, DQb, stride_dqt, stride_dqd, sm_scale, HEAD_DIM,
                                  BLOCK_D, BLOCK_M, BLOCK_N, False, True, DROPOUT, FP32, ATOMIC_DQ)

    dk = dk * sm_scale  # ds was taken w.r.t. the scaled scores
    mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    tile = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta,  # (BLOCK_M, BLOCK_D) fp32 accumulator; q, dO tiles; row stats
                       Kb, Vb,  # this (batch, head)'s K and V base pointers
                       stride_kt, stride_kd, stride_vt, stride_vd,  # time and feature strides of K and V
                       start_m, offs_m, offs_d,  # first query row; (BLOCK_M,) its rows; (BLOCK_D,) features
                       lo, hi,  # key range [lo, hi) of this stage, lo a multiple of BLOCK_N
                       Tk, OFF,  # number of keys; OFF = Tk - Tq
                       qk_scale,  # softmax scale * log2(e)
                       dropout_p, seed_key,  # dropout probability and Philox key (used when DROPOUT)
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr,  # mask keys >= Tk and, if CAUSAL, keys above the diagonal
                       CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, FP32: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0  # (BLOCK_N,)
        k = _load_tile(Kb + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, offs_n, Tk, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(Vb + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, offs_n, Tk, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        s = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), FP32)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])  # softmax weights
        if MASKED:
            ok = offs_n[None, :] < Tk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + OFF)
            p = tl.where(ok, p, 0.0)
        dp = _mm(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), FP32)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed_key, start_m, start_n, dropout_p, q.shape[0], BLOCK_N, False)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = _mm(ds.to(k.dtype), k, dq, FP32)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D) forward inputs, any strides
    DO,  # (B, H, Tq, D) gradient of the output, any strides
    DQ,  # (B, H, Tq, D) output: gradient of Q, strides stride_dq*
    LSE, DELTA,  # (B*H, Tq) fp32: forward log-sum-exp (natural log) and rowsum(dO * O)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kt, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vt, stride_vd,  # strides of V
    stride_dob, stride_doh, stride_dot, stride_dod,  # strides of DO
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,  # strides of DQ
    H,  # number of heads: program_id(1) = batch * H + head
    Tq, Tk,  # query and key lengths
    sm_scale,  # softmax scale
    dropout_p,  # dropout probability (used when DROPOUT)
    SEED,  # (1,) int64: the Philox seed of the forward's dropout mask (read only when DROPOUT)
    TQ_KEY, TK_KEY,  # autotune keys only: Tq and Tk rounded up to a power of two (not read)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D and D rounded up to a power of two
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,  # as in the forward
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop step
):
    FP32: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :] * stride_dod, offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    row_ok = offs_m < Tq
    lse2 = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=0.0) * LOG2E  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * LOG2E
    seed_key = _philox_key(SEED, bh, DROPOUT)
    OFF = Tk - Tq
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo_full, hi = _key_range(start_m, Tk, OFF, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd, start_m,
                            offs_m, offs_d, 0, lo_full, Tk, OFF, qk_scale, dropout_p, seed_key, HEAD_DIM, BLOCK_D,
                            BLOCK_N, False, CAUSAL, DROPOUT, FP32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd, start_m,
                            offs_m, offs_d, lo_full, hi, Tk, OFF, qk_scale, dropout_p, seed_key, HEAD_DIM, BLOCK_D,
                            BLOCK_N, True, CAUSAL, DROPOUT, FP32)
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_mask_kernel(
    KEEP,  # (B*H, Tq, Tk) int8 output: 1 where the attention kernels keep the weight
    Tq, Tk,  # query and key lengths
    dropout_p,  # dropout probability
    SEED,  # (1,) int64: the Philox seed
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile of (rows, keys) per program
):
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    keep = _dropout_keep(_philox_key(SEED, bh, True), tl.program_id(1) * BLOCK_M, tl.program_id(2) * BLOCK_N, dropout_p,
                         BLOCK_M, BLOCK_N, False)
    ptrs = KEEP + bh * Tq * Tk + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ============================================================================================ configs


@dataclass(frozen=True)
class _Config:
    """One launch configuration: tile sizes, warps, pipeline stages, and the inputs it serves."""

    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    block_d: tuple = (64, 128)  # padded head dims (BLOCK_D) it serves: 64 covers D <= 64, 128 covers 80..128
    dropout_block_d: tuple = (64, 128)  # the BLOCK_Ds at which it also serves dropout (more registers)
    fp32: bool = False  # serves fp32 inputs (smaller tiles: twice the bytes per element), not 16-bit ones
    archs: tuple = (80, 90)  # GPU families it serves (see _arch_family): 80 = warp MMA, 90 = warpgroup MMA

    def serves(self, block_d: int, dropout: bool, fp32: bool, arch: int = 90) -> bool:
        return (self.fp32 == fp32 and arch in self.archs
                and max(block_d, 64) in (self.dropout_block_d if dropout else self.block_d))

    @property
    def launch(self) -> tuple:
        """What the GPU runs: (BLOCK_M, BLOCK_N, warps, stages). A table may list one launch several times,
        once per set of inputs it serves (a tile checked at D = 64 and, separately, at D = 128)."""
        return (self.block_m, self.block_n, self.num_warps, self.num_stages)

    def triton_config(self) -> triton.Config:
        return _triton_config(self.launch)


def _triton_config(launch: tuple) -> triton.Config:
    block_m, block_n, num_warps, num_stages = launch
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# The autotuner's candidates for each kernel: the single source for both the autotuner and compile_cases(),
# which compiles each at every BLOCK_D it serves, with and without dropout as it serves them, for the GPU
# families it serves, and finds no spills on sm_80 or sm_90 with Triton 3.6 and 3.9. A config that
# spills in some variant is restricted (block_d / dropout_block_d / archs) rather than listed for it.
# Forward and dQ: one program per BLOCK_M query rows, looping over BLOCK_N keys; dK/dV: one program per
# BLOCK_N keys, looping over BLOCK_M query rows (its products have BLOCK_N rows). On sm_90 every 16-bit
# config whose products have >= 64 rows runs them all as warpgroup MMAs (HGMMA) at least 32 wide:
# 8 warps on a 64-row product would split it into two HGMMA.64x16 halves (tests/gpt_kernels/test_sass.py).
# Short lengths prune the big tiles (see _prune_for). bench/README.md has the SASS figures behind them.
FWD_CONFIGS = (
    _Config(128, 128, 8, 3, block_d=(64,), dropout_block_d=()),  # with dropout 1.66x the SASS: 64 masks/thread
    _Config(128, 128, 8, 2, block_d=(128,), dropout_block_d=(), archs=(90,)),  # 255 regs, 160 KB smem
    _Config(128, 64, 8, 3, dropout_block_d=(64,)),
    _Config(128, 32, 8, 3, block_d=(128,), dropout_block_d=(128,)),  # D=128 with dropout: fewer registers
    _Config(64, 64, 4, 3, dropout_block_d=(64,)),
    _Config(64, 32, 4, 3, block_d=(64,), dropout_block_d=(64, 128)),
    _Config(16, 64, 4, 3, dropout_block_d=(128,)),  # decoding: Tq <= 16 query rows
    _Config(16, 128, 4, 2, block_d=(128,), dropout_block_d=(64,)),  # decoding
    _Config(32, 32, 8, 2, block_d=(64,), dropout_block_d=(64,), fp32=True),
    _Config(16, 32, 4, 2, fp32=True),
)
# Triton 3.6 and 3.9 spill on opposite sides of dK/dV's D = 128 dropout tile on sm_90 (3.6: 2 stages
# fit, 1 does not; 3.9: the reverse), so that one config depends on the installed release.
_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])
_DKDV_D128_DROPOUT_STAGES = 2 if _TRITON < (3, 7) else 1
DKDV_CONFIGS = (
    _Config(32, 128, 8, 2, block_d=(64,), dropout_block_d=(64,)),
    _Config(64, 128, 8, 3, block_d=(64,), dropout_block_d=(), archs=(90,)),  # HGMMA.64x64 for the scores
    _Config(32, 64, 4, 2, block_d=(64,), dropout_block_d=(64,)),
    _Config(32, 128, 8, 2, block_d=(128,), dropout_block_d=(128,) if _DKDV_D128_DROPOUT_STAGES == 2 else (),
            archs=(90,)),
    *((_Config(32, 128, 8, 1, block_d=(), dropout_block_d=(128,), archs=(90,)),)
      if _DKDV_D128_DROPOUT_STAGES == 1 else ()),
    _Config(32, 64, 8, 3, block_d=(128,), dropout_block_d=(), archs=(80,)),  # HGMMA.64x16 on sm_90
    # with dropout 3 stages spill at head dim 80 (8 bytes, Triton 3.9); 2 stages neither at 80 nor at 128
    _Config(32, 64, 8, 2, block_d=(), dropout_block_d=(128,), archs=(80,)),
    _Config(16, 16, 8, 2, fp32=True),
)
DQ_CONFIGS = (
    _Config(128, 64, 8, 3, block_d=(64,), dropout_block_d=(64,)),
    _Config(128, 64, 8, 2, block_d=(128,), dropout_block_d=(128,), archs=(90,)),
    _Config(128, 32, 8, 3),
    _Config(64, 64, 4, 3, dropout_block_d=(64,)),
    _Config(64, 32, 4, 3),
    _Config(16, 32, 8, 2, fp32=True),
)
# The 5-matmul backward (dK/dV kernel with atomic dQ): the dQ accumulator and product cost registers,
# so it serves 16-bit inputs at D <= 64 only; elsewhere the atomic option runs the deterministic
# backward (_backward).
BWD_ATOMIC_CONFIGS = (
    _Config(32, 64, 4, 3, block_d=(64,), dropout_block_d=(64,)),
)
# Flash-decoding (Tq <= 16): BLOCK_M = 16 holds every query row; splits are multiples of SPLITK_KEYS keys.
SPLITK_CONFIGS = (
    _Config(16, 64, 4, 3),
    _Config(16, 128, 4, 2),
    _Config(16, 32, 4, 2, fp32=True),
)
SPLITK_KEYS = 128  # split lengths are multiples of this, the largest BLOCK_N above
SPLITK_MAX_TQ = 16  # the longest query block the split-K path takes (its BLOCK_M)
SPLITK_COMBINE_BLOCK = 16  # splits the merge kernel reads per step
PREPROCESS_BLOCK_M = 64
PREPROCESS_WARPS = 8  # 4 warps spill on sm_100 at head dim 64 (24 bytes, Triton 3.9's ptxas); 8 nowhere
MASK_BLOCK = 64

# Under TRITON_INTERPRET=1 there is no autotuning: one small config per kernel, not square, so the
# diagonal logic is exercised with BLOCK_M != BLOCK_N. Tests may swap these (monkeypatch) to cover others.
INTERPRET_CONFIGS = {
    "fwd": _Config(32, 16, 4, 1),
    "dkdv": _Config(16, 32, 4, 1),
    "dq": _Config(32, 16, 4, 1),
    "bwd_atomic": _Config(16, 32, 4, 1),
    "splitk": _Config(16, 16, 4, 1),
}
# Set to {"fwd": _Config, ...} to bypass the autotuner on a GPU (the GPU tests run every config this way).
FORCE_CONFIGS: dict | None = None
# GPT_KERNELS_AUTOTUNE=first: each autotuned launch takes the first config its pruning leaves: one compile
# per kernel variant instead of one per candidate (Triton 3.6 still times that one; 3.9 does not).
# `python -m bench.gpu_check` sets it for the GPU tests on a cold cache (test_gpu_every_autotune_config
# still runs every config); "all" (default) times them.
AUTOTUNE_ENV = "GPT_KERNELS_AUTOTUNE"


def _autotune_first() -> bool:
    mode = os.environ.get(AUTOTUNE_ENV, "all").strip().lower() or "all"
    if mode not in ("all", "first"):
        raise ValueError(f"${AUTOTUNE_ENV}={mode!r}: use 'all' (time every config) or 'first' (take the first)")
    return mode == "first"
# The backward :func:`attention` runs: False, the deterministic 7-matmul one (dK/dV kernel, then dQ
# kernel); True, the 5-matmul one with atomic fp32 dQ where its configs serve the inputs (faster where
# the recomputation costs more than the atomics; dq's last bits then vary run to run). bench_attention
# times both (providers triton and triton-atomic).
ATOMIC_DQ_BACKWARD = False
# Split-K forward for Tq <= SPLITK_MAX_TQ: None picks the number of splits (_splitk_splits); an int forces
# it (1: never split). bench_attention's decoding cases time both (triton and triton-nosplit).
SPLIT_K: int | None = None


def _bucket(n: int) -> int:
    """The autotune key for a length: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


def family_of(capability: int) -> int:
    """The family of compiled code the configs were checked for (``_Config.archs``; compile_check: registers,
    no spills) of compute capability ``capability`` (86 for 8.6): 80 for the GPUs whose tensor cores take
    warp-level MMAs (8.x: A100, and the consumer Ampere and Ada parts; 12.x: consumer Blackwell, which has no
    warpgroup MMA either), 90 for those with warpgroup MMAs (Hopper, 9.x; datacenter Blackwell, 10.x and
    11.x). Shared memory is a separate limit, per device (:func:`_smem_limit`): sm_86 and sm_89 are family 80
    with 99 KB a program against an A100's 163 KB. The compile check compiles each config for the
    capabilities of the families it serves."""
    return 90 if capability // 10 in (9, 10, 11) else 80


def _arch_family(device: torch.device) -> int:
    """The config family of ``device`` (:func:`family_of`); off CUDA 90 (the interpreter's tests), or the
    family of the GPU a plan names (gpt_kernels.precompile)."""
    if device.type != "cuda":
        plan = planning()  # a plan made without a GPU stands for the GPU it names
        return 90 if plan is None else family_of(plan.capability)
    major, minor = torch.cuda.get_device_capability(device)
    return family_of(10 * major + minor)


def _smem_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on ``device`` (bytes), or None (no limit: the interpreter)."""
    return smem_per_block(device)


def _kernel_table(name: str) -> tuple[tuple, str]:
    """(the config table of kernel ``name``, the tile its programs own along the length: BLOCK_M or BLOCK_N)."""
    return {"fwd": (FWD_CONFIGS, "BLOCK_M"), "dkdv": (DKDV_CONFIGS, "BLOCK_N"), "dq": (DQ_CONFIGS, "BLOCK_M"),
            "bwd_atomic": (BWD_ATOMIC_CONFIGS, "BLOCK_N"), "splitk": (SPLITK_CONFIGS, "BLOCK_M")}[name]


def _served(name: str, block_d: int, dropout: bool, fp32: bool, arch: int) -> list[tuple]:
    """The launches of kernel ``name``'s table that serve these inputs (padded head dim, dropout setting,
    dtype, GPU family), each once, in table order: a launch listed for D = 64 and again for D = 128 is
    found by either entry."""
    launches = []
    for c in _kernel_table(name)[0]:
        if c.serves(block_d, dropout, fp32, arch) and c.launch not in launches:
            launches.append(c.launch)
    return launches


def _candidates(name: str, block_d: int, dropout: bool, fp32: bool, arch: int, length: int,
                fits_smem=None) -> list[tuple]:
    """The launches the autotuner weighs for kernel ``name``, each once: those :func:`_served` gives whose
    program tile fits ``length`` (the length bucket its programs span: Tq for the forward and dQ, Tk for
    dK/dV), the tiny ones dropped where the length allows a 64+ tile, and whose shared memory fits the GPU
    (``fits_smem(launch)``; None: no limit). When none of those fits the GPU's shared memory, the
    smallest-tile served launch that does. Only the first under GPT_KERNELS_AUTOTUNE=first (and only
    that one measured). Raises when no launch serves the inputs on this GPU."""
    served = _served(name, block_d, dropout, fp32, arch)
    tile = 0 if _kernel_table(name)[1] == "BLOCK_M" else 1
    by_length = [launch for launch in served if min(64, length) <= launch[tile] <= length]
    rest = sorted((launch for launch in served if launch not in by_length), key=lambda launch: launch[tile])
    fits = fits_smem or (lambda launch: True)
    first = _autotune_first()
    kept = []
    for launch in by_length:
        if fits(launch):
            kept.append(launch)
            if first:
                break
    if not kept:
        kept = next(([launch] for launch in rest if fits(launch)), [])
    if not kept:
        raise RuntimeError(f"attention: no {name} kernel configuration serves head dim <= {block_d} with "
                           f"{'fp32' if fp32 else '16-bit'} inputs{' and dropout' if dropout else ''} within this "
                           f"GPU's shared memory (family sm_{arch}); use GPT_KERNELS=torch")
    return kept


def _smem_used(kernel, launch: tuple, args: dict) -> int:
    """Bytes of shared memory ``kernel`` takes at ``launch`` for these arguments, read from its compiled
    binary. Compiled as the launch would (Triton's JIT caches it: the autotuner's trial or the launch
    that follows does not compile it again), not loaded: loading is where Triton refuses a kernel whose
    shared memory exceeds the GPU's."""
    compiled = kernel.warmup(**args, **_triton_config(launch).all_kwargs(), grid=(1,))
    return int(compiled.metadata.shared)


def _prune_for(name: str, kernel):
    """The autotuner's ``early_config_prune`` for kernel ``name``: the triton configs of
    :func:`_candidates` for the inputs of this launch (dtype, head dim, dropout, length) on the inputs'
    GPU: its family, and its shared memory per program, against which each candidate's compiled size is
    held (sm_86 and sm_89 have 99 KB where an A100 has 163 KB)."""
    length_key = "TQ_KEY" if _kernel_table(name)[1] == "BLOCK_M" else "TK_KEY"

    def prune(triton_configs, named_args, **kwargs):
        # the launch's arguments, without what Triton's launch machinery adds to them (grid, warmup)
        args = {k: v for k, v in {**named_args, **kwargs}.items() if k not in ("grid", "warmup")}
        q = args["Q"]
        limit = _smem_limit(q.device)
        fits = None if limit is None else (lambda launch: _smem_used(kernel, launch, args) <= limit)
        keep = _candidates(name, args["BLOCK_D"], args["DROPOUT"], q.dtype == torch.float32, _arch_family(q.device),
                           args[length_key], fits)
        by_launch = {(tc.kwargs["BLOCK_M"], tc.kwargs["BLOCK_N"], tc.num_warps, tc.num_stages): tc
                     for tc in triton_configs}
        return [by_launch[launch] for launch in keep]

    return prune


_AUTOTUNED: dict = {}
# each autotuned launch's kernel
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "bwd_atomic": _attn_bwd_dkdv,
            "splitk": _attn_fwd_splitk}


def _launches(name: str) -> list[tuple]:
    """The distinct launches of kernel ``name``'s table (one launch may serve several head dims)."""
    return list(dict.fromkeys(c.launch for c in _kernel_table(name)[0]))


def _autotuned(name: str):
    """The autotuned wrapper of a kernel, built on first use (never at import: no CUDA touched then). Its
    configs are the table's distinct launches (one launch may serve several head dims: it is timed once)."""
    if name not in _AUTOTUNED:
        kernel, launches = _KERNELS[name], _launches(name)
        _AUTOTUNED[name] = triton.autotune(
            configs=[_triton_config(launch) for launch in launches],
            key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "DROPOUT"],  # + the tensors' dtypes, automatically
            prune_configs_by={"early_config_prune": _prune_for(name, kernel)},
            reset_to_zero=["DQ"] if name == "bwd_atomic" else None,  # each trial adds into DQ
        )(kernel)
    return _AUTOTUNED[name]


def _launch(name: str, kernel, grid_rows: int, grid_other: int, args: dict, tile: str | None) -> None:
    """Launch ``kernel`` with the interpreter's config, a forced one, or through the autotuner.

    Grid: (cdiv(grid_rows, tile size), grid_other) where ``tile`` is "BLOCK_M" or "BLOCK_N"; with
    ``tile=None``, (grid_rows, grid_other) whatever the tile.
    """
    forced = INTERPRET_CONFIGS[name] if interpreter_enabled() else (FORCE_CONFIGS or {}).get(name)
    if forced is None and planning() is not None:  # recording a plan: each config the autotuner would time
        kernel = _KERNELS[name]
        for tc in _prune_for(name, kernel)([_triton_config(launch) for launch in _launches(name)], args):
            size = 1 if tile is None else tc.kwargs[tile]
            kernel[(triton.cdiv(grid_rows, size), grid_other)](**args, **tc.all_kwargs(), **LAUNCH_OPTIONS)
        return
    if forced is not None:
        size = 1 if tile is None else forced.block_m if tile == "BLOCK_M" else forced.block_n
        kernel[(triton.cdiv(grid_rows, size), grid_other)](
            **args, BLOCK_M=forced.block_m, BLOCK_N=forced.block_n, num_warps=forced.num_warps,
            num_stages=forced.num_stages, **LAUNCH_OPTIONS)
        return
    grid = lambda meta: (triton.cdiv(grid_rows, meta[tile] if tile else 1), grid_other)
    _autotuned(name)[grid](**args, **LAUNCH_OPTIONS)


# =========================================================================================== launchers


def _check_tensors(q, k, v) -> None:
    """q, k, v are 4-D tensors (what autocast's cast needs before the other checks)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}; "
                             f"split heads first, e.g. x.view(B, T, H, D).transpose(1, 2)")


def _check_args(q, k, v, causal, dropout_p, scale) -> None:
    """Raise a clear error for arguments no backend computes attention for: every backend runs this
    before its path is chosen, so each refuses the same inputs with the same message."""
    _check_tensors(q, k, v)
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; "
                         f"move them with .to(device)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must be floating point, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and "
                         f"head dim (B, H, T, D); only the lengths may differ")
    Tk = k.shape[2]
    if Tk == 0 and Tq > 0:
        raise ValueError("attention: k and v have no positions (Tk = 0): every query needs at least one key")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk (queries are the last Tq of the Tk "
                         f"positions), got Tq={Tq} > Tk={Tk}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")


def _check_inputs(q, k, v, causal, dropout_p, scale) -> None:
    """:func:`_check_args`, then what the Triton kernels add: their dtypes, head dims and grid."""
    _check_args(q, k, v, causal, dropout_p, scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention: dtype {q.dtype} is not supported by the Triton kernel: use float16, "
                        f"bfloat16 or float32 (or GPT_KERNELS=torch)")
    B, H, _, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported by the Triton kernel; supported head dims: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))} (or use GPT_KERNELS=torch)")
    if B * H > 65535:
        raise ValueError(f"attention: B * H = {B * H} exceeds the kernels' grid limit of 65535; split the batch")


def effective_dropout_p(dropout_p: float) -> float:
    """The dropout probability the kernels apply for ``dropout_p``: a multiple of 1/256.

    Each keep-decision compares one random byte with a threshold t, so the kernels drop a weight with
    probability t / 256, t = round(256 * dropout_p) clamped to [1, 255] (0 only for dropout_p = 0), and
    scale the kept ones by 1 / (1 - t / 256): unbiased for the probability applied. 0.1 gives 26/256 =
    0.1016. Pass this value to ``reference.attention`` with :func:`attention_dropout_mask`'s mask.
    """
    p = float(dropout_p)
    return 0.0 if p <= 0.0 else min(255, max(1, round(p * 256.0))) / 256.0


def _fits_int32(x: torch.Tensor) -> torch.Tensor:
    """``x`` if every in-head offset (t * stride_t + d * stride_d) fits in int32, else a contiguous copy."""
    span = (x.shape[2] - 1) * abs(x.stride(2)) + (x.shape[3] - 1) * abs(x.stride(3))
    return x if span < 2**31 else x.contiguous()


def _empty_like_layout(x: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised (B, H, T, D) tensor laid out like ``x``: (B, T, H, D) memory if x's heads are
    interleaved within each time step (a view of a fused qkv projection), so the caller's
    ``.transpose(1, 2).reshape(B, T, C)`` afterwards is free; plain (B, H, T, D) otherwise."""
    B, H, T, D = x.shape if shape is None else shape
    dtype = x.dtype if dtype is None else dtype
    if H > 1 and T > 1 and x.stride(1) < x.stride(2):
        return torch.empty(B, T, H, D, device=x.device, dtype=dtype).transpose(1, 2)  # (B, H, T, D) view
    return torch.empty(B, H, T, D, device=x.device, dtype=dtype)


def _strides(x: torch.Tensor) -> tuple:
    return tuple(x.stride())


def _head_dims(D: int) -> dict:
    return {"HEAD_DIM": D, "BLOCK_D": triton.next_power_of_2(D)}


def _seed_tensor(seed, device) -> torch.Tensor | None:
    """The dropout seed as the kernels read it: a (1,) int64 tensor on ``device`` (ints are converted)."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


@on_inputs_device
def _forward(q, k, v, causal: bool, dropout_p: float, scale: float, seed, o=None, lse=None):
    """Run the forward kernel (or flash-decoding, see _splitk_plan); returns ``(o, lse)``: (B, H, Tq, D)
    output and (B, H, Tq) fp32 log-sum-exp.

    ``seed``: a (1,) int64 tensor on q's device or an int (read only with dropout). ``o``/``lse`` may be
    passed preallocated (tests poison them to catch unwritten elements).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dropout_p = effective_dropout_p(dropout_p)
    o = _empty_like_layout(q) if o is None else o
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32) if lse is None else lse
    if o.numel() == 0:
        return o, lse
    q, k, v = _fits_int32(q), _fits_int32(k), _fits_int32(v)
    seed = _seed_tensor(seed, q.device) if dropout_p > 0.0 else lse  # lse stands in for an unread pointer
    splits, keys_per_split = _splitk_plan(B * H, Tq, Tk, q.device)
    if splits > 1:
        _forward_splitk(q, k, v, o, lse, causal, dropout_p, scale, seed, splits, keys_per_split)
        return o, lse
    args = dict(Q=q, K=k, V=v, O=o, LSE=lse,
                **dict(zip(("stride_qb", "stride_qh", "stride_qt", "stride_qd"), _strides(q))),
                **dict(zip(("stride_kb", "stride_kh", "stride_kt", "stride_kd"), _strides(k))),
                **dict(zip(("stride_vb", "stride_vh", "stride_vt", "stride_vd"), _strides(v))),
                **dict(zip(("stride_ob", "stride_oh", "stride_ot", "stride_od"), _strides(o))),
                H=H, Tq=Tq, Tk=Tk, sm_scale=float(scale), dropout_p=float(dropout_p), SEED=seed,
                TQ_KEY=_bucket(Tq), TK_KEY=_bucket(Tk), **_head_dims(D), CAUSAL=bool(causal),
                DROPOUT=dropout_p > 0.0)
    _launch("fwd", _attn_fwd, Tq, B * H, args, "BLOCK_M")
    return o, lse


def _atomic_dq_served(D: int, dropout: bool, q: torch.Tensor) -> bool:
    """Whether a BWD_ATOMIC_CONFIGS entry serves this head dim, dropout setting, dtype and GPU (always
    under the interpreter, whose configs are fixed); else the atomic option runs the deterministic path."""
    if interpreter_enabled() or (FORCE_CONFIGS or {}).get("bwd_atomic") is not None:
        return True
    return bool(_served("bwd_atomic", triton.next_power_of_2(D), dropout, q.dtype == torch.float32,
                        _arch_family(q.device)))


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 under the CPU interpreter, so tests split)."""
    if device.type != "cuda":
        plan = planning()  # a plan made without a GPU stands for the GPU it names
        return 4 if plan is None else plan.sms
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splitk_plan(programs: int, Tq: int, Tk: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) of the forward; splits == 1 means the plain kernel.

    Flash-decoding pays when the plain grid (``programs`` = B * H query blocks of <= 16 rows) leaves
    SMs idle: then the keys are cut into splits of a multiple of SPLITK_KEYS keys so that about two
    programs run per SM, each split's result is merged by log-sum-exp. :data:`SPLIT_K` overrides.
    """
    if Tq > SPLITK_MAX_TQ or Tk <= SPLITK_KEYS:
        return 1, Tk
    if SPLIT_K is not None:
        splits = SPLIT_K
    else:
        sms = _num_sms(device)
        splits = triton.cdiv(2 * sms, programs) if programs < sms else 1
    splits = max(1, min(splits, triton.cdiv(Tk, SPLITK_KEYS)))
    keys_per_split = triton.cdiv(triton.cdiv(Tk, splits), SPLITK_KEYS) * SPLITK_KEYS
    return triton.cdiv(Tk, keys_per_split), keys_per_split


def _forward_splitk(q, k, v, o, lse, causal, dropout_p, scale, seed, splits: int, keys_per_split: int) -> None:
    """Flash-decoding into ``o`` and ``lse``: one program per (split of the keys, batch*head), then a
    merge of the splits' partial outputs by their log-sum-exps. ``seed``: the kernels' SEED tensor."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    block_d = triton.next_power_of_2(D)
    o_part = torch.empty(B * H, splits, Tq, block_d, device=q.device, dtype=torch.float32)  # (BH, S, Tq, BD)
    lse_part = torch.empty(B * H, splits, Tq, device=q.device, dtype=torch.float32)  # (BH, S, Tq)
    args = dict(Q=q, K=k, V=v, O_PART=o_part, LSE_PART=lse_part,
                **dict(zip(("stride_qb", "stride_qh", "stride_qt", "stride_qd"), _strides(q))),
                **dict(zip(("stride_kb", "stride_kh", "stride_kt", "stride_kd"), _strides(k))),
                **dict(zip(("stride_vb", "stride_vh", "stride_vt", "stride_vd"), _strides(v))),
                H=H, Tq=Tq, Tk=Tk, sm_scale=float(scale), dropout_p=float(dropout_p), SEED=seed,
                keys_per_split=keys_per_split, TQ_KEY=_bucket(Tq), TK_KEY=_bucket(keys_per_split), **_head_dims(D),
                CAUSAL=bool(causal), DROPOUT=dropout_p > 0.0)
    _launch("splitk", _attn_fwd_splitk, splits, B * H, args, None)
    _attn_splitk_combine[(Tq, B * H)](o_part, lse_part, o, lse, *_strides(o), H, Tq, splits, **_head_dims(D),
                                      BLOCK_S=SPLITK_COMBINE_BLOCK, **LAUNCH_OPTIONS)


def _new_grads(q, k):
    """Fresh (dq, dk, dv) laid out like q and k (dv shares dk's strides, as the dK/dV kernel assumes)."""
    dq = _empty_like_layout(q)
    dk = _empty_like_layout(k)
    dv = torch.empty_strided(dk.shape, dk.stride(), device=dk.device, dtype=dk.dtype)
    return dq, dk, dv


@on_inputs_device
def _backward(do, q, k, v, o, lse, causal: bool, dropout_p: float, scale: float, seed, grads=None,
              atomic_dq: bool = False):
    """Run the backward kernels; returns fresh ``(dq, dk, dv)``, laid out like q, k, v.

    Deterministic (default): the dK/dV kernel, then the dQ kernel (7 tile matmuls, no atomics). With
    ``atomic_dq``: the dK/dV kernel also adds each key block's share of dQ into a zeroed fp32 buffer with
    atomics (5 matmuls, FlashAttention-2's backward; the sums' order, so dq's last bits, vary run to
    run), and dq is that buffer converted; where no BWD_ATOMIC_CONFIGS entry serves the inputs (fp32,
    D > 64, see there) the deterministic backward runs instead. ``grads`` may pass the three output buffers preallocated
    (tests poison them); dk and dv must share strides.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dropout_p = effective_dropout_p(dropout_p)
    dq, dk, dv = _new_grads(q, k) if grads is None else grads
    if dk.stride() != dv.stride():
        raise ValueError("_backward: preallocated dk and dv must have the same strides")
    if q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, do = _fits_int32(q), _fits_int32(k), _fits_int32(v), _fits_int32(do)
    delta = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)  # (B, H, Tq)
    _attn_bwd_preprocess[(triton.cdiv(Tq, PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Tq, **_head_dims(D), BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=PREPROCESS_WARPS,
        **LAUNCH_OPTIONS)
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta,
                  **dict(zip(("stride_qb", "stride_qh", "stride_qt", "stride_qd"), _strides(q))),
                  **dict(zip(("stride_kb", "stride_kh", "stride_kt", "stride_kd"), _strides(k))),
                  **dict(zip(("stride_vb", "stride_vh", "stride_vt", "stride_vd"), _strides(v))),
                  **dict(zip(("stride_dob", "stride_doh", "stride_dot", "stride_dod"), _strides(do))),
                  H=H, Tq=Tq, Tk=Tk, sm_scale=float(scale), dropout_p=float(dropout_p),
                  SEED=_seed_tensor(seed, q.device) if dropout_p > 0.0 else lse,
                  TQ_KEY=_bucket(Tq), TK_KEY=_bucket(Tk), **_head_dims(D), CAUSAL=bool(causal),
                  DROPOUT=dropout_p > 0.0)
    dkdv = dict(common, DK=dk, DV=dv, **dict(zip(("stride_dkb", "stride_dkh", "stride_dkt", "stride_dkd"),
                                                 _strides(dk))))
    if atomic_dq and _atomic_dq_served(D, dropout_p > 0.0, q):
        dq_acc = torch.zeros(B, H, Tq, D, device=q.device, dtype=torch.float32)  # (B, H, Tq, D)
        _launch("bwd_atomic", _attn_bwd_dkdv, Tk, B * H, dict(
            dkdv, DQ=dq_acc, **dict(zip(("stride_dqb", "stride_dqh", "stride_dqt", "stride_dqd"), _strides(dq_acc))),
            ATOMIC_DQ=True), "BLOCK_N")
        return dq.copy_(dq_acc), dk, dv
    # DQ unused: delta stands in for the pointer
    _launch("dkdv", _attn_bwd_dkdv, Tk, B * H, dict(dkdv, DQ=delta, stride_dqb=0, stride_dqh=0, stride_dqt=0,
                                                    stride_dqd=0, ATOMIC_DQ=False), "BLOCK_N")
    _launch("dq", _attn_bwd_dq, Tq, B * H, dict(
        common, DQ=dq, **dict(zip(("stride_dqb", "stride_dqh", "stride_dqt", "stride_dqd"), _strides(dq)))),
        "BLOCK_M")
    return dq, dk, dv


def _draw_seed(device) -> torch.Tensor:
    """A dropout seed, (1,) int64 on ``device``, from torch's generator there: ``torch.manual_seed`` makes
    runs repeatable, and drawing it on the device needs no host sync (nor a graph break under compile)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def attention_dropout_mask(seed, B: int, H: int, Tq: int, Tk: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, Tq, Tk) bool keep-mask (True = keep) the attention kernels use for this seed (an int, or
    the (1,) int64 tensor :func:`attention` draws).

    Computed by a small Triton kernel calling the same ``_dropout_keep`` as the attention kernels, so it
    is the mask they apply, bit for bit; pass it to ``reference.attention(..., dropout_mask=mask,
    dropout_p=effective_dropout_p(dropout_p))``, the probability the kernels apply.
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    keep = torch.empty(B, H, Tq, Tk, device=device, dtype=torch.int8)  # (B, H, Tq, Tk)
    if keep.numel():
        _fill_dropout_mask(keep, _seed_tensor(seed, keep.device).to(keep.device), effective_dropout_p(dropout_p))
    return keep.bool()


@on_inputs_device
def _fill_dropout_mask(keep: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> None:
    """Launch the mask kernel into ``keep`` (B, H, Tq, Tk) int8, on keep's GPU."""
    B, H, Tq, Tk = keep.shape
    grid = (B * H, triton.cdiv(Tq, MASK_BLOCK), triton.cdiv(Tk, MASK_BLOCK))
    _dropout_mask_kernel[grid](keep, Tq, Tk, dropout_p, seed, BLOCK_M=MASK_BLOCK, BLOCK_N=MASK_BLOCK,
                               **LAUNCH_OPTIONS)


# ========================================================================================= custom ops
# torch.library ops, so torch.compile(fullgraph=True) keeps the kernels as opaque calls with known outputs
# (the fake implementations allocate exactly as the launchers do) and autograd knows the backward.
# ``atomic_dq`` picks the backward (see _backward); the forward op carries it so that the choice is made
# once, at the forward, and its backward runs the one chosen.


@torch.library.custom_op("gpt_triton::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None, causal: bool,
                  dropout_p: float, scale: float, atomic_dq: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): the (B, H, Tq, D) output and the (B, H, Tq) float32 log-sum-exp the backward reuses."""
    return _forward(q, k, v, causal, dropout_p, scale, seed)


@torch.library.custom_op("gpt_triton::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, seed: torch.Tensor | None, causal: bool, dropout_p: float,
                           scale: float, atomic_dq: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, dropout_p, scale, seed, atomic_dq=atomic_dq)


@_attention_op.register_fake
def _(q, k, v, seed, causal, dropout_p, scale, atomic_dq=False):
    return _empty_like_layout(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, dropout_p, scale, atomic_dq=False):
    return _new_grads(q, k)


def _attention_setup(ctx, inputs, output):
    q, k, v, seed, causal, dropout_p, scale, atomic_dq = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.args = (causal, dropout_p, scale, atomic_dq)
    ctx.mark_non_differentiable(lse)


def _attention_vjp(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, lse, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_attention_vjp, setup_context=_attention_setup)


# ========================================================================================== functional


def _attention(q, k, v, causal=True, dropout_p=0.0, scale=None, seed=None, atomic_dq=None):
    """The Triton path of :func:`attention`, with ``seed`` for the dropout mask (an int or a (1,) int64
    tensor; drawn from torch's generator on q's device when None; tests pass one to compare with
    :func:`attention_dropout_mask`) and ``atomic_dq`` for the backward (None: :data:`ATOMIC_DQ_BACKWARD`),
    both fixed at the forward."""
    _check_inputs(q, k, v, causal, dropout_p, scale)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0:
        seed = _draw_seed(q.device) if seed is None else _seed_tensor(seed, q.device)
    else:
        seed = None
    atomic_dq = ATOMIC_DQ_BACKWARD if atomic_dq is None else bool(atomic_dq)
    return _attention_op(q, k, v, seed, bool(causal), dropout_p, scale, atomic_dq)[0]


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """softmax(q k^T * scale) v for (B, H, Tq, D) q and (B, H, Tk, D) k, v, Tq <= Tk.

    With ``causal`` the mask is aligned to the end: query i sees keys j <= i + Tk - Tq. On the Triton
    backend dropout_p is applied in steps of 1/256 (:func:`effective_dropout_p`). Under autocast
    q, k and v are cast to autocast's dtype first (as autocast does for SDPA), on every backend. Every
    backend refuses the same inputs (:func:`_check_args`: ranks, shapes, dtypes, devices, causal Tq > Tk,
    dropout_p outside [0, 1)); the Triton one also head dims outside SUPPORTED_HEAD_DIMS and float64.
    """
    _check_tensors(q, k, v)
    amp = autocast_dtype(q)
    if amp is not None:
        q, k, v = q.to(amp), k.to(amp), v.to(amp)
    _check_args(q, k, v, causal, dropout_p, scale)  # the same refusals on every backend, before choosing one
    impl = select(q, k, v)
    if impl == "torch":
        tq, tk = q.shape[-2], k.shape[-2]
        mask = None
        if causal and tq != tk and tq > 1:
            mask = reference.causal_mask(tq, tk, q.device)  # torch's is_causal aligns to the start
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and tq == tk, scale=scale)
    if impl == "reference":
        return reference.attention(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale)
    return _attention(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale)


# ======================================================================================= compile check


# The head dims compiled per padded head dim (BLOCK_D): the power of two itself, and for 128 also 80, where
# HEAD_DIM < BLOCK_D masks the feature columns (96 is compiled as 80, 16 and 32 as 64: compile_check.stand_in)
COMPILE_HEAD_DIMS = {64: (64,), 128: (128, 80)}


def compile_cases():
    """Every kernel at every config the autotuner can pick: 16-bit, each config at every head dim of
    :data:`COMPILE_HEAD_DIMS` whose BLOCK_D it serves, causal and not, with dropout where it serves dropout,
    without where it serves no dropout; float32 at head dim 64, causal (the model's float32 runs); for the
    capabilities of the families it serves (:func:`family_of`; the newer targets get the model's own
    attention: compile_check.PRIMARY); the decoding merge and the backward's preprocessing at each head dim
    and dtype. One autotuned launch's candidates share a group; fp16 compiles as bf16 (compile_check).
    Aligned as the launcher's inputs are at run time: 16-byte aligned pointers, strides multiples of 16
    elements (every supported D is a multiple of 16), feature stride 1.
    """
    from .compile_check import ARCHS, PRIMARY, CompileCase

    mod = "gpt_kernels.flash_attention"
    scalars = {"H": "i32", "Tq": "i32", "Tk": "i32", "sm_scale": "fp32", "dropout_p": "fp32",
               "TQ_KEY": "i32", "TK_KEY": "i32"}

    def case(kernel, tensors: dict, stride_prefixes, consts: dict, c: _Config | None, label: str, extra_scalars=None,
             group="", num_warps=4):
        sig = {name: f"*{ty}" for name, ty in tensors.items()}
        aligned = list(tensors)
        consts = dict(consts)
        for p in stride_prefixes:
            unused = p == "dq" and consts.get("ATOMIC_DQ") is False  # the launcher passes 0 for DQ's strides
            for dim in "bhtd" if unused else "bht":
                sig[f"stride_{p}{dim}"] = "i32"
                aligned.append(f"stride_{p}{dim}")
            if not unused:
                consts[f"stride_{p}d"] = 1  # Triton specialises a stride of 1 to a constant at run time
        sig.update(scalars if extra_scalars is None else extra_scalars)
        if c is not None:
            consts.update(BLOCK_M=c.block_m, BLOCK_N=c.block_n)
        causal, head_dim = consts.get("CAUSAL", True), consts.get("HEAD_DIM")
        # every target for the model's attention (16-bit, D = 64, causal); not launched: only the API reaches it
        default = tensors.get("Q", tensors.get("O")) == "bf16" and head_dim == 64 and causal
        archs = tuple(cap for cap in (ARCHS if default else PRIMARY) if c is None or family_of(cap) in c.archs)
        return CompileCase(mod, kernel, sig, consts, num_warps=c.num_warps if c else num_warps,
                           num_stages=c.num_stages if c else 3, label=label, extra={"divisible_by_16": aligned},
                           archs=archs, group=group, launched=causal and head_dim != 80 and (
                               head_dim == 64 or "Q" not in tensors or tensors["Q"] == "bf16"))

    # (kernel, short name, configs, I/O tensors in the working dtype, fp32 tensors, stride prefixes, extra)
    kernels = (
        ("_attn_fwd", "fwd", FWD_CONFIGS, ("Q", "K", "V", "O"), ("LSE",), "qkvo", {}),
        ("_attn_bwd_dkdv", "dkdv", DKDV_CONFIGS, ("Q", "K", "V", "DO", "DK", "DV"), ("DQ", "LSE", "DELTA"),
         ("q", "k", "v", "do", "dk", "dq"), {"ATOMIC_DQ": False}),
        ("_attn_bwd_dkdv", "bwd-atomic", BWD_ATOMIC_CONFIGS, ("Q", "K", "V", "DO", "DK", "DV"), ("DQ", "LSE", "DELTA"),
         ("q", "k", "v", "do", "dk", "dq"), {"ATOMIC_DQ": True}),
        ("_attn_bwd_dq", "dq", DQ_CONFIGS, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA"), ("q", "k", "v", "do", "dq"),
         {}),
        ("_attn_fwd_splitk", "splitk", SPLITK_CONFIGS, ("Q", "K", "V"), ("O_PART", "LSE_PART"), "qkv", {}),
    )
    cases = []
    for kernel, short, configs, io, f32, prefixes, extra in kernels:
        more = {"keys_per_split": "i32"} if short == "splitk" else {}
        for c in configs:
            t = "fp32" if c.fp32 else "bf16"
            for block_d, dropout in [(d, False) for d in c.block_d] + [(d, True) for d in c.dropout_block_d]:
                # the seed is read only with dropout; without, the launcher passes the lse in its place
                tensors = {**{n: t for n in io}, **{n: "fp32" for n in f32}, "SEED": "i64" if dropout else "fp32"}
                # float32: causal at HEAD_DIM = BLOCK_D (the model's float32 runs head dim 64); 16-bit: every
                # head dim of COMPILE_HEAD_DIMS, causal and not ("full")
                for head_dim in COMPILE_HEAD_DIMS[block_d] if t == "bf16" else (block_d,):
                    for causal in (True, False) if t == "bf16" else (True,):
                        flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, DROPOUT=dropout, **extra)
                        label = f"{short} D={head_dim} {t}{' dropout' if dropout else ''}{'' if causal else ' full'}"
                        cases.append(case(kernel, tensors, prefixes, flags, c, label, {**scalars, **more},
                                          group=label))
    for block_d, head_dims in COMPILE_HEAD_DIMS.items():
        for head_dim in head_dims:
            for t in ("bf16", "fp32") if head_dim == 64 else ("bf16",):
                dims = {"HEAD_DIM": head_dim, "BLOCK_D": block_d}
                cases.append(case("_attn_splitk_combine", {"O_PART": "fp32", "LSE_PART": "fp32", "O": t, "LSE": "fp32"},
                                  ("o",), {**dims, "BLOCK_S": SPLITK_COMBINE_BLOCK}, None, f"D={head_dim} {t}",
                                  {"H": "i32", "Tq": "i32", "SPLITS": "i32"}))
                cases.append(case("_attn_bwd_preprocess", {"O": t, "DO": t, "DELTA": "fp32"}, ("o", "do"),
                                  {**dims, "BLOCK_M": PREPROCESS_BLOCK_M}, None, f"D={head_dim} {t}",
                                  {"H": "i32", "Tq": "i32"}, num_warps=PREPROCESS_WARPS))
    cases.append(case("_dropout_mask_kernel", {"KEEP": "i8"}, (), {"BLOCK_M": MASK_BLOCK, "BLOCK_N": MASK_BLOCK},
                      None, "mask", {"Tq": "i32", "Tk": "i32", "dropout_p": "fp32", "SEED": "*i64"}))
    return cases
