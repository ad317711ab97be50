"""Backend selection: $GPT_KERNELS, set_backend, nested use_backend, and the dispatch each op makes.

The choice is made once per call by the functional entry point, before any custom op runs:
these tests check which implementation ran by the autograd node a result carries (or by stand-ins that
record the call), and that asking for Triton on CPU tensors without the interpreter is a clear error.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gpt_kernels
from gpt_kernels import backend
from gpt_kernels.backend import get_backend, select, set_backend, use_backend


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    """Every test starts from no setting and no $GPT_KERNELS, and leaves none behind."""
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def test_default_is_auto():
    assert get_backend() == "auto"


@pytest.mark.parametrize("name", ["triton", "torch", "reference", "auto", " Torch "])
def test_env_var(monkeypatch, name):
    monkeypatch.setenv("GPT_KERNELS", name)
    assert get_backend() == name.strip().lower()


def test_env_var_unknown_name_raises(monkeypatch):
    monkeypatch.setenv("GPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"\$GPT_KERNELS: unknown kernel backend 'cuda'"):
        get_backend()


def test_set_backend_overrides_env_and_none_restores_it(monkeypatch):
    monkeypatch.setenv("GPT_KERNELS", "reference")
    set_backend("torch")
    assert get_backend() == "torch"
    set_backend(None)
    assert get_backend() == "reference"


def test_use_backend_nests_and_restores():
    set_backend("reference")
    with use_backend("torch"):
        assert get_backend() == "torch"
        with use_backend("triton"):
            assert get_backend() == "triton"
            with use_backend(None):  # None: leave the setting as it is
                assert get_backend() == "triton"
        assert get_backend() == "torch"
    assert get_backend() == "reference"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with use_backend("torch"):
            raise RuntimeError("boom")
    assert get_backend() == "auto"


@pytest.mark.parametrize("call", [lambda: set_backend("cuda"), lambda: use_backend("tritn").__enter__()],
                         ids=["set_backend", "use_backend"])
def test_unknown_name_raises(call):
    with pytest.raises(ValueError, match="unknown kernel backend .* choose one of auto, triton, torch, reference"):
        call()
    assert get_backend() == "auto"


def test_auto_picks_torch_for_cpu_tensors():
    x = torch.randn(2, 3)
    assert select(x) == "torch"
    assert select(x, None) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs the CPU tests only")
def test_triton_on_cpu_runs_under_the_interpreter():
    assert backend.interpreter_enabled()  # tests/conftest.py sets TRITON_INTERPRET=1 without CUDA
    with use_backend("triton"):
        assert select(torch.randn(2)) == "triton"


# ---------------------------------------------------------------------------------------- dispatch

_OPS = {
    "layer_norm": lambda x: gpt_kernels.layer_norm(x, x.shape[-1:], torch.ones(x.shape[-1]), torch.zeros(x.shape[-1])),
    "add_layer_norm": lambda x: gpt_kernels.add_layer_norm(x, torch.ones_like(x), torch.ones(x.shape[-1]))[1],
    "gelu": lambda x: gpt_kernels.gelu(x, approximate="tanh"),
    "bias_gelu": lambda x: gpt_kernels.bias_gelu(x, torch.zeros(x.shape[-1])),
}
# the autograd node torch.library makes for each custom op (gpt_kernels registers them as gpt_triton::<op>)
_TRITON_NODE = {op: f"GeneratedBackwardFor_gpt_triton_{op}_defaultBackward" for op in _OPS}
_TORCH_NODE = {"layer_norm": "NativeLayerNormBackward0", "add_layer_norm": "NativeLayerNormBackward0",
               "gelu": "GeluBackward0", "bias_gelu": "GeluBackward0"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on the interpreter")
@pytest.mark.parametrize("op", list(_OPS))
def test_each_op_dispatches_to_the_chosen_backend(op, monkeypatch):
    x = torch.randn(3, 8, requires_grad=True)
    with use_backend("triton"):
        assert type(_OPS[op](x).grad_fn).__name__ == _TRITON_NODE[op]
    with use_backend("torch"):
        assert type(_OPS[op](x).grad_fn).__name__ == _TORCH_NODE[op]
    assert type(_OPS[op](x).grad_fn).__name__ == _TORCH_NODE[op]  # auto on CPU tensors: torch

    calls = []
    name = op  # the reference function of the same name
    real = getattr(gpt_kernels.reference, name)
    monkeypatch.setattr(gpt_kernels.reference, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    with use_backend("reference"):
        _OPS[op](x)
    assert calls == [name]


def test_backend_is_read_per_call_not_per_autograd_pass():
    """Switching the backend between forward and backward does not change the backward that runs."""
    x = torch.randn(3, 8, requires_grad=True)
    with use_backend("triton"):
        y = gpt_kernels.gelu(x, approximate="tanh")
    with use_backend("torch"):
        (dx,) = torch.autograd.grad(y.sum(), x)
    assert type(y.grad_fn).__name__ == _TRITON_NODE["gelu"]
    torch.testing.assert_close(dx, torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x)[0])


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """GPT_KERNELS=triton with CPU tensors and TRITON_INTERPRET unset: every op says what to do."""
    script = textwrap.dedent("""
        import torch, gpt_kernels
        x = torch.randn(2, 8)
        calls = [lambda: gpt_kernels.layer_norm(x, (8,)), lambda: gpt_kernels.add_layer_norm(x, x),
                 lambda: gpt_kernels.gelu(x), lambda: gpt_kernels.bias_gelu(x, torch.zeros(8))]
        for call in calls:
            try:
                call()
            except RuntimeError as e:
                print("ERROR:", e)
            else:
                print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPT_KERNELS"] = "triton"
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ERROR", "NO ERROR"))]
    assert len(lines) == 4, proc.stdout + proc.stderr
    for ln in lines:
        assert ln.startswith("ERROR:") and "got CPU tensors" in ln and "TRITON_INTERPRET=1" in ln, ln
