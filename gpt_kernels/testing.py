"""Helpers the correctness suite uses to hold a kernel to its float64 reference (public, like torch.testing),
and to see which kernels ran.

The rule, from flash-attention's tests: the kernel's error against the float64 reference may be at most
``factor`` times the error that PyTorch's own op makes at the same dtype, plus a small ``atol``. That
scales the tolerance with the dtype without hand-tuning it per test, and a kernel that is wrong fails by
orders of magnitude.
"""

from __future__ import annotations

import contextlib

import torch

# atol added to the allowed error, by the dtype of the compared tensors
DEFAULT_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so an element a kernel forgets to write fails every comparison."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64; NaN anywhere gives inf."""
    d = (a.detach().double() - b.detach().double()).abs()
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any():
        return float("inf")
    return d.max().item()


def assert_close_to_ref(name: str, out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None,
                        factor: float = 2.0, atol: float | None = None) -> None:
    """Assert ``|out - ref| <= factor * |base - ref| + atol`` elementwise-max.

    ``ref``: the float64 reference. ``base``: PyTorch's own result at the working dtype (or None to
    compare with ``atol`` alone). NaN in ``out`` always fails.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if atol is None:
        atol = DEFAULT_ATOL.get(out.dtype, 1e-5)
    err = max_err(out, ref)
    base_err = max_err(base, ref) if base is not None else 0.0
    allowed = factor * base_err + atol
    assert err <= allowed, (f"{name}: max error {err:.3e} vs the float64 reference exceeds {allowed:.3e} "
                            f"({factor} x torch's {base_err:.3e} + atol {atol:.1e})")


@contextlib.contextmanager
def launched_kernels():
    """``with launched_kernels() as names:`` records the name of every Triton kernel launched in the block,
    in order (compiled or interpreted; an autotuner's trials count, compiling without launching does not).

    Where a fast and a slow path give the same answer (split-K or not, the atomic or the deterministic
    backward, one chunk or many), a test reads these names to know which one ran.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names: list[str] = []
    saved = []
    for cls in (JITFunction, InterpretedFunction):
        real = cls.__dict__["run"]

        def run(self, *args, _real=real, **kwargs):
            if not kwargs.get("warmup", False):
                names.append(self.fn.__name__)
            return _real(self, *args, **kwargs)

        saved.append((cls, real))
        cls.run = run
    try:
        yield names
    finally:
        for cls, real in saved:
            cls.run = real
