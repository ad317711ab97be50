"""Every fused op under torch.autocast: the dtypes of gpt_kernels.autocast's policy, on every backend, and values.

Each op runs as the model runs it under autocast (fp32 master weights, an fp32 residual stream, bf16/fp16
activations out of the matmuls) on the Triton backend and on the torch backend: on the CPU the kernels run
in the interpreter (CPU autocast applies the same dtype logic as CUDA's), on a GPU machine on CUDA. Both
backends must return the policy's dtypes for every output and every gradient, and the Triton result is
held to the three-way rule of the rest of the suite: its error against a float64 computation of the same
function is at most twice the torch backend's error plus a few units in the last place of the output dtype.
"""

import pytest
import torch

import gpt_kernels
from gpt_kernels import reference
from gpt_kernels.testing import assert_close_to_ref

pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

AMP = [torch.bfloat16, torch.float16]
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine: CUDA autocast, compiled kernels


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype).requires_grad_()


def _run(backend, amp, fn, inputs, grad_seed=0):
    """fn(*inputs) on ``backend`` under autocast(amp): (outputs, gradients of the inputs for random dys)."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with gpt_kernels.use_backend(backend), torch.autocast(DEVICE, dtype=amp):
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(grad_seed)
    dys = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], dys)
    return outs, grads, dys


def _float64(fn64, inputs, dys):
    """The same function in float64 (no autocast): the exact answer both backends are measured against."""
    inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn64(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], [d.double() for d in dys])
    return outs, grads


def _check(name, amp, fn, fn64, inputs, out_dtypes):
    """Both backends give ``out_dtypes`` and gradients in each input's dtype; Triton's values pass the rule."""
    k_outs, k_grads, dys = _run("triton", amp, fn, inputs)
    t_outs, t_grads, _ = _run("torch", amp, fn, inputs)
    r_outs, r_grads = _float64(fn64, inputs, dys)
    assert [o.dtype for o in k_outs] == list(out_dtypes), f"{name}: triton outputs {[o.dtype for o in k_outs]}"
    assert [o.dtype for o in t_outs] == list(out_dtypes), f"{name}: torch outputs {[o.dtype for o in t_outs]}"
    want = [t.dtype for t in inputs if t.requires_grad]
    assert [g.dtype for g in k_grads] == want, f"{name}: triton gradients {[g.dtype for g in k_grads]}"
    assert [g.dtype for g in t_grads] == want, f"{name}: torch gradients {[g.dtype for g in t_grads]}"
    for i, (k, t, r) in enumerate(zip(k_outs + k_grads, t_outs + t_grads, r_outs + r_grads)):
        ulp = max(_EPS[k.dtype], _EPS[amp])  # every value passed through amp at least once
        assert_close_to_ref(f"{name} [{i}] {k.dtype}", k, r, t, atol=4 * ulp * r.detach().abs().max().item())


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_layer_norm_fp32_stream_gives_amp_output(amp):
    x, w, b = _leaf(5, 2, 48), _leaf(48, scale=0.5), _leaf(48, scale=0.5)
    _check("layer_norm", amp, lambda x, w, b: gpt_kernels.layer_norm(x, (48,), w, b),
           lambda x, w, b: reference.layer_norm(x, (48,), w, b), [x, w, b], [amp])


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_add_layer_norm_bf16_branch_onto_fp32_stream(amp):
    """The attention branch (amp, out of a matmul) added to the fp32 residual: the sum stays fp32, the norm
    goes to the next matmul in amp; each input's gradient comes back in its own dtype."""
    a, x, w, b = _leaf(7, 40, dtype=amp), _leaf(7, 40), _leaf(40, scale=0.5), _leaf(40, scale=0.5)
    _check("add_layer_norm", amp, lambda a, x, w, b: gpt_kernels.add_layer_norm(a, x, w, b),
           lambda a, x, w, b: reference.add_layer_norm(a, x, w, b), [a, x, w, b], [torch.float32, amp])


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_bias_gelu_fp32_bias_with_amp_activation(amp):
    """As nn.Linear under autocast: the bias rounded to amp, the output in amp, dbias in the bias' fp32."""
    h, b = _leaf(6, 33, dtype=amp, scale=2.0), _leaf(33)
    _check("bias_gelu", amp, lambda h, b: gpt_kernels.bias_gelu(h, b),
           lambda h, b: reference.bias_gelu(h, b.to(amp).double()), [h, b], [amp])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("amp", AMP, ids=str)
