"""The fused attention kernel against the float64 reference: output, log-sum-exp, dq, dk, dv.

Three-way rule (gpt_kernels.testing): the kernel's error against float64 may be at most 2x what PyTorch
makes at the same dtype (gpt_kernels.reference at that dtype, or SDPA on a GPU), plus a small atol.
Outputs and gradient buffers are NaN-poisoned before each launch. On the CPU the kernels run in
Triton's interpreter with small tiles (flash_attention.INTERPRET_CONFIGS), so the shapes stay small; a
covering set of shapes is tested rather than the full cross product.
"""

import inspect
import math

import pytest
import torch
from triton.runtime.errors import OutOfResources

import gpt_kernels
from gpt_kernels import flash_attention as fa
from gpt_kernels import reference
from gpt_kernels.backend import use_backend
from gpt_kernels.testing import assert_close_to_ref, launched_kernels, max_err, poison_

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _qkv(B, H, Tq, Tk, D, dtype, device):
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, Tk, D, dtype=dtype, device=device)
    v = torch.randn(B, H, Tk, D, dtype=dtype, device=device)
    return q, k, v


def _reference(q, k, v, do, causal, dropout_p, scale, mask, dtype):
    """Output and (dq, dk, dv) of gpt_kernels.reference.attention at ``dtype`` (float64: the exact answer), with
    the dropout probability the kernels apply (a multiple of 1/256) and their mask."""
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = reference.attention(*xs, causal=causal, dropout_p=fa.effective_dropout_p(dropout_p), scale=scale,
                              dropout_mask=mask)
    return (out.detach(), *torch.autograd.grad(out, xs, do.to(dtype)))


def _torch_base(q, k, v, do, causal, dropout_p, scale, mask):
    """What PyTorch itself gets at the working dtype: SDPA on a GPU, the reference's ops on the CPU."""
    if q.is_cuda and mask is None:
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        tq, tk = q.shape[2], k.shape[2]
        attn_mask = reference.causal_mask(tq, tk, q.device) if causal and tq != tk else None
        out = torch.nn.functional.scaled_dot_product_attention(
            *xs, attn_mask=attn_mask, is_causal=causal and tq == tk, scale=scale)
        return (out.detach(), *torch.autograd.grad(out, xs, do))
    return _reference(q, k, v, do, causal, dropout_p, scale, mask, q.dtype)


