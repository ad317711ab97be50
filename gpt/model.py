"""GPT-2: token and position embeddings, pre-LayerNorm transformer blocks, a final norm and the head.

Every hot op goes through ``gpt_kernels``' functional API (``layer_norm``, ``add_layer_norm``, ``bias_gelu``,
``attention``, ``linear_cross_entropy``, ``cross_entropy``), which runs the Triton kernels on CUDA tensors
and PyTorch's ops on CPU tensors (see ``gpt_kernels.backend``). The matmuls are cuBLAS through ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import gpt_kernels
from gpt_kernels.backend import get_backend, use_backend

from .config import GPTConfig
from .errors import UserError
from .kv_cache import KVCache, LayerKVCache

# activation recomputation (checkpointing) in training: what the forward keeps for the backward
RECOMPUTE = {
    "none": "every activation the backward needs is kept",
    "blocks": "only each block's input is kept; the whole block runs again in the backward",
    "attention": "inside each block, the attention and MLP branches (norm, projections, attention, GELU, dropout) "
                 "keep only their inputs and run again in the backward; the residual stream and norms are kept",
}


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward runs ``gpt_kernels.layer_norm`` (same parameters, same state dict)."""

    def forward(self, x):
        return gpt_kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.proj.residual_scaled = True  # GPT-2 init: std 0.02 / sqrt(2 * n_layers)

    def forward(self, x, cache: LayerKVCache | None = None):
        """Causal self-attention over x (B, T, C). With a ``cache``, the T new tokens also attend to the
        cached ones, and their keys and values are appended to it (see ``gpt.kv_cache``)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), strided views, no copy
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = gpt_kernels.attention(q, k, v, causal=True, dropout_p=p)  # (B, H, T, D)
        else:
            k, v = cache.update(k, v)  # (B, H, L, D) each: the cached keys/values, then these T; T <= L
            if cache.mask is None:  # every row starts at slot 0: causal, aligned to the end (key j <= i + L - T)
                y = gpt_kernels.attention(q, k, v, causal=True, dropout_p=p)  # (B, H, T, D)
            else:  # left-padded rows: padding keys masked out, which gpt_kernels.attention cannot express
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class PreBiasLinear(nn.Linear):
    """An ``nn.Linear`` whose bias the caller adds later, fused into the next op: :meth:`matmul` is the
    product alone. A module that wraps this layer (a LoRA adapter) keeps the fusion by offering a
    ``matmul`` of its own."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., out), no bias


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = PreBiasLinear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.proj.residual_scaled = True

    def forward(self, x):
        h = self.fc.matmul(x)  # (B, T, 4C); the bias is added in the fused bias + GELU below
        h = gpt_kernels.bias_gelu(h, self.fc.bias, approximate="tanh")  # (B, T, 4C)
        return self.proj(h)  # (B, T, C)


def recomputed(fn, *args):
    """``fn(*args)`` keeping none of its activations: ``torch.utils.checkpoint`` (non-reentrant) runs it
    again in the backward to get them back.

    The recomputation replays the forward exactly: the checkpoint restores the random generators of the CPU
    and of the inputs' device (the dropout masks, and the attention kernel's dropout seed, which it draws
    from torch's generator on its device) and the autocast state; the kernel backend the forward ran on is
    put back here (it is a per-thread setting, and the backward may run on another thread or outside the
    model's ``use_backend``). Under ``torch.compile`` the backend was fixed when the graph was traced.
    """
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    backend = get_backend()

    def on_backend(*a):
        with use_backend(backend):
            return fn(*a)

    return torch.utils.checkpoint.checkpoint(on_backend, *args, use_reentrant=False)


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(.)); the first residual add is fused with ln2."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache: LayerKVCache | None = None, recompute: str = "none"):
        """The block on x (B, T, C); ``recompute`` (see :data:`RECOMPUTE`) trades compute for activation
        memory in training (no cache)."""
        if recompute == "blocks":
            return recomputed(self._forward, x)
        return self._forward(x, cache, recompute == "attention")

    def _forward(self, x, cache: LayerKVCache | None = None, recompute_branches: bool = False):
        if recompute_branches:
            a = recomputed(self._attention_branch, x)  # (B, T, C)
        else:
            a = self._attention_branch(x, cache)  # (B, T, C)
        x, h = gpt_kernels.add_layer_norm(a, x, self.ln2.weight, self.ln2.bias, self.ln2.eps)  # both (B, T, C)
        return x + (recomputed(self._mlp_branch, h) if recompute_branches else self._mlp_branch(h))

    def _attention_branch(self, x, cache: LayerKVCache | None = None):
        return self.drop(self.attn(self.ln1(x), cache))  # (B, T, C)

    def _mlp_branch(self, h):
        return self.drop(self.mlp(h))  # (B, T, C)


