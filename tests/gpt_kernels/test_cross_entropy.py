"""Fused cross-entropy and chunked linear + cross-entropy against float64 references.

Every loss and every gradient is held to ``gpt_kernels.testing.assert_close_to_ref``: the error against the
float64 reference may be at most twice PyTorch's own error at the same dtype, plus an atol of a few units
in the last place of the largest reference element (``_atol``): the kernel computes in fp32 and rounds
each output once to the working dtype, so one rounding of the output is the floor of what it can reach.
"""

import pytest
import torch
import torch.nn.functional as F

import gpt_kernels
from gpt_kernels import fused_cross_entropy as fce
from gpt_kernels import reference
from gpt_kernels.testing import assert_close_to_ref, launched_kernels, poison_

GPT2_V = 50257
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _atol(ref: torch.Tensor, dtype: torch.dtype, ulps: float = 4.0) -> float:
    """A few units in the last place of the largest reference value, at the working dtype."""
    return ulps * _EPS[dtype] * (ref.detach().abs().max().item() if ref.numel() else 0.0) + 1e-12


def _targets(n, V, device, n_ignored=1, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, V, (n,), device=device, dtype=dtype)  # (n,)
    if n_ignored:
        t[torch.randperm(n, device=device)[:n_ignored]] = ignore_index
    return t


def _grad_out(loss):
    return torch.randn_like(loss)  # a scalar or (N,), never 1: the backward must scale


def _run_ce(x, t, **kw):
    """Loss and d logits of gpt_kernels.cross_entropy on the Triton backend, for a random incoming gradient."""
    x = x.detach().clone().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.cross_entropy(x, t, **kw)
    go = _grad_out(loss)
    (g,) = torch.autograd.grad(loss, x, go)
    return loss, g, go


def _ref_ce(x, t, go, upcast_to=torch.float64, **kw):
    """The same through the reference (float64) or through torch's F.cross_entropy at x's dtype."""
    if upcast_to is None:
        xx = x.detach().clone().requires_grad_()
        loss = F.cross_entropy(xx, t.long(), **kw)  # torch takes only int64 class ids
        (g,) = torch.autograd.grad(loss, xx, go)
        return loss, g
    xx = x.detach().to(upcast_to).requires_grad_()
    loss = reference.cross_entropy(xx, t, **kw)
    (g,) = torch.autograd.grad(loss, xx, go.to(upcast_to))
    return loss, g


def _check_ce(x, t, name, **kw):
    loss, g, go = _run_ce(x, t, **kw)
    ref_loss, ref_g = _ref_ce(x, t, go, **kw)
    base_loss, base_g = _ref_ce(x, t, go, upcast_to=None, **kw)
    assert loss.dtype == x.dtype and g.dtype == x.dtype
    assert_close_to_ref(f"{name} loss", loss, ref_loss, base_loss, atol=_atol(ref_loss, x.dtype))
    assert_close_to_ref(f"{name} d_logits", g, ref_g, base_g, atol=_atol(ref_g, x.dtype))
    return loss, g