def _lse_reference(q, k, causal, scale):
    """(B, H, Tq) float64 log-sum-exp of the scaled, masked scores."""
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~reference.causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def check_kernel(q, k, v, causal, dropout_p=0.0, seed=0, scale=None, factor=2.0, atomic_dq=False, splitk=None):
    """Run forward and backward into poisoned buffers and hold every output to the three-way rule
    (``atomic_dq``: the 5-matmul backward with atomic dQ). Which kernels ran is checked too, as the other
    path gives the same answer: the atomic backward has no dQ kernel; ``splitk`` True / False: the forward
    ran flash-decoding (the split kernel and the merge) / the plain kernel (None: either)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = poison_(fa._empty_like_layout(q))
    lse = poison_(torch.empty(B, H, Tq, device=q.device, dtype=torch.float32))
    with launched_kernels() as forward:
        fa._forward(q, k, v, causal, dropout_p, sm_scale, seed, o=o, lse=lse)
    if splitk is not None:  # (sets: on a GPU the autotuner's trials launch a kernel several times)
        split = {"_attn_fwd_splitk", "_attn_splitk_combine"}
        assert set(forward) == (split if splitk else {"_attn_fwd"}), f"the forward ran {forward}"
    do = torch.randn_like(o)
    dk = poison_(fa._empty_like_layout(k))
    grads = (poison_(fa._empty_like_layout(q)), dk, poison_(torch.empty_strided(dk.shape, dk.stride(), dtype=dk.dtype,
                                                                                device=dk.device)))
    with launched_kernels() as backward:
        dq, dk, dv = fa._backward(do, q, k, v, o, lse, causal, dropout_p, sm_scale, seed, grads=grads,
                                  atomic_dq=atomic_dq)
    if q.numel():
        want = {"_attn_bwd_preprocess", "_attn_bwd_dkdv"} | (set() if atomic_dq else {"_attn_bwd_dq"})
        assert set(backward) == want, f"the {'atomic ' if atomic_dq else ''}backward ran {backward}"

    mask = fa.attention_dropout_mask(seed, B, H, Tq, Tk, dropout_p, q.device) if dropout_p > 0 else None
    exact = _reference(q, k, v, do, causal, dropout_p, sm_scale, mask, torch.float64)
    base = _torch_base(q, k, v, do, causal, dropout_p, sm_scale, mask)
    for name, out, ref, b in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), exact, base):
        assert_close_to_ref(name, out, ref, b, factor=factor)
    assert_close_to_ref("lse", lse, _lse_reference(q, k, causal, sm_scale), atol=1e-4 * max(1.0, math.log(Tk)))
    return o, lse, (dq, dk, dv)


# ------------------------------------------------------------------------ shapes, flags, dtypes (CPU)

# (B, H, T, D, causal, dtype): every T with both causal settings, every D with both dtypes and both
# causal settings, B and H > 1, B * H small.
SQUARE = [
    (1, 2, 1, 16, True, f32),
    (2, 1, 1, 64, False, f16),
    (2, 2, 7, 80, True, f16),
    (1, 2, 7, 16, False, f32),
    (2, 1, 64, 64, True, f32),
    (1, 2, 64, 80, False, f16),
    (1, 2, 100, 16, True, f16),
    (2, 1, 100, 80, False, f32),
    (2, 1, 129, 80, True, f32),
    (1, 2, 129, 64, False, f16),
    (1, 2, 129, 16, True, f16),
    (2, 1, 100, 64, True, f32),
]


@pytest.mark.parametrize("B,H,T,D,causal,dtype", SQUARE, ids=lambda x: str(x).replace("torch.", ""))
def test_attention_matches_reference(device, B, H, T, D, causal, dtype):
    check_kernel(*_qkv(B, H, T, T, D, dtype, device), causal)


@pytest.mark.parametrize("D", [32, 96, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_other_head_dims(device, D, causal):
    dtype = f16 if causal else f32
    check_kernel(*_qkv(1, 2, 33, 33, D, dtype, device), causal)


# (Tq, Tk, causal, D): decoding with a KV cache (query i at position i + Tk - Tq), Tq = 1 included,
# and non-causal cross-attention shapes, Tq > Tk among them.
DECODE = [
    (1, 1, True, 64),
    (1, 7, True, 16),
    (1, 100, True, 64),
    (1, 129, False, 80),
    (5, 37, True, 80),
    (16, 129, True, 16),
    (33, 64, True, 64),
    (31, 100, False, 16),
    (20, 7, False, 64),
]


@pytest.mark.parametrize("Tq,Tk,causal,D", DECODE)
def test_decode_shapes(device, Tq, Tk, causal, D):
    check_kernel(*_qkv(2, 1, Tq, Tk, D, f32, device), causal)


# flash-decoding (split-K) for Tq <= 16: (Tq, Tk, causal, D, dtype, splits), splits None = the automatic
# choice; lengths up to a few thousand keys, splits that do not divide them, rows that see no key of
# the later splits (causal, Tq > 1)
SPLITK = [
    (1, 129, True, 64, f32, None),
    (1, 700, True, 16, f32, 3),
    (5, 700, True, 80, f16, 7),
    (16, 2500, True, 16, f32, None),
    (16, 1000, False, 64, f32, 4),
    (3, 2176, False, 32, f16, 17),  # 17 splits: the merge reads them in two steps
]


@pytest.mark.parametrize("Tq,Tk,causal,D,dtype,splits", SPLITK, ids=lambda x: str(x).replace("torch.", ""))
def test_splitk_decoding_matches_reference(device, monkeypatch, Tq, Tk, causal, D, dtype, splits):
    monkeypatch.setattr(fa, "SPLIT_K", splits)
    n, keys = fa._splitk_plan(2, Tq, Tk, torch.device(device))
    assert n > 1 and (n - 1) * keys < Tk <= n * keys  # every split has keys
    check_kernel(*_qkv(2, 1, Tq, Tk, D, dtype, device), causal, splitk=True)  # and the split kernel ran


def test_splitk_decoding_with_dropout(device, monkeypatch):
    monkeypatch.setattr(fa, "SPLIT_K", 3)
    check_kernel(*_qkv(1, 2, 4, 400, 16, f32, device), True, dropout_p=0.2, seed=8, splitk=True)


def test_split_k_off_runs_the_plain_kernel(device, monkeypatch):
    """SPLIT_K = 1 (bench_attention's triton-nosplit) and query blocks longer than 16 take the plain kernel."""
    monkeypatch.setattr(fa, "SPLIT_K", 1)
    check_kernel(*_qkv(2, 1, 5, 700, 16, f32, device), True, splitk=False)
    monkeypatch.setattr(fa, "SPLIT_K", None)
    check_kernel(*_qkv(2, 1, 17, 700, 16, f32, device), True, splitk=False)


def test_splitk_plan():
    """Split only short query blocks whose grid leaves SMs idle, into splits of whole SPLITK_KEYS chunks."""
    cpu = torch.device("cpu")  # 4 "SMs"
    assert fa._splitk_plan(2, 1, 1000, cpu) == (4, 256)  # 2 programs: aim for 2 per SM
    assert fa._splitk_plan(2, 17, 1000, cpu)[0] == 1  # more than one query block: plain kernel
    assert fa._splitk_plan(8, 1, 1000, cpu)[0] == 1  # the grid already fills the SMs
    assert fa._splitk_plan(1, 1, 128, cpu)[0] == 1  # one chunk of keys: nothing to split
    assert fa._splitk_plan(1, 16, 300, cpu) == (3, 128)  # at most one split per chunk


def test_every_causal_offset(device):
    """Tk - Tq = 0..17, 30, 31: every alignment of the shifted diagonal against the 16-wide tiles."""
    for off in [*range(18), 30, 31]:
        q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 40, 40 + off, 16, f32, device))
        out = fa._attention(q, k, v, causal=True)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        exact = _reference(q, k, v, do, True, 0.0, None, None, torch.float64)
        for name, a, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), exact):
            assert_close_to_ref(f"{name} at Tk - Tq = {off}", a, ref)


