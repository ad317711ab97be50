"""The model's hyperparameters: one dataclass, with presets looked up by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence; the position-embedding table has this many rows
    emb_dim: int = 768  # width of the residual stream
    n_heads: int = 12  # attention heads; emb_dim / n_heads = 64 is GPT-2's head size
    n_layers: int = 12  # transformer blocks
    dropout: float = 0.1  # on embeddings, attention weights and residual branches (GPT-2 trained with 0.1)
    qkv_bias: bool = False  # bias in the fused q/k/v projection: GPT-2's checkpoints have one, the book's
    # from-scratch runs do not
    tie_weights: bool = True  # output head shares the token embedding (GPT-2 does; saves 38.6M params)
    layer_norm_eps: float = 1e-5  # GPT-2's epsilon
    pad_vocab_multiple: int = 1  # round the embedding/head rows up to a multiple of this (64 is faster on
    # GPUs); the padded columns never reach the logits or the loss
    init: str = "gpt2"  # "gpt2": normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers);
    # "torch": PyTorch's default layer init, as the book's from-scratch GPTModel (N(0, 1) embeddings)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "pad_vocab_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.emb_dim % self.n_heads:
            raise UserError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.init not in ("gpt2", "torch"):
            raise UserError(f"init must be 'gpt2' or 'torch', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown GPTConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A preset by name (see ``PRESETS``), with any field overridden, e.g. ``context_length=256``."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's four GPT-2 sizes (parameter counts with tied weights and no q/k/v bias)
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1.56B
    # small enough to train on The Verdict in a few minutes on a 2-core CPU
    "mini": GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4),
    # for tests: runs in milliseconds, still every part of the model
    "tiny": GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=2),
}
