"""The optimizer and the learning-rate schedule every training job uses (pretraining and finetuning alike)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import UserError


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``
    (the book's appendix D). ``min_lr == lr`` with no warm-up is a constant rate (chapters 5-7)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on those of two or more dimensions (matmul and
    embedding weights, LoRA's matrices, a classifier's weight) and none on biases and LayerNorm parameters,
    as GPT-2 and nanoGPT do (the book decays everything). A tied head and embedding is one parameter and
    appears once. ``fused``: one kernel for the whole update (on a 2-core CPU 40x faster than the default
    for 16M parameters). ``betas``: the moments' decay rates (PyTorch's default; GPT-2 recipes use 0.95 for
    the second)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter of the model is frozen")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def make_scheduler(optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, lr, min_lr, warmup_steps, total_steps) / lr)


def optimizer_step(optimizer, scheduler, scaler, model: nn.Module, grad_clip: float | None) -> float:
    """Clip the gradients' global norm, update the weights, clear the gradients, advance the schedule.
    Returns the learning rate this step used."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # fp16: the gradients were scaled up; clip the true ones
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped if a gradient overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr
