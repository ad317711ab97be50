"""GELU and bias + GELU kernels against the float64 reference (Triton interpreter on CPU).

Every output and every gradient is held to ``gpt_kernels.testing.assert_close_to_ref``: the kernel's error
against float64 may be at most twice PyTorch's own at the same dtype, plus an atol of four units in the
last place of the largest reference value (the kernels compute in float32 and round each output once).
Every buffer the launchers allocate is filled with NaN first, so an element no program writes fails.
"""

import pytest
import torch
import torch.nn.functional as F

import gpt_kernels
from gpt_kernels import common, reference
from gpt_kernels.testing import assert_close_to_ref

_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _close(name, out, ref, base, dtype):
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype}, torch gives {base.dtype}"
    # 4 units in the last place of the largest value: the erf form's backward, Phi(x) + x phi(x), is ~10
    # dependent float32 operations that cancel near x = -0.75, and with a handful of elements torch's own
    # error can happen to be tiny (seen: ours 1.6 ulp, torch 0.3 ulp, on a (5, 1) input)
    atol = 4.0 * _EPS[dtype] * (ref.detach().abs().max().item() if ref.numel() else 0.0) + 1e-12
    assert_close_to_ref(name, out, ref, base, atol=atol)


def _make(shape, dtype, device, layout="contiguous", scale=3.0):
    """Random values over GELU's interesting range (both tails): contiguous, with strided rows (a view
    (M, N) exists), or with strided columns (the launcher copies)."""
    if layout == "contiguous":
        return (scale * torch.randn(shape, device=device)).to(dtype)
    if layout == "rows":
        return (scale * torch.randn((*shape[:-2], 2 * shape[-2], shape[-1]), device=device)).to(dtype)[..., ::2, :]
    if layout == "cols":
        return (scale * torch.randn((*shape[:-1], 2 * shape[-1]), device=device)).to(dtype)[..., ::2]
    raise ValueError(layout)


def _check_gelu(x, approximate, call=None):
    """gelu on the Triton backend vs the float64 reference vs F.gelu at x's dtype: y and dx."""
    dtype = x.dtype
    x = x.detach().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        y = call(x) if call else gpt_kernels.gelu(x, approximate=approximate)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = reference.gelu(x64, approximate)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xt = x.detach().clone().requires_grad_()
    yt = F.gelu(xt, approximate=approximate)
    (dxt,) = torch.autograd.grad(yt, xt, dy)
    _close(f"gelu[{approximate}] {tuple(x.shape)} {dtype} y", y, y64, yt, dtype)
    _close(f"gelu[{approximate}] {tuple(x.shape)} {dtype} dx", dx, dx64, dxt, dtype)


def _check_bias_gelu(x, bias, approximate):
    """bias_gelu on the Triton backend vs the float64 reference vs torch at x's dtype: y, dx, dbias."""
    dtype = x.dtype
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.bias_gelu(x, bias, approximate=approximate)
    dy = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, (x, bias), dy)]
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, bias))
    y64 = reference.bias_gelu(x64, b64, approximate)
    ref = [y64, *torch.autograd.grad(y64, (x64, b64), dy.double())]
    xt, bt = (t.detach().clone().requires_grad_() for t in (x, bias))
    yt = F.gelu(xt + bt, approximate=approximate)
    base = [yt, *torch.autograd.grad(yt, (xt, bt), dy)]
    for nm, g, r, b in zip(("y", "dx", "dbias"), got, ref, base):
        _close(f"bias_gelu[{approximate}] {tuple(x.shape)} {dtype} {nm}", g, r, b, dtype)