def _value(x):
    """A kernel argument's value as the interpreter passes it: a scalar tensor, a constexpr or a Python value."""
    x = getattr(x, "value", x)  # tl.constexpr
    return x.handle.data.item() if hasattr(x, "handle") else x


def _record_stages(monkeypatch, inner: str, names: tuple) -> list[dict]:
    """Spy on the jitted loop ``inner`` of flash_attention (called from inside the kernels, which the
    interpreter runs as Python): each call's arguments ``names`` (its stage's range and mask flags)."""
    real = getattr(fa, inner)
    signature = inspect.signature(real.fn)
    calls = []

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append({n: _value(bound[n]) for n in names})
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, inner, spy)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="spies on the kernels' loops, which only the interpreter runs "
                                                      "as Python")
@pytest.mark.parametrize("causal", [True, False])
def test_only_the_diagonal_band_and_the_ragged_end_run_masked(device, monkeypatch, causal):
    """The kernels' fast path: key (or query) blocks that every row sees in full run the loop body without
    masks; only the blocks on the causal diagonal and past the end of the lengths run the masked body. Both
    bodies give the same answer, so this watches which one each block ran in (forward, dQ and dK/dV)."""
    Tq, Tk = 100, 130  # not block multiples; 30 keys of offset
    fwd = _record_stages(monkeypatch, "_attn_fwd_inner", ("start_m", "lo", "hi", "MASKED"))
    dq = _record_stages(monkeypatch, "_attn_bwd_dq_inner", ("start_m", "lo", "hi", "MASKED"))
    dkdv = _record_stages(monkeypatch, "_attn_bwd_dkdv_inner", ("start_n", "lo", "hi", "MASK_CAUSAL", "MASK_ROWS"))
    check_kernel(*_qkv(1, 1, Tq, Tk, 16, f32, device), causal)
    cfg = fa.INTERPRET_CONFIGS
    for name, calls, block_m, block_n in (("fwd", fwd, cfg["fwd"].block_m, cfg["fwd"].block_n),
                                          ("dq", dq, cfg["dq"].block_m, cfg["dq"].block_n)):
        assert calls and len(calls) % 2 == 0
        for plain, masked in zip(calls[0::2], calls[1::2]):  # each program: the unmasked stage, then the masked
            assert not plain["MASKED"] and masked["MASKED"] and plain["lo"] == 0 and plain["hi"] == masked["lo"]
            band = block_m + block_n if causal else block_n  # the diagonal (causal) or the ragged end of the keys
            assert masked["hi"] - masked["lo"] < band, f"{name}: keys {masked['lo']}..{masked['hi']} run masked"
        assert sum(p["hi"] - p["lo"] for p in calls[0::2]) > sum(m["hi"] - m["lo"] for m in calls[1::2])
    block_m, block_n = cfg["dkdv"].block_m, cfg["dkdv"].block_n
    masked = [c for c in dkdv if c["MASK_CAUSAL"] or c["MASK_ROWS"]]
    plain = [c for c in dkdv if not (c["MASK_CAUSAL"] or c["MASK_ROWS"])]
    # causal: the query blocks that straddle this key block's diagonal; else the ragged last query block
    assert all(c["hi"] - c["lo"] <= (block_n + 2 * block_m if c["MASK_CAUSAL"] else block_m) for c in masked), masked
    assert any(c["hi"] > c["lo"] for c in plain)