# ------------------------------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V", [7, 1000])
def test_cross_entropy_matches_reference(device, V, dtype, reduction, smoothing):
    x = (torch.randn(9, V, device=device) * 3).to(dtype)  # (9, V); 1000 is not a multiple of BLOCK_V chunks
    t = _targets(9, V, device, n_ignored=2)
    _check_ce(x, t, f"V={V}", reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("none", 0.1), ("sum", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_gpt2_vocab(device, dtype, reduction, smoothing):
    # 50,257 columns = 12 full 4096-wide chunks and a ragged 1105-wide one; 3 rows, one ignored
    x = (torch.randn(3, GPT2_V, device=device) * 2).to(dtype)  # (3, 50257)
    t = torch.tensor([GPT2_V - 1, -100, 5], device=device)  # the last column is a target
    _check_ce(x, t, "V=50257", reduction=reduction, label_smoothing=smoothing)


def test_cross_entropy_bf16(device):
    x = (torch.randn(6, 1000, device=device) * 3).to(torch.bfloat16)  # (6, 1000)
    _check_ce(x, _targets(6, 1000, device), "bf16", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_row_int32_targets_and_ignore_index_inside_vocab(device, reduction):
    x = torch.randn(1, 1023, device=device)  # (1, 1023): a single row, prime-ish width
    t = torch.tensor([17], device=device, dtype=torch.int32)
    _check_ce(x, t, "one row", reduction=reduction)
    # ignore_index 0 lies inside [0, V): a row targeting 0 is ignored, not an error
    x = torch.randn(4, 13, device=device)  # (4, 13)
    t = torch.tensor([0, 3, 0, 12], device=device, dtype=torch.int32)
    _check_ce(x, t, "ignore_index=0", reduction=reduction, ignore_index=0)


def test_non_contiguous_logits(device):
    wide = torch.randn(5, 64, device=device)  # (5, 64)
    x = wide[:, :37]  # (5, 37) row stride 64: read in place, no copy
    t = _targets(5, 37, device)
    loss, g = _check_ce(x, t, "row-strided")
    x_t = torch.randn(37, 5, device=device).t()  # (5, 37), column stride 5: copied first
    _check_ce(x_t, t, "transposed")
    t_strided = torch.stack([t, t], 1)[:, 0]  # (5,) non-contiguous targets
    loss2, g2 = _run_ce(x, t_strided)[:2]
    assert_close_to_ref("strided targets", loss2, loss.double(), atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_rows_ignored(device, backend, smoothing):
    """The mean over zero valid targets is 0 with zero gradients on every backend, not torch's NaN."""
    x = torch.randn(4, 11, device=device, requires_grad=True)  # (4, 11)
    t = torch.full((4,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        with gpt_kernels.use_backend(backend):
            loss = gpt_kernels.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(loss, torch.zeros_like(loss)), f"{backend} {reduction}: loss {loss}"
        assert torch.equal(g, torch.zeros_like(g)), f"{backend} {reduction}: gradient not zero"


def test_torch_path_with_class_weight_guard(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)  # (4, 6)
    w = torch.rand(6, device=device)
    t = torch.tensor([1, -100, 3, 5], device=device)
    with gpt_kernels.use_backend("triton"):  # class weights: torch on every backend
        loss = gpt_kernels.cross_entropy(x, t, weight=w)
    assert torch.allclose(loss, F.cross_entropy(x, t, weight=w))
    with gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.cross_entropy(x, torch.full_like(t, -100), weight=w)
    assert loss.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_input_untouched_gradient_in_own_buffer(device, reduction):
    x = torch.randn(6, 300, device=device, requires_grad=True)  # (6, 300)
    before = x.detach().clone()
    t = _targets(6, 300, device)
    with gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    loss.backward(torch.ones_like(loss))
    assert torch.equal(x.detach(), before), "the forward or backward wrote into the logits"
    assert x.grad.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    # a second backward through a retained graph gives the same gradient (nothing saved is consumed)
    x.grad = None
    with gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.cross_entropy(x, t, reduction=reduction)
    (g1,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(g1, g2)


def test_forward_op_gives_loss_rows_and_logsumexp(device):
    """The forward pass alone: each row's loss and its log-sum-exp (what the backward reuses), no gradient."""
    x = torch.randn(5, 4100, device=device) * 3  # (5, 4100): a full 4096 chunk and a ragged tail
    t = _targets(5, 4100, device, n_ignored=1)
    loss_rows, lse = fce._cross_entropy_op(x, t, -100, 0.0)
    assert loss_rows.dtype == lse.dtype == torch.float32 and loss_rows.shape == lse.shape == (5,)
    assert_close_to_ref("lse", lse, torch.logsumexp(x.double(), dim=1), atol=1e-5)
    ref = reference.cross_entropy(x.double(), t, reduction="none")
    assert_close_to_ref("loss rows", loss_rows, ref, atol=1e-5)
    with gpt_kernels.use_backend("triton"), torch.no_grad():
        loss = gpt_kernels.cross_entropy(x.clone().requires_grad_(), t)
    assert not loss.requires_grad
    assert_close_to_ref("no_grad loss", loss, reference.cross_entropy(x.double(), t), atol=1e-5)


def test_kernel_writes_every_element(device):
    """Launch on NaN-poisoned loss, lse and gradient buffers: every element must be written."""
    V = 4100
    x = torch.randn(7, V, device=device)  # (7, 4100): one full 4096 chunk and a 4-wide tail
    t = _targets(7, V, device, n_ignored=2)
    loss, lse, grad = (poison_(torch.empty(7, device=device)), poison_(torch.empty(7, device=device)),
                       poison_(torch.empty_like(x)))
    fce._cross_entropy_rows(x, t, V, -100, 0.1, loss=loss, lse=lse, grad=grad)
    assert not loss.isnan().any() and not lse.isnan().any() and not grad.isnan().any()
    ignored = t == -100
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored]))
    # the gradient-only pass (cross_entropy's backward) from the saved lse, each row scaled by its factor
    scale = torch.randn(7, device=device)
    grad2 = poison_(torch.empty_like(x))
    fce._cross_entropy_rows(x, t, V, -100, 0.1, lse=lse, grad=grad2, row_scale=scale, forward=False)
    torch.testing.assert_close(grad2, grad * scale[:, None], rtol=1e-6, atol=1e-9)
    # one factor for every row: a stride-0 view of a scalar
    grad3 = poison_(torch.empty_like(x))
    fce._cross_entropy_rows(x, t, V, -100, 0.1, lse=lse, grad=grad3, row_scale=scale[:1].expand(7), forward=False)
    torch.testing.assert_close(grad3, grad * scale[0], rtol=1e-6, atol=1e-9)


def test_padding_classes_are_left_out(device):
    """Rows wider than V (a padded vocabulary): columns past V are not classes and get a zero gradient."""
    V, Vp = 1000, 1088
    x = torch.randn(5, Vp, device=device) * 2  # (5, Vp); the padding columns hold large values
    x[:, V:] = 50.0
    t = _targets(5, V, device)
    loss, lse, grad = (poison_(torch.empty(5, device=device)), poison_(torch.empty(5, device=device)),
                       poison_(torch.empty(5, Vp, device=device)))
    fce._cross_entropy_rows(x, t, V, -100, 0.1, loss=loss, lse=lse, grad=grad)
    want = x[:, :V].detach().double().requires_grad_()
    ref = reference.cross_entropy(want, t, reduction="none", label_smoothing=0.1)
    (ref_g,) = torch.autograd.grad(ref.sum(), want)
    assert_close_to_ref("padded loss", loss, ref, atol=1e-5)
    assert_close_to_ref("padded grad", grad[:, :V], ref_g, atol=1e-6)
    assert torch.equal(grad[:, V:], torch.zeros_like(grad[:, V:]))


def test_target_out_of_range_gives_nan_in_the_kernel(device):
    """Under torch.compile the host-side range check is skipped: the kernel marks the row NaN instead of
    reading outside the row, and its gradient too; other rows are unaffected."""
    x = torch.randn(3, 20, device=device)
    t = torch.tensor([3, 20, -100], device=device)
    loss_rows, lse = fce._cross_entropy_op(x, t, -100, 0.0)
    assert loss_rows[1].isnan() and loss_rows[0].isfinite() and loss_rows[2] == 0
    g = fce._cross_entropy_backward_op(torch.ones(3, device=device), x, t, lse, -100, 0.0)
    assert g[1].isnan().all() and g[0].isfinite().all() and torch.equal(g[2], torch.zeros_like(g[2]))


def test_launch_config():
    assert fce._launch_config(7) == (8, 1)
    assert fce._launch_config(1000) == (1024, 2)
    assert fce._launch_config(GPT2_V) == (4096, 8)
    assert fce._launch_config(50304) == (4096, 8)  # GPT-2's vocabulary padded to a multiple of 64
    compiled = {(c.constexprs["BLOCK_V"], c.num_warps, c.signature["X"]) for c in fce.compile_cases()}
    for V in (7, 1000, GPT2_V):
        block_v, warps = fce._launch_config(V)
        assert any(b == block_v and w == warps for b, w, _ in compiled), f"V={V} config not compile-checked"
    for dt in ("*fp32", "*bf16"):  # fp16 is compiled as bf16 (compile_check.stand_in, checked in test_compile.py)
        assert (4096, 8, dt) in compiled


def test_cross_entropy_bad_inputs(device):
    x = torch.randn(4, 10, device=device)  # (4, 10)
    t = torch.tensor([1, 2, 3, 4], device=device)
    with gpt_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            gpt_kernels.cross_entropy(x, torch.tensor([1, 10, 3, 4], device=device))
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            gpt_kernels.cross_entropy(x, torch.tensor([1, -1, 3, 4], device=device))
        with pytest.raises(TypeError, match="integer class ids"):
            gpt_kernels.cross_entropy(x, t.float())
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            gpt_kernels.cross_entropy(x, t[:3])
        with pytest.raises(ValueError, match=r"\(N, V\) logits"):
            gpt_kernels.cross_entropy(x.view(2, 2, 10), t.view(2, 2))
        with pytest.raises(ValueError, match=r"\(N, V\) logits"):
            gpt_kernels.cross_entropy(x[0], t[0])
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            gpt_kernels.cross_entropy(x.double(), t)
        with pytest.raises(ValueError, match="reduction must be"):
            gpt_kernels.cross_entropy(x, t, reduction="avg")
        with pytest.raises(ValueError, match="label_smoothing"):
            gpt_kernels.cross_entropy(x, t, label_smoothing=1.5)


# ------------------------------------------------------------------------------ linear_cross_entropy


def _linear_inputs(n, C, V, dtype, device, bias):
    h = torch.randn(n, C, device=device).to(dtype)  # (n, C)
    w = (torch.randn(V, C, device=device) / C**0.5 * 2).to(dtype)  # (V, C)
    b = torch.randn(V, device=device).to(dtype) if bias else None  # (V,)
    return h, w, b


def _run_linear(h, w, b, t, go=None, backend="triton", **kw):
    ins = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    if b is not None:
        ins.append(b.detach().clone().requires_grad_())
    with gpt_kernels.use_backend(backend):
        loss = gpt_kernels.linear_cross_entropy(ins[0], ins[1], t, ins[2] if b is not None else None, **kw)
    go = _grad_out(loss) if go is None else go
    return loss, torch.autograd.grad(loss, ins, go), go


def _ref_linear(h, w, b, t, go, **kw):
    ins = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    loss = reference.linear_cross_entropy(ins[0], ins[1], t, ins[2] if b is not None else None, **kw)
    return loss, torch.autograd.grad(loss, ins, go.double())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_cross_entropy_matches_reference(device, dtype, reduction, bias):
    N, C, V = 23, 16, 100
    h, w, b = _linear_inputs(N, C, V, dtype, device, bias)
    t = _targets(N, V, device, n_ignored=3)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    loss, grads, go = _run_linear(h, w, b, t, chunk_size=5, **kw)  # 5 does not divide 23
    ref_loss, ref_grads = _ref_linear(h, w, b, t, go, **kw)
    base_loss, base_grads, _ = _run_linear(h, w, b, t, go, backend="torch", **kw)
    assert loss.dtype == dtype
    assert_close_to_ref("loss", loss, ref_loss, base_loss, atol=_atol(ref_loss, dtype))
    for name, g, r, bg in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, base_grads):
        assert g.dtype == dtype
        # d_weight is rounded once per chunk (5 chunks here): allow that many ulps
        assert_close_to_ref(name, g, r, bg, atol=_atol(r, dtype, ulps=4 + 23 // 5))


@pytest.mark.parametrize("chunk", [1, 4, 7, 30])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_chunked_equals_unchunked(device, chunk, reduction):
    N, C, V = 17, 8, 33
    h, w, b = _linear_inputs(N, C, V, torch.float32, device, bias=True)
    t = _targets(N, V, device, n_ignored=2)
    one_loss, one_grads, go = _run_linear(h, w, b, t, chunk_size=N, reduction=reduction)
    with launched_kernels() as launched:
        loss, grads, _ = _run_linear(h, w, b, t, go, chunk_size=chunk, reduction=reduction)
    sweeps = 2 if reduction == "none" else 1  # "none": the backward sweeps the chunks again
    assert launched == ["_cross_entropy_kernel"] * (sweeps * -(-N // chunk)), "one launch per chunk and sweep"
    torch.testing.assert_close(loss, one_loss, rtol=1e-6, atol=1e-6)
    for g, g1 in zip(grads, one_grads):
        torch.testing.assert_close(g, g1, rtol=1e-5, atol=1e-6)


def test_linear_gpt2_vocab(device):
    N, C = 3, 8
    h, w, b = _linear_inputs(N, C, GPT2_V, torch.float32, device, bias=False)
    t = torch.tensor([GPT2_V - 1, 0, -100], device=device)
    loss, grads, go = _run_linear(h, w, None, t, chunk_size=2, label_smoothing=0.05)
    ref_loss, ref_grads = _ref_linear(h, w, None, t, go, label_smoothing=0.05)
    base_loss, base_grads, _ = _run_linear(h, w, None, t, go, backend="torch", label_smoothing=0.05)
    assert_close_to_ref("loss", loss, ref_loss, base_loss, atol=_atol(ref_loss, torch.float32))
    for name, g, r, bg in zip(("d_hidden", "d_weight"), grads, ref_grads, base_grads):
        assert_close_to_ref(name, g, r, bg, atol=_atol(r, torch.float32))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_all_rows_ignored(device, reduction):
    h, w, b = _linear_inputs(6, 8, 20, torch.float32, device, bias=True)
    t = torch.full((6,), -100, device=device)
    for backend in ("triton", "torch", "reference"):
        loss, grads, _ = _run_linear(h, w, b, t, go=None, backend=backend, reduction=reduction, chunk_size=4)
        assert torch.equal(loss, torch.zeros_like(loss)), f"{backend}: {loss}"
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), f"{backend}: gradient not zero"


def test_linear_requires_grad_awareness(device):
    N, C, V = 9, 8, 30
    h, w, b = _linear_inputs(N, C, V, torch.float32, device, bias=True)
    t = _targets(N, V, device)
    loss_rows = torch.empty(N, device=device)
    d_h, d_w, d_b = fce._chunked_linear_ce(h, w, b, t, V, -100, 0.0, 4, False, True, False, loss_rows)
    assert d_h is None and d_b is None and d_w is not None
    d_h, d_w, d_b = fce._chunked_linear_ce(h, w, None, t, V, -100, 0.0, 4, True, False, False, loss_rows)
    assert d_w is None and d_b is None and d_h is not None
    # frozen weight (a fine-tune of everything but the head): only d_hidden flows
    _, _, go = _run_linear(h, w, b, t)
    hg = h.clone().requires_grad_()
    with gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.linear_cross_entropy(hg, w, t, b, chunk_size=4)
    (g,) = torch.autograd.grad(loss, hg, go)
    ref_loss, ref_grads = _ref_linear(h, w, b, t, go)
    base_loss, base_grads, _ = _run_linear(h, w, b, t, go, backend="torch")
    assert_close_to_ref("d_hidden, frozen weight", g, ref_grads[0], base_grads[0], atol=_atol(ref_grads[0],
                                                                                          torch.float32))
    with gpt_kernels.use_backend("triton"), torch.no_grad():
        loss = gpt_kernels.linear_cross_entropy(h, w, t, b, chunk_size=4)
    assert_close_to_ref("no_grad loss", loss, ref_loss, base_loss, atol=_atol(ref_loss, torch.float32))


def test_linear_inputs_untouched(device):
    h, w, b = _linear_inputs(10, 8, 40, torch.float32, device, bias=True)
    h0, w0, b0 = h.clone(), w.clone(), b.clone()
    _run_linear(h, w, b, _targets(10, 40, device), chunk_size=3)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    with gpt_kernels.use_backend("triton"):
        gpt_kernels.linear_cross_entropy(hh, ww, _targets(10, 40, device), bb, chunk_size=3).backward()
    assert torch.equal(hh.detach(), h0) and torch.equal(ww.detach(), w0) and torch.equal(bb.detach(), b0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_linear_num_classes_ignores_padding_rows(device, backend, reduction):
    """A weight padded past the classes (a vocabulary padded for speed): the same loss and gradients as the
    unpadded weight, and zero gradient on the padding rows, whatever they hold."""
    N, C, V, Vp = 11, 8, 37, 48
    h, w, b = _linear_inputs(N, C, Vp, torch.float32, device, bias=True)
    w.data[V:] *= 20.0  # padding rows that would dominate the softmax if they took part
    t = _targets(N, V, device, n_ignored=2)
    loss, grads, go = _run_linear(h, w, b, t, backend=backend, reduction=reduction, chunk_size=4, num_classes=V,
                                  label_smoothing=0.1)
    ref_loss, ref_grads = _ref_linear(h, w[:V], b[:V], t, go, reduction=reduction, label_smoothing=0.1)
    assert_close_to_ref("loss", loss, ref_loss, atol=1e-5)
    d_h, d_w, d_b = grads
    assert_close_to_ref("d_hidden", d_h, ref_grads[0], atol=1e-5)
    assert_close_to_ref("d_weight classes", d_w[:V], ref_grads[1], atol=1e-5)
    assert_close_to_ref("d_bias classes", d_b[:V], ref_grads[2], atol=1e-5)
    assert torch.equal(d_w[V:], torch.zeros_like(d_w[V:])) and torch.equal(d_b[V:], torch.zeros_like(d_b[V:]))
    with gpt_kernels.use_backend(backend), pytest.raises(ValueError, match="num_classes"):
        gpt_kernels.linear_cross_entropy(h, w, t, num_classes=Vp + 1)


def test_linear_default_chunk():
    assert fce._default_chunk(GPT2_V, torch.bfloat16) == 1280  # 1280 x 50257 x 2 B = 123 MiB of logits
    assert fce._default_chunk(GPT2_V, torch.float32) == 640
    assert fce._default_chunk(7, torch.float32) % 64 == 0


def test_linear_bad_inputs(device):
    h, w, _ = _linear_inputs(4, 8, 10, torch.float32, device, bias=False)
    t = torch.tensor([1, 2, 3, 4], device=device)
    with gpt_kernels.use_backend("triton"):
        with pytest.raises(ValueError, match=r"hidden \(N, C\) and weight \(V, C\)"):
            gpt_kernels.linear_cross_entropy(h, w[:, :7], t)
        with pytest.raises(ValueError, match=r"hidden \(N, C\) and weight \(V, C\)"):
            gpt_kernels.linear_cross_entropy(h.view(2, 2, 8), w, t)
        with pytest.raises(ValueError, match="bias must have shape"):
            gpt_kernels.linear_cross_entropy(h, w, t, torch.zeros(9, device=device))
        with pytest.raises(TypeError, match="share one dtype"):
            gpt_kernels.linear_cross_entropy(h.half(), w, t)
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            gpt_kernels.linear_cross_entropy(h, w, t[:2])
        with pytest.raises(TypeError, match="integer class ids"):
            gpt_kernels.linear_cross_entropy(h, w, t.float())
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            gpt_kernels.linear_cross_entropy(h, w, torch.tensor([1, 2, 30, 4], device=device))
        with pytest.raises(ValueError, match="chunk_size"):
            gpt_kernels.linear_cross_entropy(h, w, t, chunk_size=0)
        with pytest.raises(ValueError, match="reduction must be"):
            gpt_kernels.linear_cross_entropy(h, w, t, reduction="avg")


def _rowwise_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst row's error relative to that row's largest reference value: a head row (one class) or a
    token whose gradient is lost counts in full, however small its values. (The error over the whole
    tensor is set by the few large target rows and would hide every other class.)"""
    err = (g.double() - ref).abs().amax(dim=1)  # (rows,)
    scale = ref.abs().amax(dim=1)  # (rows,)
    if not torch.isfinite(g).all():
        return float("inf")
    return torch.where(scale > 0, err / scale.clamp_min(1e-300), err * 1e300).max().item()


@pytest.mark.parametrize("loss_scale", [1024.0, 65536.0])
def test_linear_fp16_gradients_under_a_loss_scale(device, loss_scale):
    """fp16 training as ``gpt train --dtype float16`` runs it: autocast fp16 over fp32 master weights, the
    loss multiplied by a GradScaler's factor before the backward (65,536 is its initial one) and the
    gradients divided by it after. Every row of d_weight (one per class, most of them no token's target)
    and of d_hidden must be as close to float64 as torch's own fp16 loss gets them, and finite. At 128
    tokens and V = 4096 the gradient of a non-target logit, p / 128, is ~2e-6: below fp16's normal range
    (6.1e-5) unless the loss scale reaches it before it is rounded to fp16."""
    N, C, V = 128, 16, 4096
    h = torch.randn(N, C, device=device).half().float()  # fp16 values: the float64 reference sees the inputs
    w = (torch.randn(V, C, device=device) / C**0.5 * 2).half().float()  # that autocast's fp16 matmuls see
    t = _targets(N, V, device, n_ignored=3)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    exact = torch.autograd.grad(reference.linear_cross_entropy(hr, wr, t), (hr, wr))
    grads = {}
    for backend in ("triton", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with gpt_kernels.use_backend(backend), torch.autocast(torch.device(device).type, dtype=torch.float16):
            loss = gpt_kernels.linear_cross_entropy(hh, ww, t)
        assert loss.dtype == torch.float32
        with launched_kernels() as launched:
            (loss * loss_scale).backward()
        if backend == "triton":
            backward_launches = launched
        grads[backend] = (hh.grad / loss_scale, ww.grad / loss_scale)  # the scaler's unscale_
    assert backward_launches == ["_cross_entropy_kernel"]  # made in the backward, with the scale: one chunk
    for name, g, base, ref in zip(("d_hidden", "d_weight"), grads["triton"], grads["torch"], exact):
        assert torch.isfinite(g).all(), f"{name}: inf or NaN at loss scale {loss_scale:g}"
        err, base_err = _rowwise_err(g, ref), _rowwise_err(base, ref)
        assert err <= 2 * base_err + 1e-6, (f"{name}: worst row's error {err:.2e} vs float64 at loss scale "
                                            f"{loss_scale:g}; torch's fp16 gets {base_err:.2e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_gradients_are_made_in_the_forward_except_in_fp16(device, dtype):
    """bf16 and fp32 make the gradients in the forward's one sweep (the backward only scales them: no kernel);
    fp16 makes them in the backward, where the loss scale is known (a second sweep)."""
    N, C, V = 10, 8, 40
    h, w, _ = _linear_inputs(N, C, V, dtype, device, bias=False)
    hh, ww = h.requires_grad_(), w.requires_grad_()
    with launched_kernels() as forward, gpt_kernels.use_backend("triton"):
        loss = gpt_kernels.linear_cross_entropy(hh, ww, _targets(N, V, device), chunk_size=4)
    with launched_kernels() as backward:
        loss.backward()
    assert len(forward) == 3
    assert len(backward) == (3 if dtype == torch.float16 else 0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_linear_backends_agree(device, backend):
    h, w, b = _linear_inputs(12, 8, 25, torch.float32, device, bias=True)
    t = _targets(12, 25, device, n_ignored=2)
    loss, grads, go = _run_linear(h, w, b, t, chunk_size=5, label_smoothing=0.1)
    other_loss, other_grads, _ = _run_linear(h, w, b, t, go, backend=backend, label_smoothing=0.1)
    torch.testing.assert_close(loss, other_loss, rtol=1e-5, atol=1e-6)
    for g, o in zip(grads, other_grads):
        torch.testing.assert_close(g, o, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- GPU, big shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_big_gpu(device, dtype):
    x = (torch.randn(2048, GPT2_V, device=device) * 2).to(dtype)  # (2048, 50257)
    _check_ce(x, _targets(2048, GPT2_V, device, n_ignored=100), "big", label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_big_gpu(device, dtype):
    N, C, chunk = 4096, 768, 1000
    h, w, _ = _linear_inputs(N, C, GPT2_V, dtype, device, bias=False)
    t = _targets(N, GPT2_V, device, n_ignored=64)
    loss, grads, go = _run_linear(h, w, None, t, chunk_size=chunk)
    ref_loss, ref_grads = _ref_linear(h, w, None, t, go)
    base_loss, base_grads, _ = _run_linear(h, w, None, t, go, backend="torch")
    assert_close_to_ref("loss", loss, ref_loss, base_loss, atol=_atol(ref_loss, dtype))
    n_chunks = -(-N // chunk)
    for name, g, r, bg in zip(("d_hidden", "d_weight"), grads, ref_grads, base_grads):
        assert_close_to_ref(name, g, r, bg, atol=_atol(r, dtype, ulps=4 + n_chunks))


@pytest.mark.gpu
def test_linear_cross_entropy_autocast_gpu(device):
    N, C, V = 512, 64, 1000
    h, w, _ = _linear_inputs(N, C, V, torch.float32, device, bias=False)
    t = _targets(N, V, device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with gpt_kernels.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpt_kernels.linear_cross_entropy(hh, ww, t)
    loss.backward()
    assert ww.grad.dtype == torch.float32 and hh.grad.dtype == torch.float32
    ref_loss, ref_grads = _ref_linear(h, w, None, t, torch.ones((), device=device))
    assert abs(loss.item() - ref_loss.item()) < 0.05
    torch.testing.assert_close(ww.grad.double(), ref_grads[1], rtol=0.05, atol=2e-3)