# ---------------------------------------------------------------------------------------------- gelu


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1023), (2, 3, 2, 1600)], ids=lambda s: "x".join(map(str, s)))
def test_gelu_matches_reference(device, shape, dtype, approximate):
    # (2, 3, 2, 1600) = 19200 elements: five programs of 4096, the last one ragged
    _check_gelu(_make(shape, dtype, device), approximate)


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_gelu_non_contiguous(device, layout):
    x = _make((5, 2, 130), torch.float16, device, layout)
    assert not x.is_contiguous()
    _check_gelu(x, "tanh")
    _check_gelu(x.transpose(0, 2), "none")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter: x**3
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_tails(device, dtype, approximate):
    """Far tails: gelu(x) is exactly x or 0 and its derivative exactly 1 or 0, even where x**3 overflows
    (torch's own tanh-form backward gives NaN there); near ones within a few units of x's last place."""
    big = 60000.0 if dtype == torch.float16 else 1e30
    x = torch.tensor([-big, -1e4, -100.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 100.0, 1e4, big],
                     device=device).to(dtype).requires_grad_()
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.gelu(x, approximate=approximate)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    far = x.detach().abs() >= 100
    assert torch.equal(y[far], torch.where(x[far] > 0, x[far], 0.0).detach()), y
    assert torch.equal(dx[far], (x[far] > 0).to(dtype)), dx
    x64 = x[~far].detach().double().requires_grad_()
    y64 = reference.gelu(x64, approximate)
    (dx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    # gelu = x * Phi(x), Phi computed to float32's absolute precision: the error scales with |x|
    err = (y[~far].double() - y64).abs()
    assert torch.all(err <= 4 * _EPS[dtype] * x64.abs() + 1e-7), f"y {y.tolist()} vs {y64.tolist()}"
    assert_close_to_ref(f"gelu[{approximate}] tails dx", dx[~far], dx64, atol=4 * _EPS[dtype])


def test_gelu_default_is_erf_like_torch(device):
    x = _make((64,), torch.float32, device)
    _check_gelu(x, "none", call=gpt_kernels.gelu)  # no approximate argument: the exact form, as F.gelu


def test_gelu_zero_size(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.gelu(x, approximate="tanh")
    assert y.shape == (0, 5)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == (0, 5)


def test_gelu_bad_input(device):
    x = torch.randn(4, device=device)
    with gpt_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
            gpt_kernels.gelu(x, approximate="fast")
        with pytest.raises(TypeError, match="got torch.float64"):
            gpt_kernels.gelu(x.double())
        with pytest.raises(TypeError, match="got torch.int32"):
            gpt_kernels.gelu(torch.ones(4, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------- bias_gelu


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 768), (5, 1), (9, 7), (70, 24), (3, 1023), (2, 3, 2, 40), (37, 1600)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_matches_reference(device, shape, dtype, approximate):
    # (70, 24): tiles of 64 rows, two row groups; (37, 1600): two column tiles (the second ragged) and
    # two row groups of five 4-row steps in the backward
    x = _make(shape, dtype, device)
    bias = torch.randn(shape[-1], device=device).to(dtype)
    _check_bias_gelu(x, bias, approximate)


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_bias_gelu_non_contiguous(device, layout):
    x = _make((5, 2, 130), torch.float16, device, layout)
    bias = torch.randn(260, device=device).to(torch.float16)[::2]
    _check_bias_gelu(x, bias, "tanh")


def test_bias_gelu_default_is_tanh(device):
    x, bias = _make((3, 16), torch.float32, device), torch.randn(16, device=device)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.bias_gelu(x, bias)
    torch.testing.assert_close(y, F.gelu(x + bias, approximate="tanh"))


def test_bias_gelu_non_contiguous_grad(device):
    x = _make((6, 130), torch.float32, device).requires_grad_()
    bias = torch.randn(130, device=device, requires_grad=True)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.bias_gelu(x, bias)
    for dy in (torch.randn(12, 130, device=device)[::2], torch.randn(1, 130, device=device).expand(6, 130)):
        got = torch.autograd.grad(y, (x, bias), dy, retain_graph=True)
        want = torch.autograd.grad(F.gelu(x + bias, approximate="tanh"), (x, bias), dy.contiguous())
        for nm, a, r in zip(("dx", "dbias"), got, want):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=nm)


def test_bias_gelu_is_deterministic(device):
    x = _make((70, 24), torch.float32, device).requires_grad_()
    bias = torch.randn(24, device=device, requires_grad=True)
    dy = torch.randn(70, 24, device=device)
    runs = []
    for _ in range(2):
        with gpt_kernels.use_backend("triton"):
            y = gpt_kernels.bias_gelu(x, bias)
        runs.append(torch.autograd.grad(y, (x, bias), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bias_gelu_zero_rows(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    with gpt_kernels.use_backend("triton"):
        y = gpt_kernels.bias_gelu(x, bias)
    assert y.shape == (0, 5)
    dx, db = torch.autograd.grad(y.sum(), (x, bias))
    assert dx.shape == (0, 5) and torch.equal(db, torch.zeros_like(bias))


def test_bias_gelu_bad_input(device):
    x = torch.randn(2, 8, device=device)
    with gpt_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            gpt_kernels.bias_gelu(x, torch.randn(7, device=device))
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            gpt_kernels.bias_gelu(x, torch.randn(2, 8, device=device))
        with pytest.raises(TypeError, match="bias must be float16, bfloat16 or float32 .*torch.int64"):
            gpt_kernels.bias_gelu(x, torch.ones(8, device=device, dtype=torch.long))
        with pytest.raises(TypeError, match="got torch.float64"):
            gpt_kernels.bias_gelu(x.double(), torch.randn(8, device=device).double())
        with pytest.raises(ValueError, match="approximate must be"):
            gpt_kernels.bias_gelu(x, torch.randn(8, device=device), approximate="erf")


# ---------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [768, 3072, 4096, 5120, 6400])
def test_gpu_gpt2_widths(n, dtype, approximate):
    x = _make((1031, n), dtype, "cuda")  # 1031 rows: prime, ragged in every tiling
    bias = torch.randn(n, device="cuda").to(dtype)
    _check_bias_gelu(x, bias, approximate)
    _check_gelu(x, approximate)


@pytest.mark.gpu
def test_gpu_many_rows_bf16():
    x = _make((8, 1024, 3072), torch.bfloat16, "cuda")
    _check_bias_gelu(x, torch.randn(3072, device="cuda").to(torch.bfloat16), "tanh")
