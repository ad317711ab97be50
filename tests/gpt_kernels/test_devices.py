"""Kernels launch on their inputs' GPU, and one op's inputs must share a device.

Triton launches on the *current* CUDA device, not the tensors': ``gpt generate --device cuda:1`` would pass
GPU 1 pointers to a GPU 0 launch. Every launcher runs inside ``gpt_kernels.common.device_guard`` for its
inputs' device. Without a second GPU (or any) that is checked by recording, for every kernel launch,
which guards are open around it: each launch must sit inside a guard for its inputs' device.
"""

import contextlib

import pytest
import torch

import gpt_kernels
from gpt_kernels import common
from gpt_kernels import flash_attention as fa


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (kernel name, the devices of the guards open around it, innermost last)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    open_guards, seen = [], []

    @contextlib.contextmanager
    def guard(device):
        open_guards.append(torch.device(device))
        try:
            yield
        finally:
            open_guards.pop()

    monkeypatch.setattr(common, "device_guard", guard)
    for cls in (InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *args, _real=real, **kwargs):
            seen.append((getattr(self, "__name__", None) or self.fn.__name__, tuple(open_guards)))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return seen


def _every_op(device):
    """Each op forward and backward on the Triton backend, every launcher among them."""
    x = torch.randn(3, 2, 32, device=device, requires_grad=True)
    w, b = torch.randn(32, device=device, requires_grad=True), torch.randn(32, device=device, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    t = torch.randint(0, 32, (6,), device=device)
    head = torch.randn(40, 32, device=device, requires_grad=True)
    with gpt_kernels.use_backend("triton"):
        outs = [gpt_kernels.layer_norm(x, (32,), w, b), *gpt_kernels.add_layer_norm(x, x.detach(), w, b),
                gpt_kernels.gelu(x), gpt_kernels.bias_gelu(x, b),
                gpt_kernels.attention(q, k, v, causal=True, dropout_p=0.2),
                gpt_kernels.cross_entropy(x.view(6, 32), t),
                gpt_kernels.linear_cross_entropy(x.view(6, 32), head, t, chunk_size=4),
                gpt_kernels.linear_cross_entropy(x.view(6, 32), head, t, reduction="none", chunk_size=4)]
        sum(o.float().sum() for o in outs).backward()
        fa.attention_dropout_mask(3, 1, 2, 8, 8, 0.5, device)


def test_every_launch_runs_inside_a_guard_for_its_inputs_device(launches, device):
    _every_op(device)
    names = {name for name, _ in launches}
    for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel",
                   "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_attn_fwd", "_attn_bwd_preprocess",
                   "_attn_bwd_dkdv", "_attn_bwd_dq", "_cross_entropy_kernel", "_dropout_mask_kernel"):
        assert kernel in names, f"{kernel} never launched: the test misses a launcher"
    unguarded = [name for name, guards in launches if not guards or guards[-1].type != torch.device(device).type]
    assert not unguarded, f"launched outside a guard for the inputs' device: {sorted(set(unguarded))}"


def test_the_guard_makes_the_tensors_gpu_current():
    """For CUDA tensors the guard is torch.cuda.device(index), which sets and restores the current device."""
    guard = common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(common.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_the_guard_wraps_a_launcher_for_its_first_tensor(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield

    monkeypatch.setattr(common, "device_guard", guard)
    launcher = common.on_inputs_device(lambda flag, x, y=None: (flag, x.device))
    assert launcher(True, torch.empty(1, device="meta")) == (True, torch.device("meta"))
    assert entered == [torch.device("meta")]


def _mixed(device):
    """(op, call) pairs that each mix the inputs' device with the meta device in one input."""
    x, w = torch.randn(4, 16, device=device), torch.randn(16, device=device)
    q = torch.randn(1, 2, 8, 16, device=device)
    t = torch.randint(0, 16, (4,), device=device)
    m = "meta"
    return [
        ("layer_norm", lambda: gpt_kernels.layer_norm(x, (16,), w.to(m), None)),
        ("add_layer_norm", lambda: gpt_kernels.add_layer_norm(x, x.to(m))),
        ("bias_gelu", lambda: gpt_kernels.bias_gelu(x, w.to(m))),
        ("attention", lambda: gpt_kernels.attention(q, q.to(m), q)),
        ("cross_entropy", lambda: gpt_kernels.cross_entropy(x, t.to(m))),
        ("linear_cross_entropy", lambda: gpt_kernels.linear_cross_entropy(x, x.to(m), t)),
        ("linear_cross_entropy", lambda: gpt_kernels.linear_cross_entropy(x, x, t, bias=w[:4].to(m))),
    ]


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "reference"])
def test_inputs_on_two_devices_are_refused_on_every_backend(device, backend):
    for op, call in _mixed(device):
        with gpt_kernels.use_backend(backend), pytest.raises(ValueError, match=rf"{op}: .*one device.*meta"):
            call()


def test_pick_device_makes_the_named_gpu_current(monkeypatch):
    """``--device cuda:1`` is checked against the GPUs there are and made the current device."""
    from gpt.runtime import pick_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert pick_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="2 CUDA GPU.*cuda:0 to cuda:1"):
        pick_device("cuda:2")
