"""Low-rank adaptation (LoRA, appendix E of "Build a Large Language Model (From Scratch)").

A frozen ``nn.Linear`` computing ``x W^T + b`` gets a trainable low-rank update beside it::

    y = x W^T + b + (alpha / rank) * (x A^T) B^T        A: (rank, in), B: (out, rank)

``A`` starts Kaiming-uniform (as ``nn.Linear`` initialises its own weight) and ``B`` starts at zero, so a
freshly wrapped model computes exactly what the base model did; training moves only ``A`` and ``B``
(``rank * (in + out)`` numbers per layer instead of ``in * out``). The scale is ``alpha / rank`` as in
Hu et al. (2021) and most libraries; the book's ``LoRALayer`` scales by ``alpha`` alone.

After training, :func:`merge_lora` folds ``(alpha / rank) * B A`` into ``W`` and puts plain ``nn.Linear``
layers back: the exported model has the base model's shape and speed.

    apply_lora(model, rank=16, alpha=16)        # wraps attention and feed-forward layers, freezes the rest
    ...train...
    save_file(lora_state_dict(model), "adapters.safetensors")    # only the adapters
    merge_lora(model)                           # a plain GPT again, with the update folded in
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

# the Linear layers of a GPT block that get adapters: attention's q/k/v and output projections and the
# feed-forward's two layers (names as in gpt/model.py, matched as suffixes of the module path)
DEFAULT_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B A``.

    ``weight`` and ``bias`` are the wrapped layer's, so code that reads them keeps working; code that adds
    the bias itself calls :meth:`matmul`, which includes the adapter's term.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        check_lora_settings(rank, alpha)
        self.linear = linear
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        w = linear.weight  # (out, in)
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init for an in -> r layer

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight  # (out, in), frozen

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias  # (out,) or None

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank term alone: (..., in) -> (..., out). Zero while B is zero."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the bias, adapter included: for a caller that fuses the bias into its next
        op (``MLP`` in gpt/model.py, through ``PreBiasLinear.matmul``)."""
        return F.linear(x, self.weight) + self.lora_delta(x)  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora_delta(x)  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` with ``scale * B A`` added to its weight (in place)."""
        self.linear.weight += (self.lora_B @ self.lora_A) * self.scale  # (out, r) @ (r, in) = (out, in)
        return self.linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def check_lora_settings(rank, alpha) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}: try --lora-rank 8 or 16")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}: try --lora-alpha equal to the rank")


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose module path ends with one of ``targets`` in a :class:`LoRALinear`,
    freeze every other parameter of ``model``, and return the wrapped layers' names.

    Layers already wrapped are left as they are (so calling it again changes nothing but the freezing).
    """
    check_lora_settings(rank, alpha)
    targets = tuple(targets)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, LoRALinear):
                wrapped.append(name)
            elif isinstance(child, nn.Linear) and _matches(name, targets):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(name)
    if not wrapped:
        raise UserError(f"no Linear layer of the model matches the LoRA targets {list(targets)}")
    for pname, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(pname))
    return wrapped


def is_lora_parameter(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B")


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (``...lora_A``, ``...lora_B``), contiguous and detached: what to save."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_lora_parameter(k)}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the adapters") -> None:
    """Copy saved adapters into a model that :func:`apply_lora` has wrapped with the same settings."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}: "
                        f"they were trained on another architecture or with other LoRA targets")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{source}: {k!r} has shape {tuple(v.shape)} but the model expects "
                            f"{tuple(expected[k].shape)} (another LoRA rank or model width?)")
    model.load_state_dict(state, strict=False)


def _unwrap(model: nn.Module, replacement) -> nn.Module:
    """Put ``replacement(adapter)`` in place of every :class:`LoRALinear` of ``model`` (in place)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, replacement(child))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (in place).

    The merged model computes the same function (up to float rounding) with the base model's parameter
    count and speed; its state dict has the base model's keys again, so it saves as a normal checkpoint.
    """
    return _unwrap(model, LoRALinear.merged)


def strip_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters taken off, not merged: the base model they were put on."""
    return _unwrap(copy.deepcopy(model), lambda adapter: adapter.linear)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