# the 5-matmul backward (atomic dQ): causal and not, dropout, decoding offsets, ragged lengths, head dims
ATOMIC = [
    (2, 1, 100, 100, 16, True, f32, 0.0),
    (1, 2, 37, 37, 80, False, f16, 0.0),
    (1, 2, 5, 70, 64, True, f32, 0.0),
    (2, 1, 65, 65, 16, True, f32, 0.3),
    (1, 2, 1, 33, 16, False, f32, 0.2),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype,p", ATOMIC, ids=lambda x: str(x).replace("torch.", ""))
def test_atomic_dq_backward_matches_reference(device, B, H, Tq, Tk, D, causal, dtype, p):
    check_kernel(*_qkv(B, H, Tq, Tk, D, dtype, device), causal, dropout_p=p, seed=21, atomic_dq=True)


def test_atomic_dq_is_the_module_default_when_set(device, monkeypatch):
    """ATOMIC_DQ_BACKWARD picks the backward at the forward: the atomic kernel runs, the dQ kernel does not."""
    ran = []
    real = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda name, *a, **kw: (ran.append(name), real(name, *a, **kw)))
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 20, 20, 16, f32, device))
    monkeypatch.setattr(fa, "ATOMIC_DQ_BACKWARD", True)
    out = fa._attention(q, k, v, causal=True)
    monkeypatch.setattr(fa, "ATOMIC_DQ_BACKWARD", False)  # read at the forward, not in the backward
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert ran == ["fwd", "bwd_atomic"]
    exact = _reference(q, k, v, torch.ones_like(out), True, 0.0, None, None, torch.float64)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, exact[1:]):
        assert_close_to_ref(name, g, ref)


def test_atomic_dq_falls_back_where_no_config_serves(monkeypatch):
    """On a GPU the atomic option runs only where BWD_ATOMIC_CONFIGS compile unspilled (16-bit, D <= 64)."""
    monkeypatch.setattr(fa, "interpreter_enabled", lambda: False)
    q16, q32 = torch.empty(1, 1, 1, 1, dtype=bf16), torch.empty(1, 1, 1, 1, dtype=f32)
    assert fa._atomic_dq_served(64, False, q16) and fa._atomic_dq_served(64, True, q16)
    assert fa._atomic_dq_served(16, True, q16)  # D <= 64 shares BLOCK_D = 64
    assert not fa._atomic_dq_served(128, False, q16) and not fa._atomic_dq_served(80, True, q16)
    assert not fa._atomic_dq_served(64, False, q32)


def test_decode_fp16_and_scale(device):
    check_kernel(*_qkv(1, 2, 3, 50, 64, f16, device), True, scale=0.3)


