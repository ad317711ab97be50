"""LayerNorm and residual-add + LayerNorm kernels against the float64 reference (Triton interpreter on CPU).

Every output and every gradient is held to ``gpt_kernels.testing.assert_close_to_ref``: the kernel's error
against float64 may be at most twice PyTorch's own at the same dtype, plus an atol of two units in the
last place of the largest reference value (``_atol``): the kernels compute in float32 and round each
output once. Every buffer the launchers allocate is filled with NaN first (``_poison`` fixture), so an
element no program writes fails.
"""

import pytest
import torch
import torch.nn.functional as F

import gpt_kernels
from gpt_kernels import common, norm, reference
from gpt_kernels.testing import assert_close_to_ref

_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _atol(ref: torch.Tensor, dtype: torch.dtype, ulps: float = 2.0) -> float:
    """A few units in the last place of the largest reference value, at the working dtype."""
    return ulps * _EPS[dtype] * (ref.detach().abs().max().item() if ref.numel() else 0.0) + 1e-12


def _close(name, out, ref, base, dtype):
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype}, torch gives {base.dtype}"
    assert_close_to_ref(name, out, ref, base, atol=_atol(ref, dtype))


def _make(shape, dtype, device, layout="contiguous"):
    """A random tensor of ``shape``: contiguous, with strided rows (a slice of every other row: unit
    column stride, so the launcher keeps a view), or with strided columns (the launcher copies)."""
    if layout == "contiguous":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "rows":  # every other row: the rows stay one uniform stride apart, a view (M, N) exists
        return torch.randn((*shape[:-2], 2 * shape[-2], shape[-1]), device=device).to(dtype)[..., ::2, :]
    if layout == "cols":
        return torch.randn((*shape[:-1], 2 * shape[-1]), device=device).to(dtype)[..., ::2]
    raise ValueError(layout)


