"""Which implementation runs an op: the Triton kernels, PyTorch's own ops, or the readable reference.

One setting, read per call:

- ``auto`` (default): Triton for CUDA tensors, PyTorch's ops for CPU tensors.
- ``triton``: always the Triton kernels. On CPU tensors this needs the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``gpt_kernels`` is imported), otherwise it raises.
- ``torch``: PyTorch's own fused ops (``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``,
  ``F.cross_entropy``): the baseline the kernels are measured against.
- ``reference``: the plain, readable PyTorch math of ``gpt_kernels.reference`` (slow; for reading and tests).

Set it with the environment variable ``GPT_KERNELS``, with :func:`set_backend`, or for a block of code
with ``with use_backend("torch"): ...``. Every functional entry point calls :func:`select` once, before
any ``autograd.Function.apply``, so the choice never changes inside a forward/backward pair.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "GPT_KERNELS"

_state = threading.local()

# The plan being recorded (gpt_kernels.precompile.planning): launches are recorded, not run; None otherwise.
# Process-wide, as Triton's compile hook it relies on is.
_plan = None


def planning():
    """The :class:`gpt_kernels.precompile.Plan` being recorded, or None (kernels run as usual)."""
    return _plan


def _check(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``set_backend``, else ``$GPT_KERNELS``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    override = getattr(_state, "default", None)
    if override is not None:
        return override
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _check(env)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


def set_backend(name: str | None) -> None:
    """Set the backend for this thread (``None`` returns to ``$GPT_KERNELS`` or ``auto``)."""
    _state.default = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str | None):
    """``with use_backend("triton"): ...`` runs the block on that backend (``None``: leave it as it is)."""
    if name is None:
        yield
        return
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(_check(name))
    try:
        yield
    finally:
        stack.pop()


def select(*tensors: torch.Tensor) -> str:
    """Pick the implementation for one call on these tensors: ``"triton"``, ``"torch"`` or ``"reference"``.

    Raises a clear error when Triton is asked for but cannot run on the tensors' device.
    """
    backend = get_backend()
    # while a plan is recorded, tensors stand for the GPU's (gpt_kernels.precompile): the path CUDA tensors take
    on_cuda = _plan is not None or any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' was asked for, but Triton is not installed "
                               "(pip install triton, Linux only); use GPT_KERNELS=torch instead")
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                "kernel backend 'triton' got CPU tensors: move them to a CUDA device, or set "
                "TRITON_INTERPRET=1 before importing `gpt_kernels` to run the kernels in Triton's (slow) "
                "CPU interpreter, or use GPT_KERNELS=torch")
    return backend


def describe() -> str:
    """One line for ``gpt info``: the setting and what it means on this machine."""
    backend = get_backend()
    cuda = torch.cuda.is_available()
    parts = [f"backend={backend}"]
    if backend == "auto":
        parts.append("Triton kernels on CUDA tensors, PyTorch ops on CPU tensors")
    parts.append(f"triton={'installed' if triton_available() else 'missing'}")
    parts.append(f"cuda={'yes (' + torch.cuda.get_device_name(0) + ')' if cuda else 'no'}")
    if interpreter_enabled():
        parts.append("TRITON_INTERPRET=1 (kernels run on CPU in the interpreter)")
    return ", ".join(parts)
