"""The dtypes each fused op takes and returns under ``torch.autocast``: one policy, every backend.

Mixed-precision training keeps float32 master weights and a float32 residual stream while the matmuls
run in bfloat16 or float16 under ``torch.autocast``. The fused ops sit between those matmuls, so they see
mixed dtypes (a bf16 attention branch added to the fp32 residual, a bf16 activation with the fp32 bias of
its ``nn.Linear``) and their outputs feed the next matmul. Each functional entry point applies this
policy before choosing an implementation, so the Triton, torch and reference backends return the same
dtypes (and, within the low-precision rounding, the same values). ``A`` is autocast's dtype for the
inputs' device; without autocast the rules in the middle column hold.

=====================  =============================  ================================================
op                     autocast off                   autocast on (dtype A)
=====================  =============================  ================================================
layer_norm             y in x's dtype                 y in A: the dtype the next matmul wants
add_layer_norm         s = x + residual promoted, as  s promoted as ``x + residual`` (the fp32 residual
                       torch's add; y in s's dtype    stream stays fp32); y in A
gelu                   x's dtype                      x's dtype (autocast leaves elementwise ops alone)
bias_gelu              x + bias promoted, as torch    x and the bias rounded to A, as ``nn.Linear`` casts
                                                      its bias under autocast; output in A
attention              q's dtype (q, k, v alike)      q, k, v cast to A, as autocast does for SDPA
cross_entropy          loss in the logits' dtype      loss in float32, as autocast runs torch's
                                                      cross-entropy; the logits stay in their dtype
linear_cross_entropy   loss in hidden's dtype         projection in A (as ``F.linear``), loss float32
=====================  =============================  ================================================

Whatever the dtypes, every kernel computes its statistics (means, variances, the softmax's running max
and sum, log-sum-exp) in float32, and every gradient comes back in its input's dtype.
"""

from __future__ import annotations

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast never touches float64 or integers


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``t``'s device, or None where autocast is off (or ``t`` is a
    dtype autocast leaves alone, such as float64)."""
    device_type = t.device.type
    if t.dtype not in _CASTABLE or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """What the next matmul reads: autocast's dtype when it is on for ``t``'s device, else ``t``'s own."""
    return autocast_dtype(t) or t.dtype
