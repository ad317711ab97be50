"""Causal attention. (Triton FlashAttention kernel: issue 4; until then the torch paths.)"""

from __future__ import annotations

import torch.nn.functional as F

from . import reference
from .backend import select


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None):
    """softmax(q k^T * scale) v for (B, H, Tq, D) q and (B, H, Tk, D) k, v, Tq <= Tk.

    With ``causal`` the mask is aligned to the end: query i sees keys j <= i + Tk - Tq.
    """
    impl = select(q, k, v)
    if impl == "torch":
        tq, tk = q.shape[-2], k.shape[-2]
        mask = None
        if causal and tq != tk and tq > 1:
            mask = reference.causal_mask(tq, tk, q.device)  # torch's is_causal aligns to the start
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and tq == tk, scale=scale)
    if impl == "reference":
        return reference.attention(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale)
    raise NotImplementedError("the Triton attention kernel has not landed yet: use GPT_KERNELS=torch")