class GPT(nn.Module):
    """A GPT-2 model. ``model(idx)`` gives logits (B, T, V); ``model(idx, targets)`` gives (logits, loss).

    ``kernel_backend`` (``"auto"``, ``"triton"``, ``"torch"``, ``"reference"`` or None to follow the global
    setting) picks the implementation of the fused ops for this model's forward and backward. ``recompute``
    (``"none"``, ``"blocks"``, ``"attention"``: :data:`RECOMPUTE`) trades compute for activation memory when
    gradients are on; it changes no result.
    """

    def __init__(self, config: GPTConfig, kernel_backend: str | None = None, recompute: str = "none"):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend
        self.recompute = recompute
        V, C = config.padded_vocab_size, config.emb_dim
        self.tok_emb = nn.Embedding(V, C)
        self.pos_emb = nn.Embedding(config.context_length, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.final_norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.head = nn.Linear(C, V, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        if config.init == "gpt2":  # else keep PyTorch's defaults, as the book's GPTModel does
            self.apply(self._init_weights)

    @property
    def recompute(self) -> str:
        """Activation recomputation in training: ``"none"``, ``"blocks"`` or ``"attention"`` (:data:`RECOMPUTE`)."""
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE:
            raise ValueError(f"unknown recompute mode {mode!r}: choose one of {', '.join(RECOMPUTE)}")
        self._recompute = mode

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if getattr(m, "residual_scaled", False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @classmethod
    def from_preset(cls, name: str, kernel_backend: str | None = None, recompute: str = "none", **overrides) -> GPT:
        """A freshly initialised model of a preset (``gpt2-small``..``gpt2-xl``, ``mini``, ``tiny``)."""
        return cls(GPTConfig.from_preset(name, **overrides), kernel_backend=kernel_backend, recompute=recompute)

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate (embeddings, attention weights, residual branches) and the config to ``p``."""
        self.config = dataclasses.replace(self.config, dropout=p)  # validates p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; shared (tied) tensors are counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.pos_emb.weight.device

    def check_input(self, idx: torch.Tensor) -> None:
        """Clear errors for token ids a user might get wrong: dtype, rank, length, range."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an int64 or int32 tensor, got "
                            f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dim() != 2:
            raise UserError(f"token ids must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T == 0:
            raise UserError("the input holds no tokens: give at least one token id per row")
        if T > self.config.context_length:
            raise UserError(f"sequence length {T} exceeds the model's context length "
                            f"{self.config.context_length}: crop the input to its last "
                            f"{self.config.context_length} tokens")
        if torch.compiler.is_compiling():
            return  # the range check below reads values on the host: a graph break under torch.compile
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one reduction, one host sync for both ends
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise UserError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for ``batch_size`` rows of up to ``max_len`` tokens (default: the context)."""
        return KVCache.for_model(self, batch_size, max_len)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed residual stream (B, T, C), before the output head, on this model's kernel backend.

        With a ``cache``, ``idx`` holds only the new tokens: they follow the cached ones (positions and
        attention continue from there) and their keys and values are added to the cache.
        """
        with use_backend(self.kernel_backend):
            return self._hidden_states(idx, cache)  # (B, T, C)

    def _hidden_states(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        self.check_input(idx)
        B, T = idx.shape
        if cache is None:
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
            recompute = self.recompute if torch.is_grad_enabled() else "none"  # nothing to keep without gradients
            for block in self.blocks:
                x = block(x, recompute=recompute)
            return self.final_norm(x)  # (B, T, C)
        if cache.batch_size != B:
            raise UserError(f"the KV cache was made for {cache.batch_size} rows, the input has {B}")
        pos = cache.prepare(T)  # (T,), or (B, T) for left-padded rows
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, layer_cache)
        cache.advance(T)
        return self.final_norm(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool | None = None,
                *, cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, vocab_size), or ``(logits, loss)`` given targets (B, T) (-100 = ignored).

        With targets, ``return_logits`` defaults to ``not self.training``: a training step gets
        ``(None, loss)`` from the fused linear + cross-entropy, which never builds the (B*T, V) logits.

        For generation: ``cache`` (a :class:`KVCache`) makes ``idx`` the tokens that follow the cached
        ones; ``last_only`` returns the last position's logits only, (B, 1, V).
        """
        if last_only and targets is not None:
            raise UserError("last_only is for generation: it cannot be combined with targets")
        with use_backend(self.kernel_backend):
            h = self._hidden_states(idx, cache)  # (B, T, C)
            if last_only:
                h = h[:, -1:]  # (B, 1, C): only the next token is wanted
            V = self.config.vocab_size
            if targets is None:
                return self._logits(h)  # (B, T, V)
            if targets.shape != idx.shape:
                raise UserError(f"targets shape {tuple(targets.shape)} must match the input's {tuple(idx.shape)}")
            if return_logits is None:
                return_logits = not self.training
            flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (B*T, C), (B*T,)
            if return_logits:
                logits = self._logits(h)  # (B, T, V)
                return logits, gpt_kernels.cross_entropy(logits.reshape(-1, V), flat_t)
            # the whole (padded) head: its GEMMs and the loss kernel's rows stay aligned; padding is no class
            return None, gpt_kernels.linear_cross_entropy(flat_h, self.head.weight, flat_t, num_classes=V)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the hidden states h (B, T, C): the padded head's GEMM, padding columns sliced
        off as a view (rows stay padded_vocab_size apart, 16-byte aligned for the loss kernel)."""
        logits = F.linear(h, self.head.weight)  # (B, T, padded V)
        V = self.config.vocab_size
        return logits if logits.shape[-1] == V else logits[..., :V]  # (B, T, V)


def set_recompute(model: nn.Module, mode: str) -> int:
    """Set the activation recomputation (:data:`RECOMPUTE`) of every :class:`GPT` in ``model`` (a GPT, a
    classifier, a model with LoRA adapters); returns how many there are."""
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    for m in gpts:
        m.recompute = mode
    return len(gpts)


class GPTClassifier(nn.Module):
    """A GPT and a new output layer that maps the last real token's final-normed state to class logits
    (chapter 6: the last token is the only one that has attended to the whole text).

    The GPT's own language-model head stays in place (it is tied to the token embedding) but is not used.
    """

    def __init__(self, gpt: GPT, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.emb_dim, num_classes).to(gpt.device)

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    @property
    def device(self) -> torch.device:
        return self.gpt.device

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) for token ids (B, T); ``lengths`` (B,) marks where each row's
        real tokens end (the rest is padding); without it the last position is used."""
        h = self.gpt.hidden_states(idx)  # (B, T, C)
        if lengths is None:
            last = h[:, -1, :]  # (B, C)
        else:
            if int(lengths.min()) < 1 or int(lengths.max()) > idx.shape[1]:
                raise UserError(f"lengths must be in [1, {idx.shape[1]}], got {lengths.tolist()}")
            last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]  # (B, C)
        return self.head(last)  # (B, num_classes)
