"""Every Triton op is a well-formed torch.library custom op: ``torch.library.opcheck`` on each.

opcheck runs the op for real and checks its registration: the schema matches what it does (no mutation,
no output aliasing an input), the fake implementation gives the real outputs' shapes, dtypes and strides
(what torch.compile traces with), the autograd formula is registered the way torch requires, and the op
runs under AOT dispatch with static and dynamic shapes. Inputs are small, odd-shaped and random, in the
dtype mixes autocast produces, so the fakes are checked where they are easiest to get wrong.
"""

import pytest
import torch

import gpt_kernels  # noqa: F401  (registers torch.ops.gpt_triton.*)

pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

ops = torch.ops.gpt_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU


def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


def _i(*values):
    return torch.tensor(values, device=DEVICE)


def _qkv_heads_interleaved():
    """(B, H, T, D) q, k, v as views of one fused projection, (B, T, 3, H, D): the model's layout."""
    qkv = _t(2, 11, 3, 2, 16, grad=False)
    return [x.requires_grad_() for x in qkv.permute(2, 0, 3, 1, 4).clone().unbind(0)]


def _cases():
    x, r, w, b = _t(3, 5, 40), _t(3, 5, 40, dtype=torch.bfloat16), _t(40), _t(40)
    lse_logits = _t(6, 37, grad=False)
    t6 = _i(1, 36, -100, 0, 5, 9)
    _, lse = ops.cross_entropy(lse_logits, t6, -100, 0.1)
    q, k, v = _qkv_heads_interleaved()
    o, attn_lse = ops.attention(q.detach(), k.detach(), v.detach(), _i(7), True, 0.2, 0.25)
    h, hw, hb = _t(10, 8), _t(21, 8), _t(21)
    t10 = torch.randint(0, 19, (10,), device=DEVICE)
    return {
        "layer_norm": (ops.layer_norm, (x, w, b, 1e-5, torch.bfloat16)),
        "layer_norm no params": (ops.layer_norm, (x, None, None, 1e-5, torch.float32)),
        "add_layer_norm mixed": (ops.add_layer_norm, (r, x, w, b, 1e-5, torch.bfloat16)),
        "layer_norm_backward": (ops.layer_norm_backward, (
            _t(3, 5, 40, dtype=torch.bfloat16, grad=False), x.detach(), w.detach(), _t(15, grad=False),
            _t(15, grad=False).abs() + 0.5, _t(3, 5, 40, grad=False), torch.float32, torch.bfloat16, torch.float32)),
        "gelu": (ops.gelu, (_t(7, 13), True)),
        "gelu_backward": (ops.gelu_backward, (_t(7, 13, grad=False), _t(7, 13, grad=False), False)),
        "bias_gelu amp": (ops.bias_gelu, (_t(4, 33, dtype=torch.bfloat16), _t(33), True, True, torch.bfloat16)),
        "bias_gelu_backward": (ops.bias_gelu_backward, (_t(4, 33, grad=False), _t(4, 33, grad=False),
                                                        _t(33, grad=False), True, False)),
        "attention": (ops.attention, (q, k, v, None, True, 0.0, 0.25)),
        "attention dropout": (ops.attention, (q, k, v, _i(7), True, 0.2, 0.25)),
        "attention_backward": (ops.attention_backward, (
            _t(2, 2, 11, 16, grad=False), q.detach(), k.detach(), v.detach(), o, attn_lse, _i(7),
            True, 0.2, 0.25)),
        "attention atomic dq": (ops.attention, (q, k, v, _i(7), True, 0.2, 0.25, True)),
        "attention_backward atomic dq": (ops.attention_backward, (
            _t(2, 2, 11, 16, grad=False), q.detach(), k.detach(), v.detach(), o, attn_lse, _i(7),
            True, 0.2, 0.25, True)),
        "cross_entropy": (ops.cross_entropy, (_t(6, 37), t6, -100, 0.1)),
        "cross_entropy_backward": (ops.cross_entropy_backward, (_t(6, grad=False), lse_logits, t6, lse, -100, 0.1)),
        "linear_cross_entropy": (ops.linear_cross_entropy, (
            h, hw, hb, t10, torch.full((10,), 0.1, device=DEVICE), 19, -100, 0.0, 4, True, True, True)),
        "linear_cross_entropy frozen weight": (ops.linear_cross_entropy, (
            h, hw.detach(), None, t10, torch.ones((), device=DEVICE).expand(10), 19, -100, 0.1, 3, True, False, False)),
        "linear_cross_entropy_rows": (ops.linear_cross_entropy_rows, (h, hw, hb, t10, 19, -100, 0.1, 4)),
        "linear_cross_entropy_rows_backward": (ops.linear_cross_entropy_rows_backward, (
            _t(10, grad=False), h.detach(), hw.detach(), hb.detach(), t10, 19, -100, 0.0, 4, True, True, True)),
    }


_CASES = _cases()


@pytest.mark.parametrize("name", list(_CASES))
def test_opcheck(name):
    op, args = _CASES[name]
    torch.library.opcheck(op, args)


def test_every_registered_op_is_checked():
    """A new op in the namespace without an opcheck case fails here."""
    checked = {op._qualified_op_name for op, _ in _CASES.values()}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("gpt_triton::")}
    assert len(registered) >= 14 and registered == checked, f"ops without an opcheck case: {registered - checked}"
