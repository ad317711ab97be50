"""Helpers the correctness suite uses to hold a kernel to its float64 reference (public, like torch.testing).

The rule, from flash-attention's tests: the kernel's error against the float64 reference may be at most
``factor`` times the error that PyTorch's own op makes at the same dtype, plus a small ``atol``. That
scales the tolerance with the dtype without hand-tuning it per test, and a kernel that is wrong fails by
orders of magnitude.
"""

from __future__ import annotations

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