# The diagonal logic depends on how BLOCK_M and BLOCK_N relate: the default interpreter tiles have
# BLOCK_M > BLOCK_N in the forward and dQ and BLOCK_M < BLOCK_N in dK/dV; swap and square them.
@pytest.mark.parametrize("tiles", [{"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)},
                                   {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}], ids=["swapped", "square"])
@pytest.mark.parametrize("Tq,Tk", [(100, 100), (21, 70)])
def test_other_tile_shapes(device, monkeypatch, tiles, Tq, Tk):
    monkeypatch.setattr(fa, "INTERPRET_CONFIGS", {name: fa._Config(bm, bn, 4, 1) for name, (bm, bn) in tiles.items()})
    monkeypatch.setattr(fa, "FORCE_CONFIGS", {name: fa._Config(bm, bn, 4, 2) for name, (bm, bn) in tiles.items()})
    check_kernel(*_qkv(1, 2, Tq, Tk, 16, f32, device), True, dropout_p=0.2, seed=5)


# -------------------------------------------------------------------------------------------- dropout

DROPOUT = [
    (2, 1, 64, 64, 16, True, f32, 0.3),
    (1, 2, 100, 100, 80, False, f16, 0.2),
    (1, 2, 5, 37, 64, True, f32, 0.5),
    (2, 1, 1, 1, 16, True, f32, 0.5),
    (1, 2, 129, 129, 16, True, f16, 0.1),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype,p", DROPOUT, ids=lambda x: str(x).replace("torch.", ""))
def test_dropout_matches_reference_with_the_kernels_mask(device, B, H, Tq, Tk, D, causal, dtype, p):
    check_kernel(*_qkv(B, H, Tq, Tk, D, dtype, device), causal, dropout_p=p, seed=1234 + Tq)


def test_dropout_mask_statistics(device):
    p = 0.25
    mask = fa.attention_dropout_mask(7, 2, 2, 128, 256, p, device)  # (B, H, Tq, Tk)
    assert mask.shape == (2, 2, 128, 256) and mask.dtype == torch.bool
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    # no structure: each (batch, head), and each of the 16 bytes of one Philox call (query bit 3, key
    # bits 0, 3 and 4 pick the byte), rows and columns
    i, j = torch.arange(128, device=device)[:, None], torch.arange(256, device=device)[None, :]
    byte = 8 * ((i >> 3) & 1) + (j & 1) + 2 * ((j >> 3) & 1) + 4 * ((j >> 4) & 1)  # (Tq, Tk) in 0..15
    per_part = [mask[b, h].float().mean().item() for b in range(2) for h in range(2)]
    per_byte = [mask[..., byte == c].float().mean().item() for c in range(16)]
    for frac in per_part + per_byte:
        assert abs(frac - (1 - p)) < 5 * sigma * 4  # 4 = sqrt(16): each byte class holds 1/16 of the mask
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    assert not torch.equal(mask[..., 0, :], mask[..., 1, :]) and not torch.equal(mask[..., 0], mask[..., 1])
    # neighbouring keys and queries are independent: P(keep both) ~ (1 - p)^2, for the pairs that share
    # a Philox call (keys 2k, 2k+1; queries i, i+8) and those that do not (keys 2k+1, 2k+2)
    for a, b in ((mask[..., 0::2], mask[..., 1::2]), (mask[..., 1:-1:2], mask[..., 2::2]),
                 (mask[..., 0:8, :], mask[..., 8:16, :])):
        assert abs((a & b).float().mean().item() - (1 - p) ** 2) < 0.01


def test_dropout_applies_the_effective_probability(device):
    """p is applied in steps of 1/256 (one random byte per decision): 0.1 drops 26/256 = 0.1016 of the
    weights, which a 1M-element mask tells apart from 0.1 (5 standard deviations)."""
    assert fa.effective_dropout_p(0.0) == 0.0
    assert fa.effective_dropout_p(0.1) == 26 / 256
    assert fa.effective_dropout_p(0.25) == 0.25
    assert fa.effective_dropout_p(1e-4) == 1 / 256  # never silently no dropout
    assert fa.effective_dropout_p(0.9999) == 255 / 256  # never all dropped
    mask = fa.attention_dropout_mask(3, 4, 4, 256, 256, 0.1, device)
    sigma = math.sqrt(0.1 * 0.9 / mask.numel())
    assert abs((1 - mask.float().mean().item()) - 26 / 256) < 3 * sigma


def test_dropout_mask_is_a_function_of_the_seed(device):
    a = fa.attention_dropout_mask(3, 1, 2, 40, 50, 0.5, device)
    assert torch.equal(a, fa.attention_dropout_mask(3, 1, 2, 40, 50, 0.5, device))
    assert not torch.equal(a, fa.attention_dropout_mask(4, 1, 2, 40, 50, 0.5, device))
    # the element at (b, h, i, j) does not depend on the shape it is asked in (Tq, Tk fixed)
    small = fa.attention_dropout_mask(3, 1, 1, 40, 50, 0.5, device)
    assert torch.equal(small[0, 0], a[0, 0])
    assert fa.attention_dropout_mask(3, 1, 1, 8, 8, 0.0, device).all()


def test_public_dropout_draws_the_seed_from_torch(device):
    """attention(..., dropout_p) takes its seed from torch's generator and the backward reuses it."""
    B, H, T, D, p = 1, 2, 40, 16, 0.3
    q, k, v = (x.requires_grad_() for x in _qkv(B, H, T, T, D, f32, device))
    with use_backend("triton"):
        torch.manual_seed(11)
        out = gpt_kernels.attention(q, k, v, causal=True, dropout_p=p)
        torch.manual_seed(11)
        again = gpt_kernels.attention(q, k, v, causal=True, dropout_p=p)
        other = gpt_kernels.attention(q, k, v, causal=True, dropout_p=p)
    assert torch.equal(out, again) and not torch.equal(out, other)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    torch.manual_seed(11)
    mask = fa.attention_dropout_mask(fa._draw_seed(device), B, H, T, T, p, device)
    exact = _reference(q, k, v, do, True, p, None, mask, torch.float64)
    for name, g, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), exact):
        assert_close_to_ref(name, g, ref)