def test_bias_gelu_rounds_the_fp32_bias_to_amp_first(amp, backend):
    """Where x + bias nearly cancels, rounding the fp32 bias to amp first (as nn.Linear does under autocast)
    decides the result: x = -bias rounded to amp plus a small part, so x + round(bias) is that small part,
    while x + bias is off by the bias' rounding residue (up to half a unit in amp's last place at |bias| in
    [1, 2): 4e-3 in bf16, 5e-4 in fp16), a large fraction of it. Each element is held to its own value,
    not to the tensor's largest: within two units in amp's last place of the float64 answer."""
    if backend == "triton" and amp == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter rounds fp32 to bf16 by truncation, a GPU to nearest: a GPU case "
                    "(float16 runs here)")
    b = ((1 + torch.rand(64, device=DEVICE)) * torch.sign(torch.randn(64, device=DEVICE))).requires_grad_()
    small = 0.05 * torch.randn(8, 64, device=DEVICE)
    h = (small - b.detach().to(amp).float()).to(amp)  # (8, 64): x + round(b) is exact, about `small`
    with gpt_kernels.use_backend(backend), torch.autocast(DEVICE, dtype=amp):
        y = gpt_kernels.bias_gelu(h, b)
    exact = reference.bias_gelu(h.double(), b.detach().to(amp).double())
    err = ((y.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert err <= 2 * _EPS[amp], f"{backend}: worst element off by {err:.2e} of itself (bias not rounded to {amp}?)"


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, "amp"])
def test_gelu_keeps_its_input_dtype(amp, dtype):
    x = _leaf(4, 30, dtype=amp if dtype == "amp" else dtype, scale=2.0)
    _check("gelu", amp, lambda x: gpt_kernels.gelu(x, approximate="tanh"),
           lambda x: reference.gelu(x, "tanh"), [x], [x.dtype])


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_attention_casts_q_k_v_to_amp(amp):
    """fp32 q with k, v of another dtype (a cache kept in fp32): all three run in amp, as SDPA's autocast."""
    q, k, v = _leaf(1, 2, 19, 16), _leaf(1, 2, 19, 16, dtype=amp), _leaf(1, 2, 19, 16)
    _check("attention", amp, lambda q, k, v: gpt_kernels.attention(q, k, v, causal=True),
           lambda q, k, v: reference.attention(q, k, v, causal=True), [q, k, v], [amp])


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_cross_entropy_loss_is_fp32(amp):
    logits, t = _leaf(9, 301, dtype=amp, scale=3.0), torch.randint(0, 301, (9,), device=DEVICE)
    t[2] = -100
    _check("cross_entropy", amp, lambda x: gpt_kernels.cross_entropy(x, t, label_smoothing=0.1),
           lambda x: reference.cross_entropy(x, t, label_smoothing=0.1), [logits], [torch.float32])


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_linear_cross_entropy_projects_in_amp(amp):
    h, w, t = _leaf(13, 16), _leaf(70, 16, scale=0.5), torch.randint(0, 64, (13,), device=DEVICE)
    _check("linear_cross_entropy", amp,
           lambda h, w: gpt_kernels.linear_cross_entropy(h, w, t, num_classes=64, chunk_size=5),
           lambda h, w: reference.linear_cross_entropy(h, w[:64], t), [h, w], [torch.float32])


def test_mixed_dtypes_without_autocast_follow_torch_promotion():
    """No autocast: the sum and bias + GELU take the dtype ``x + residual`` / ``x + bias`` would have."""
    a, x = torch.randn(3, 24, device=DEVICE).bfloat16(), torch.randn(3, 24, device=DEVICE)
    h, b = torch.randn(3, 24, device=DEVICE).bfloat16(), torch.randn(24, device=DEVICE)
    w, b0 = torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE)
    for backend in ("triton", "torch", "reference"):
        with gpt_kernels.use_backend(backend):
            s, y = gpt_kernels.add_layer_norm(a, x)
            z = gpt_kernels.bias_gelu(h, b)
            ln = gpt_kernels.layer_norm(a, (24,), w, b0)
        assert (s.dtype, y.dtype, z.dtype, ln.dtype) == (torch.float32, torch.float32, torch.float32,
                                                         torch.bfloat16), backend
        torch.testing.assert_close(s, a.float() + x)
        torch.testing.assert_close(z, torch.nn.functional.gelu(h.float() + b, approximate="tanh"))
