"""LayerNorm and residual-add + LayerNorm. (Triton kernels: issue 3; until then the torch paths.)"""

from __future__ import annotations

import torch.nn.functional as F

from . import reference
from .backend import select


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` over the last dimension, on the selected backend."""
    impl = select(input)
    if impl == "torch":
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if impl == "reference":
        return reference.layer_norm(input, normalized_shape, weight, bias, eps)
    raise NotImplementedError("the Triton LayerNorm kernel has not landed yet: use GPT_KERNELS=torch")


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns ``(x + residual, layer_norm(x + residual))``: the new residual stream and its norm."""
    impl = select(x, residual)
    if impl == "torch":
        s = x + residual
        return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    if impl == "reference":
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    raise NotImplementedError("the Triton add+LayerNorm kernel has not landed yet: use GPT_KERNELS=torch")