def _params(n, dtype, device, has_weight, has_bias):
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_() if has_weight else None
    b = (0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_() if has_bias else None
    return w, b


def _grads(outputs, inputs, grad_outputs):
    """Gradients of ``outputs`` w.r.t. the non-None ``inputs``, for the given output gradients."""
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def _as(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_()


def _check_layer_norm(x, w, b, eps=1e-5, name="layer_norm"):
    """layer_norm on the Triton backend vs float64 reference vs F.layer_norm at x's dtype: y, dx, dw, db."""
    dtype, n = x.dtype, x.shape[-1]
    x = x.detach().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.layer_norm(x, (n,), w, b, eps)
    dy = torch.randn_like(y)
    got = [y, *_grads(y, (x, w, b), dy)]

    x64, w64, b64 = _as(x, torch.float64), _as(w, torch.float64), _as(b, torch.float64)
    y64 = reference.layer_norm(x64, (n,), w64, b64, eps)
    ref = [y64, *_grads(y64, (x64, w64, b64), dy.double())]

    xt, wt, bt = _as(x, dtype), _as(w, None if w is None else w.dtype), _as(b, None if b is None else b.dtype)
    yt = F.layer_norm(xt, (n,), wt, bt, eps)
    base = [yt, *_grads(yt, (xt, wt, bt), dy)]

    names = ["y", "dx"] + (["dweight"] if w is not None else []) + (["dbias"] if b is not None else [])
    for nm, g, r, bs in zip(names, got, ref, base):
        _close(f"{name} {tuple(x.shape)} {dtype} {nm}", g, r, bs, dtype)
    return got


# ---------------------------------------------------------------------------------------- layer_norm

SHAPES = [
    (1, 768),  # one row
    (3, 1),  # width 1: y is the bias, dx is zero
    (5, 7),  # prime width, fewer rows than a program's tile
    (150, 24),  # narrow rows: several row tiles in the forward, row groups with loops in the backward
    (37, 768),  # backward: 4 row groups of several 2-row steps, the last group ragged
    (4, 1023),  # a width one short of the block
    (3, 1600),  # gpt2-xl
    (2, 3, 2, 40),  # three leading dimensions
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_reference(device, shape, dtype):
    x = _make(shape, dtype, device)
    w, b = _params(shape[-1], dtype, device, True, True)
    _check_layer_norm(x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_weight_and_bias(device, dtype, has_weight, has_bias):
    x = _make((37, 96), dtype, device)
    w, b = _params(96, dtype, device, has_weight, has_bias)
    _check_layer_norm(x, w, b)


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_non_contiguous(device, dtype, layout):
    x = _make((9, 2, 200), dtype, device, layout)
    assert not x.is_contiguous()
    assert (common.as_rows(x, 200).stride(0) == 400) == (layout == "rows")  # a strided view, or a copy
    w, b = _params(200, dtype, device, True, True)
    _check_layer_norm(x, w, b)


def test_layer_norm_non_contiguous_grad(device):
    """An incoming gradient with strided rows (from a later slice) and one expanded along rows."""
    x = _make((6, 130), torch.float32, device).requires_grad_()
    w, b = _params(130, torch.float32, device, True, True)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.layer_norm(x, (130,), w, b)
    g = torch.randn(6, 130, device=device)
    for dy in (torch.randn(12, 130, device=device)[::2], g[:1].expand(6, 130)):
        got = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        want = torch.autograd.grad(F.layer_norm(x, (130,), w, b), (x, w, b), dy.contiguous())
        for nm, a, r in zip(("dx", "dweight", "dbias"), got, want):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=nm)


def test_add_layer_norm_non_contiguous_grads(device):
    """Incoming gradients on both outputs with strided rows, each a different stride."""
    x, r = _make((6, 130), torch.float32, device).requires_grad_(), _make((6, 130), torch.float32, device)
    w, b = _params(130, torch.float32, device, True, True)
    with gpt_kernels.use_backend("triton"):
        s, y = gpt_kernels.add_layer_norm(x, r, w, b)
    ds, dy = torch.randn(12, 130, device=device)[::2], torch.randn(18, 130, device=device)[::3]
    got = torch.autograd.grad((s, y), (x, w, b), (ds, dy))
    st = x + r
    want = torch.autograd.grad((st, F.layer_norm(st, (130,), w, b)), (x, w, b), (ds.contiguous(), dy.contiguous()))
    for nm, a, r_ in zip(("dx", "dweight", "dbias"), got, want):
        torch.testing.assert_close(a, r_, rtol=1e-5, atol=1e-5, msg=nm)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_layer_norm_eps(device, eps):
    x = 0.01 * _make((4, 33), torch.float32, device)  # variance of the order of eps: eps matters
    w, b = _params(33, torch.float32, device, True, True)
    _check_layer_norm(x, w, b, eps=eps)


def test_layer_norm_float32_weight_with_half_input(device):
    """Mixed precision: float16 activations with float32 parameters, as torch allows: y is float16,
    the parameter gradients float32."""
    x = _make((5, 64), torch.float16, device)
    w, b = _params(64, torch.float32, device, True, True)
    y, dx, dw, db = _check_layer_norm(x, w, b)
    assert y.dtype == dx.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32


def test_layer_norm_int_normalized_shape(device):
    x = _make((3, 16), torch.float32, device)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.layer_norm(x, 16)
    torch.testing.assert_close(y, F.layer_norm(x, (16,)))


def test_layer_norm_is_deterministic(device):
    x = _make((150, 24), torch.float32, device).requires_grad_()
    w, b = _params(24, torch.float32, device, True, True)
    dy = torch.randn(150, 24, device=device)
    runs = []
    for _ in range(2):
        with gpt_kernels.use_backend("triton"):
            y = gpt_kernels.layer_norm(x, (24,), w, b)
        runs.append(torch.autograd.grad(y, (x, w, b), dy))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ------------------------------------------------------------------------------------ add_layer_norm


def _check_add_layer_norm(x, r, w, b, use_s=True, use_y=True, eps=1e-5):
    """add_layer_norm on Triton vs float64 reference vs torch at x's dtype: s, y, dx, dresidual, dw, db,
    with gradients arriving on the sum (``use_s``), on the norm (``use_y``) or on both."""
    dtype, n = x.dtype, x.shape[-1]
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        s, y = gpt_kernels.add_layer_norm(x, r, w, b, eps)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    outs = [o for o, u in ((s, use_s), (y, use_y)) if u]
    gos = [g for g, u in ((ds, use_s), (dy, use_y)) if u]
    params = (lambda *t: t) if use_y else (lambda *t: t[:2])  # with the norm unused, w and b get no gradient
    got = [s, y, *_grads(outs, params(x, r, w, b), gos)]

    x64, r64, w64, b64 = (_as(t, torch.float64) for t in (x, r, w, b))
    s64, y64 = reference.add_layer_norm(x64, r64, w64, b64, eps)
    outs64 = [o for o, u in ((s64, use_s), (y64, use_y)) if u]
    ref = [s64, y64, *_grads(outs64, params(x64, r64, w64, b64), [g.double() for g in gos])]

    xt, rt, wt, bt = _as(x, dtype), _as(r, dtype), _as(w, dtype), _as(b, dtype)
    st = xt + rt
    yt = F.layer_norm(st, (n,), wt, bt, eps)
    outst = [o for o, u in ((st, use_s), (yt, use_y)) if u]
    base = [st, yt, *_grads(outst, params(xt, rt, wt, bt), gos)]

    names = ["s", "y", "dx", "dresidual"]
    if use_y:
        names += (["dweight"] if w is not None else []) + (["dbias"] if b is not None else [])
    for nm, g, rr, bs in zip(names, got, ref, base):
        _close(f"add_layer_norm {tuple(x.shape)} {dtype} {nm}", g, rr, bs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 768), (5, 7), (37, 768), (4, 1023), (3, 1600), (2, 3, 2, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_matches_reference(device, shape, dtype):
    x, r = _make(shape, dtype, device), _make(shape, dtype, device)
    w, b = _params(shape[-1], dtype, device, True, True)
    _check_add_layer_norm(x, r, w, b)


@pytest.mark.parametrize("use_s,use_y", [(True, False), (False, True)])
def test_add_layer_norm_one_output_used(device, use_s, use_y):
    x, r = _make((37, 96), torch.float32, device), _make((37, 96), torch.float32, device)
    w, b = _params(96, torch.float32, device, True, True)
    _check_add_layer_norm(x, r, w, b, use_s=use_s, use_y=use_y)


def test_add_layer_norm_param_grads_without_norm_gradient(device):
    """Only the sum used: the weight and bias get no gradient (None, as torch gives for unused)."""
    x, r = _make((4, 16), torch.float32, device).requires_grad_(), _make((4, 16), torch.float32, device)
    w, b = _params(16, torch.float32, device, True, True)
    with gpt_kernels.use_backend("triton"):
        s, _ = gpt_kernels.add_layer_norm(x, r, w, b)
    dx, dw, db = torch.autograd.grad(s, (x, w, b), torch.ones_like(s), allow_unused=True)
    assert torch.equal(dx, torch.ones_like(x)) and dw is None and db is None


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False)])
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_add_layer_norm_non_contiguous_and_optional_params(device, layout, has_weight, has_bias):
    x = _make((9, 2, 200), torch.float16, device, layout)
    r = _make((9, 2, 200), torch.float16, device, "contiguous" if layout == "cols" else "cols")
    w, b = _params(200, torch.float16, device, has_weight, has_bias)
    _check_add_layer_norm(x, r, w, b)


# ---------------------------------------------------------------------------------------- bad input


def _triton():
    return gpt_kernels.use_backend("triton")


def test_zero_rows_give_empty_outputs_and_zero_param_grads(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w, b = _params(8, torch.float32, device, True, True)
    with _triton():
        y = gpt_kernels.layer_norm(x, (8,), w, b)
        s, y2 = gpt_kernels.add_layer_norm(x, torch.randn(0, 8, device=device), w, b)
    assert y.shape == s.shape == y2.shape == (0, 8)
    dx, dw, db = torch.autograd.grad(y.sum() + y2.sum(), (x, w, b))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_zero_width_gives_empty_output(device):
    x = torch.randn(3, 0, device=device, requires_grad=True)
    with _triton():
        y = gpt_kernels.layer_norm(x, (0,))
    assert y.shape == (3, 0)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    assert dx.shape == (3, 0)


def test_bad_weight_shape(device):
    x = torch.randn(2, 8, device=device)
    with _triton(), pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        gpt_kernels.layer_norm(x, (8,), torch.ones(7, device=device))
    with _triton(), pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        gpt_kernels.add_layer_norm(x, x, torch.ones(8, device=device), torch.ones(2, 8, device=device))


def test_bad_normalized_shape(device):
    x = torch.randn(2, 4, 8, device=device)
    with _triton(), pytest.raises(ValueError, match="last dimension only"):
        gpt_kernels.layer_norm(x, (4, 8))
    with _triton(), pytest.raises(ValueError, match="does not match"):
        gpt_kernels.layer_norm(x, (4,))


def test_bad_dtypes(device):
    x = torch.randn(2, 8, device=device)
    with _triton(), pytest.raises(TypeError, match="input must be float16, bfloat16 or float32 .*got torch.float64"):
        gpt_kernels.layer_norm(x.double(), (8,))
    with _triton(), pytest.raises(TypeError, match="got torch.int64"):
        gpt_kernels.layer_norm(torch.ones(2, 8, dtype=torch.long, device=device), (8,))
    with _triton(), pytest.raises(TypeError, match="weight must be float16, bfloat16 or float32"):
        gpt_kernels.layer_norm(x, (8,), torch.ones(8, dtype=torch.float64, device=device))
    with _triton(), pytest.raises(TypeError, match="residual must be float16, bfloat16 or float32 .*torch.int64"):
        gpt_kernels.add_layer_norm(x, x.long())


def test_bad_residual_shape(device):
    x = torch.randn(2, 8, device=device)
    with _triton(), pytest.raises(ValueError, match="no broadcasting"):
        gpt_kernels.add_layer_norm(x, x[:1])


def test_width_beyond_one_block_limit(device):
    x = torch.randn(1, norm.MAX_N + 1, device=device)
    with _triton(), pytest.raises(ValueError, match=f"one-block limit of {norm.MAX_N}.*torch"):
        gpt_kernels.layer_norm(x, (norm.MAX_N + 1,))


# ---------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 1024, 1280, 1600, 3072, 4096, 5120, 6400, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_gpt2_widths(n, dtype):
    x = _make((1031, n), dtype, "cuda")  # 1031 rows: prime, ragged in every tiling
    r = _make((1031, n), dtype, "cuda")
    w, b = _params(n, dtype, "cuda", True, True)
    _check_layer_norm(x, w, b)
    _check_add_layer_norm(x, r, w, b)


@pytest.mark.gpu
def test_gpu_many_rows_bf16():
    x = _make((4, 4096, 768), torch.bfloat16, "cuda")
    w, b = _params(768, torch.bfloat16, "cuda", True, True)
    _check_layer_norm(x, w, b)
