"""Cross-entropy and chunked linear + cross-entropy. (Triton kernels: issue 5; until then torch paths.)"""

from __future__ import annotations

import torch.nn.functional as F

from . import reference
from .backend import select


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` for (N, V) logits and (N,) targets, on the selected backend."""
    impl = select(input)
    if impl == "torch" or weight is not None:
        return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if impl == "reference":
        return reference.cross_entropy(input, target, ignore_index, reduction, label_smoothing)
    raise NotImplementedError("the Triton cross-entropy kernel has not landed yet: use GPT_KERNELS=torch")


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0):
    """cross_entropy(hidden @ weight^T + bias, target) for (N, C) hidden and (V, C) weight."""
    impl = select(hidden, weight)
    if impl == "reference":
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                              label_smoothing)
    if impl == "torch":
        return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    raise NotImplementedError("the chunked linear cross-entropy has not landed yet: use GPT_KERNELS=torch")
