"""GELU and bias + GELU. (Triton kernels: issue 3; until then the torch paths.)"""

from __future__ import annotations

import torch.nn.functional as F

from . import reference
from .backend import select


def gelu(input, approximate="none"):
    """``torch.nn.functional.gelu`` (same signature and default), on the selected backend."""
    impl = select(input)
    if impl == "torch":
        return F.gelu(input, approximate=approximate)
    if impl == "reference":
        return reference.gelu(input, approximate)
    raise NotImplementedError("the Triton GELU kernel has not landed yet: use GPT_KERNELS=torch")


def bias_gelu(x, bias, approximate="tanh"):
    """``gelu(x + bias)`` in one pass: the feed-forward's bias add and activation."""
    impl = select(x, bias)
    if impl == "torch":
        return F.gelu(x + bias, approximate=approximate)
    if impl == "reference":
        return reference.bias_gelu(x, bias, approximate)
    raise NotImplementedError("the Triton bias+GELU kernel has not landed yet: use GPT_KERNELS=torch")
