"""Plain PyTorch versions of every op in ``gpt_kernels``: readable first, slow, and the ground truth.

Each function has the same signature as its fused twin plus ``upcast``: with ``upcast=True`` the math
runs in float32 (or stays in float64 for float64 inputs) and the result is cast back to the input dtype,
as flash-attention's ``*_ref`` functions do. The tests call these on float64 copies of their inputs to
get the exact answer, and on the working dtype to see how much error PyTorch itself makes.
"""

from __future__ import annotations

import math

import torch


def _up(x: torch.Tensor | None, upcast: bool) -> torch.Tensor | None:
    if x is None or not upcast or x.dtype == torch.float64:
        return x
    return x.float()


# --------------------------------------------------------------------------------------------- norms


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, upcast=False):
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if tuple(normalized_shape) != tuple(x.shape[-len(normalized_shape):]):
        raise ValueError(f"normalized_shape {tuple(normalized_shape)} does not match the input's last "
                         f"dimensions {tuple(x.shape)}")
    dtype = x.dtype
    x, weight, bias = _up(x, upcast), _up(weight, upcast), _up(bias, upcast)
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)  # biased variance, as torch
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, upcast=False):
    """The residual add and the LayerNorm of its result: returns ``(x + residual, layer_norm(x + residual))``."""
    s = x + residual
    return s, layer_norm(s, (s.shape[-1],), weight, bias, eps, upcast=upcast)


# ------------------------------------------------------------------------------------------ activations


def gelu(x, approximate="none", upcast=False):
    """GELU: x * Phi(x) (``"none"``, the erf form) or GPT-2's tanh approximation (``"tanh"``)."""
    dtype = x.dtype
    x = _up(x, upcast)
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    elif approximate == "none":
        y = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    else:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return y.to(dtype)


def bias_gelu(x, bias, approximate="tanh", upcast=False):
    """The feed-forward's bias add then GELU: gelu(x + bias), bias broadcast over the last dimension."""
    return gelu(x + bias, approximate=approximate, upcast=upcast)


# -------------------------------------------------------------------------------------------- attention


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= i + (Tk - Tq), the mask aligned to the end.

    With Tq == Tk this is the usual lower triangle; with Tq < Tk (decoding with a KV cache) the queries
    are the last Tq positions of the sequence.
    """
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None, dropout_mask=None, upcast=False):
    """softmax(q k^T * scale, masked) @ v for (B, H, Tq, D) queries and (B, H, Tk, D) keys and values.

    ``dropout_mask`` (B, H, Tq, Tk) bool, True = keep, applies dropout to the attention weights with
    exactly that mask (kept weights scaled by 1 / (1 - dropout_p)); without it a fresh mask is drawn.
    """
    dtype = q.dtype
    q, k, v = _up(q, upcast), _up(k, upcast), _up(v, upcast)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)
    return (p @ v).to(dtype)  # (B, H, Tq, D)


# ---------------------------------------------------------------------------------------------- losses


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, upcast=False):
    """Cross-entropy of (N, V) logits against (N,) class ids, with torch's semantics.

    loss_i = (1 - eps) * (lse_i - x_i[t_i]) + eps * (lse_i - mean_j x_ij), rows with t_i == ignore_index
    count zero and are left out of the mean. Where every row is ignored the mean is 0 (torch gives
    0/0 = NaN there; a batch of padding must not poison a training run).
    """
    dtype = logits.dtype
    x = _up(logits, upcast)
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    keep = targets != ignore_index  # (N,)
    safe_t = torch.where(keep, targets, torch.zeros_like(targets))
    nll = lse - x.gather(-1, safe_t[:, None]).squeeze(-1)  # (N,)
    if label_smoothing > 0.0:
        smooth = lse - x.mean(dim=-1)  # (N,)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    loss = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "none":
        return loss.to(dtype)
    if reduction == "sum":
        return loss.sum().to(dtype)
    if reduction == "mean":
        return (loss.sum() / keep.sum().clamp(min=1)).to(dtype)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, upcast=False):
    """The output projection then the loss: cross_entropy(hidden @ weight^T + bias, targets)."""
    logits = hidden @ weight.t()  # (N, V)
    if bias is not None:
        logits = logits + bias
    return cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, upcast=upcast)
