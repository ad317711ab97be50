"""A key/value cache for fast generation: every layer keeps the keys and values it has already computed.

Without a cache, choosing token n + 1 runs the whole model over all n tokens again, although the keys and
values of the first n tokens have not changed (a causal model never lets an old token see a new one).
With a cache, a *prefill* pass over the prompt stores each layer's keys and values, and every later step
feeds only the newest token: its query attends to the cached keys and values, and its own key and value
are appended. A step then costs one token's worth of matmuls instead of n tokens' worth.

Layout, per layer: ``k`` and ``v`` of shape (B, H, max_len, D), allocated once in the dtype the attention
reads (the model's, or autocast's when the cache is made under autocast);
slots ``[0, length)`` are filled, the same number in every row.

Prompts of different lengths are *left-padded* (right-aligned): row b's first ``pad[b]`` slots hold
padding and its real tokens start at slot ``pad[b]`` with position 0. Every row then writes its next token
into the same slot, so a step is one batched forward. The price is a mask: a real query must never attend
to a padding key, which ``gpt_kernels.attention`` (causal only, no mask argument) cannot express, so a padded
batch runs torch's ``scaled_dot_product_attention`` with an explicit boolean mask, while a batch whose
rows all start at slot 0 stays on ``gpt_kernels.attention`` (and its Triton decode path on a GPU).
"""

from __future__ import annotations

import torch

from gpt_kernels.autocast import matmul_dtype

from .errors import UserError


class LayerKVCache:
    """One layer's keys and values, (B, H, max_len, D) each; the fill level lives in the parent."""

    def __init__(self, parent: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.parent, self.k, self.v = parent, k, v

    @property
    def mask(self) -> torch.Tensor | None:
        """The (B, 1, T, L) attention mask of the current forward (True = may attend), or None if unpadded."""
        return self.parent.mask

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values (B, H, T, D) of this forward's T new tokens after the cached ones.

        Returns every key and value so far, (B, H, L, D) each with L = cached + T: views, no copy.
        """
        start, T = self.parent.length, k.shape[2]
        end = start + T
        self.k[:, :, start:end] = k  # (B, H, T, D)
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, L, D) each


class KVCache:
    """The keys and values of every layer, for a batch of B rows and up to ``max_len`` tokens.

    The model drives it: ``GPT.forward(idx, cache=cache)`` calls :meth:`prepare` (positions and mask of
    the new tokens), each attention layer calls ``cache.layers[i].update(k, v)``, then :meth:`advance`.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_heads, max_len, head_dim)  # (B, H, max_len, D)
        self.layers = [LayerKVCache(self, torch.zeros(shape, dtype=dtype, device=device),
                                    torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # slots filled, the same in every row
        self.pad: torch.Tensor | None = None  # (B,) padding slots at the start of each row; None = no padding
        self.mask: torch.Tensor | None = None  # (B, 1, T, L) of the forward in progress; None = causal only

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache shaped for ``model`` (its layers, heads, device); ``max_len`` defaults to its context.

        Its dtype is what the attention will read: autocast's dtype when autocast is on for the model's
        device as the cache is made (the keys and values then come out of the projection in it), else the
        model's own.
        """
        cfg = model.config
        max_len = cfg.context_length if max_len is None else max_len
        if not 1 <= max_len <= cfg.context_length:
            raise UserError(f"max_len must be in [1, {cfg.context_length}] (the context length), got {max_len}")
        w = model.tok_emb.weight
        dtype = matmul_dtype(w)
        return cls(cfg.n_layers, batch_size, cfg.n_heads, cfg.head_dim, max_len, dtype=dtype, device=w.device)

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache (the buffers stay allocated). ``pad`` (B,): padding slots at the start of each row."""
        self.length, self.mask = 0, None
        if pad is not None:
            if pad.shape != (self.batch_size,):
                raise UserError(f"pad must have shape ({self.batch_size},), got {tuple(pad.shape)}")
            if not bool((pad > 0).any()):
                pad = None  # every row starts at slot 0: plain causal attention, no mask
        self.pad = pad

    def prepare(self, T: int) -> torch.Tensor:
        """Get ready for a forward of T new tokens; returns their positions, (T,) or (B, T) when padded."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise UserError(f"the KV cache holds {self.max_len} tokens: {start} cached + {T} new do not fit. "
                            f"Reset it and prefill the last {self.max_len} tokens instead")
        device = self.layers[0].k.device
        slots = torch.arange(end, device=device)  # (L,) every key slot
        new = slots[start:]  # (T,) the new tokens' slots
        if self.pad is None:
            self.mask = None  # gpt_kernels.attention's end-aligned causal mask is exactly right
            return new  # (T,): slot = position
        pad = self.pad.to(device)
        causal = slots[None, :] <= new[:, None]  # (T, L)
        real = slots[None, :] >= pad[:, None]  # (B, L) keys that are not padding
        itself = slots[None, :] == new[:, None]  # (T, L) a padding query sees only itself (never all -inf)
        self.mask = (causal[None] & (real[:, None, :] | itself[None]))[:, None]  # (B, 1, T, L)
        return (new[None, :] - pad[:, None]).clamp(min=0)  # (B, T) positions; padding gets 0

    def advance(self, T: int) -> None:
        """The forward has stored its T tokens in every layer."""
        self.length += T
        self.mask = None
