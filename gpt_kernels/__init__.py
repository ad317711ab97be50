"""Fused Triton kernels for transformer training, each with a PyTorch reference path.

Nothing here knows what a GPT is. The functional API mirrors ``torch.nn.functional``::

    import gpt_kernels
    y = gpt_kernels.layer_norm(x, (C,), weight, bias, eps=1e-5)
    h = gpt_kernels.gelu(x, approximate="tanh")
    o = gpt_kernels.attention(q, k, v, causal=True)          # (B, H, T, D)
    loss = gpt_kernels.cross_entropy(logits, targets)

Which implementation runs is chosen per call by :mod:`gpt_kernels.backend` (``GPT_KERNELS=auto|triton|torch|
reference``, :func:`use_backend`, :func:`set_backend`). Under ``torch.autocast`` every backend returns the
same dtypes, by the policy in :mod:`gpt_kernels.autocast` (the fp32 residual stream stays fp32, norms feed the
next matmul in autocast's dtype, losses are fp32).

The Triton kernels are registered as ``torch.library`` custom ops (``torch.ops.gpt_triton.*``) with fake
implementations and autograd formulas, so ``torch.compile(model, fullgraph=True)`` traces a model built
on them, forward and backward, without graph breaks or host syncs inside an op.
"""

from . import reference
from .activation import bias_gelu, gelu
from .backend import get_backend, select, set_backend, use_backend
from .flash_attention import attention, attention_dropout_mask
from .fused_cross_entropy import cross_entropy, linear_cross_entropy
from .norm import add_layer_norm, layer_norm

__all__ = [
    "add_layer_norm",
    "attention",
    "attention_dropout_mask",
    "bias_gelu",
    "cross_entropy",
    "gelu",
    "get_backend",
    "layer_norm",
    "linear_cross_entropy",
    "reference",
    "select",
    "set_backend",
    "use_backend",
]