# ------------------------------------------------------------------------------ layouts and autograd


def test_noncontiguous_fused_qkv_through_autograd(device):
    """q, k, v as (B, T, H, D) slices of one fused projection viewed (B, H, T, D): no copies, grads flow."""
    B, T, H, D = 2, 37, 2, 16
    qkv = torch.randn(B, T, 3, H, D, device=device, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, time stride 3*H*D
    assert not q.is_contiguous()
    with use_backend("triton"):
        out = gpt_kernels.attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()  # laid out (B, T, H, D): merging the heads is free
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, (qkv,), do)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = reference.attention(*(qkv64[:, :, i].transpose(1, 2) for i in range(3)), causal=True)
    (g64,) = torch.autograd.grad(ref, (qkv64,), do.double())
    assert_close_to_ref("out", out, ref)
    assert_close_to_ref("dqkv", g, g64)


def test_odd_strides(device):
    """k with time stride 1 (a transposed (B, H, D, T) tensor), v a strided slice, q expanded over batch."""
    B, H, T, D = 2, 2, 19, 16
    q = torch.randn(1, H, T, D, device=device).expand(B, H, T, D)
    k = torch.randn(B, H, D, T, device=device).transpose(-2, -1)
    v = torch.randn(B, H, T, 2 * D, device=device)[..., ::2]
    check_kernel(q, k, v, True)


def test_backend_dispatch_and_grad_of_every_input(device):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 9, 9, 16, f32, device))
    with use_backend("triton"):
        out = gpt_kernels.attention(q, k, v, causal=False, scale=0.5)
    with use_backend("reference"):
        ref = gpt_kernels.attention(q, k, v, causal=False, scale=0.5)
    assert_close_to_ref("out", out, ref.detach(), atol=1e-5)
    out.sum().backward()  # dO with every stride 0
    gq, gk, gv = q.grad, k.grad, v.grad
    for x in (q, k, v):
        x.grad = None
    ref.sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), (gq, gk, gv), (q.grad, k.grad, v.grad)):
        assert_close_to_ref(name, a, b, atol=1e-5)


def test_backward_is_deterministic(device):
    q, k, v = _qkv(1, 2, 50, 50, 16, f32, device)
    o, lse = fa._forward(q, k, v, True, 0.1, 0.25, 9)
    do = torch.randn_like(o)
    first = fa._backward(do, q, k, v, o, lse, True, 0.1, 0.25, 9)
    second = fa._backward(do, q, k, v, o, lse, True, 0.1, 0.25, 9)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_batch(device):
    q, k, v = _qkv(0, 2, 5, 5, 16, f32, device)
    with use_backend("triton"):
        assert gpt_kernels.attention(q, k, v).shape == (0, 2, 5, 16)


# ------------------------------------------------------------------------------------------ bad input


def _bad(device, **over):
    q, k, v = _qkv(1, 2, 8, 8, 16, f32, device)
    args = dict(q=q, k=k, v=v, causal=True, dropout_p=0.0, scale=None)
    args.update(over)
    return args


# every backend refuses these, with the same message, before choosing its path (issue 27, item 4)
BAD_EVERYWHERE = {
    "rank": (lambda d: {"q": torch.randn(2, 8, 16, device=d)}, ValueError, "4-D"),
    "rank-v": (lambda d: {"v": torch.randn(1, 2, 8, 16, 1, device=d)}, ValueError, "v must be 4-D"),
    "head-dim-mismatch": (lambda d: {"k": torch.randn(1, 2, 8, 32, device=d), "v": torch.randn(1, 2, 8, 32, device=d)},
                          ValueError, "head dim"),
    "heads-mismatch": (lambda d: {"k": torch.randn(1, 3, 8, 16, device=d), "v": torch.randn(1, 3, 8, 16, device=d)},
                       ValueError, "agree in batch, heads"),
    "batch-mismatch": (lambda d: {"k": torch.randn(2, 2, 8, 16, device=d), "v": torch.randn(2, 2, 8, 16, device=d)},
                       ValueError, "agree in batch, heads"),
    "kv-lengths": (lambda d: {"k": torch.randn(1, 2, 12, 16, device=d), "v": torch.randn(1, 2, 9, 16, device=d)},
                   ValueError, "k and v must have the same shape"),
    "dtype-mismatch": (lambda d: {"v": torch.randn(1, 2, 8, 16, device=d, dtype=torch.float16)}, TypeError,
                       "share a dtype"),
    "integer": (lambda d: {x: torch.ones(1, 2, 8, 16, device=d, dtype=torch.int32) for x in "qkv"}, TypeError,
                "floating point"),
    "devices": (lambda d: {"k": torch.randn(1, 2, 8, 16, device="meta")}, ValueError, "one device"),
    "dropout-1": (lambda d: {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    "dropout-1.5": (lambda d: {"dropout_p": 1.5}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    "dropout-negative": (lambda d: {"dropout_p": -0.1}, ValueError, "dropout_p"),
    "tq-gt-tk": (lambda d: {"q": torch.randn(1, 2, 9, 16, device=d)}, ValueError, "Tq <= Tk"),
    "no-keys": (lambda d: {"k": torch.randn(1, 2, 0, 16, device=d), "v": torch.randn(1, 2, 0, 16, device=d),
                           "causal": False}, ValueError, "at least one key"),
    "scale": (lambda d: {"scale": "0.5"}, TypeError, "scale must be a float"),
}
# only the Triton kernels refuse these (the torch and reference backends compute them)
BAD_FOR_TRITON = {
    "float64": (lambda d: {x: torch.randn(1, 2, 8, 16, device=d, dtype=torch.float64) for x in "qkv"}, TypeError,
                "float16, bfloat16"),
    "unsupported-D": (lambda d: {x: torch.randn(1, 2, 8, 48, device=d) for x in "qkv"}, ValueError,
                      r"16, 32, 64, 80, 96, 128"),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "triton"])
@pytest.mark.parametrize("case", BAD_EVERYWHERE)
def test_bad_input_every_backend(device, backend, case):
    over, error, match = BAD_EVERYWHERE[case]
    with pytest.raises(error, match=match), use_backend(backend):
        gpt_kernels.attention(**_bad(device, **over(device)))


@pytest.mark.parametrize("case", BAD_FOR_TRITON)
def test_bad_input_for_the_kernels(device, case):
    over, error, match = BAD_FOR_TRITON[case]
    with pytest.raises(error, match=match), use_backend("triton"):
        gpt_kernels.attention(**_bad(device, **over(device)))
    with use_backend("torch"):  # computable: the torch backend takes it
        gpt_kernels.attention(**_bad(device, **over(device)))


def test_causal_tq_gt_tk_is_fine_without_causal(device):
    """Cross-attention shapes (Tq > Tk) are refused only with ``causal``; without it every backend computes
    the same finite answer."""
    q, k, v = _qkv(1, 2, 9, 5, 16, f32, device)
    outs = {}
    for backend in ("torch", "reference", "triton"):
        with use_backend(backend):
            outs[backend] = gpt_kernels.attention(q, k, v, causal=False)
    assert torch.isfinite(outs["reference"]).all()
    for backend in ("torch", "triton"):
        torch.testing.assert_close(outs[backend], outs["reference"], rtol=1e-4, atol=1e-5)


def test_not_a_tensor(device):
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fa._attention(**_bad(device, q=[1.0]))


def test_mismatched_devices():
    q, k, v = _qkv(1, 2, 8, 8, 16, f32, "cpu")
    with pytest.raises(ValueError, match="one device"):
        fa._check_inputs(q, k, v.to("meta"), True, 0.0, None)


def test_dropout_mask_rejects_bad_p(device):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fa.attention_dropout_mask(0, 1, 1, 4, 4, 1.5, device)


# ----------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("T,D", [(1024, 64), (2048, 128), (8192, 128), (1000, 80), (777, 96)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_long(T, D, causal):
    B, H = (1, 2) if T >= 8192 else (2, 3)
    check_kernel(*_qkv(B, H, T, T, D, bf16, "cuda"), causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("Tq,Tk", [(1, 1023), (7, 300), (256, 256)])
def test_gpu_decode_and_dtypes(dtype, Tq, Tk):
    check_kernel(*_qkv(2, 4, Tq, Tk, 64, dtype, "cuda"), True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_dropout(D):
    check_kernel(*_qkv(2, 4, 1000, 1000, D, bf16, "cuda"), True, dropout_p=0.1, seed=77)


def _forced_cases():
    """Every autotune config, forced, at each head dim and dropout setting it serves."""
    out = []
    for name, configs in (("fwd", fa.FWD_CONFIGS), ("dkdv", fa.DKDV_CONFIGS), ("dq", fa.DQ_CONFIGS),
                          ("bwd_atomic", fa.BWD_ATOMIC_CONFIGS), ("splitk", fa.SPLITK_CONFIGS)):
        for c in configs:
            for block_d, dropout in [(d, False) for d in c.block_d] + [(d, True) for d in c.dropout_block_d]:
                tag = f"{name}-{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}-D{block_d}"
                tag += ("-fp32" if c.fp32 else "") + ("-dropout" if dropout else "")
                out.append(pytest.param(name, c, block_d, dropout, id=tag))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name,config,block_d,dropout", _forced_cases())
def test_gpu_every_autotune_config(monkeypatch, name, config, block_d, dropout):
    if fa._arch_family(torch.device("cuda")) not in config.archs:
        pytest.skip(f"config serves sm_{config.archs}, not this GPU")
    monkeypatch.setattr(fa, "FORCE_CONFIGS", {name: config})
    dtype = f32 if config.fp32 else bf16
    D = {64: 64, 128: 96}[block_d]  # 96: the padded head dim path
    Tq = 7 if name == "splitk" else 333  # flash-decoding: one query block against many keys
    if name == "splitk":
        monkeypatch.setattr(fa, "SPLIT_K", 3)
    try:
        check_kernel(*_qkv(2, 2, Tq, 333, D, dtype, "cuda"), True, dropout_p=0.1 if dropout else 0.0, seed=3,
                     atomic_dq=name == "bwd_atomic")
    except OutOfResources as e:  # a GPU with less shared memory a program (sm_86, sm_89): the autotuner prunes it
        if e.name != "shared memory":
            raise
        pytest.skip(f"needs {e.required} B of shared memory a program, this GPU has {e.limit} B: pruned here")


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_T():
    """No (T x T) buffer: the forward and backward's extra memory grows linearly with T."""
    def extra(T):
        q, k, v = (x.requires_grad_() for x in _qkv(1, 4, T, T, 64, bf16, "cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with use_backend("triton"):
            gpt_kernels.attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, big = extra(4096), extra(16384)
    assert big < 6 * small, f"peak extra memory {small} B at T=4096 but {big} B at T=16384: not linear"
    assert big < 16384 * 16384 * 2, "as much memory as one (T x T) bf16 matrix"


@pytest.mark.gpu
def test_gpu_matches_sdpa_on_model_shapes():
    """GPT-2 small's attention (B=4, H=12, T=1024, D=64) from a fused qkv, bf16, against SDPA."""
    B, T, H, D = 4, 1024, 12, 64
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=bf16, requires_grad=True)
    with use_backend("triton"):
        out = gpt_kernels.attention(*(qkv[:, :, i].transpose(1, 2) for i in range(3)), causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(qkv[:, :, i].transpose(1, 2) for i in range(3)),
                                                           is_causal=True)
    assert max_err(out, ref) < 2e-2
