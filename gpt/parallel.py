"""Training on several processes (torchrun): how the model is spread over them (``--parallel``).

- ``ddp`` (``DistributedDataParallel``): every process holds the whole model, its gradients and AdamW's
  two moments (16 bytes a parameter in float32); the gradients are averaged after each backward.
- ``fsdp`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): each transformer block is a unit, and so is the
  rest of the model (the root: embeddings, final LayerNorm, head, a classifier's head). Each process holds
  a 1/N shard of every unit's weights, gradients and AdamW moments; a unit's weights are gathered for its
  forward and again for its backward, and its gradients reduce-scattered back into shards. The math is
  DDP's: the same averaged gradient, the same update.

Mixed precision under FSDP (:func:`mixed_precision`): weights gathered and gradients reduced in float32,
and ``torch.autocast`` (:class:`gpt.runtime.Precision`) casting each matmul's inputs as it does alone and
under DDP, so the autocast policy of :mod:`gpt_kernels.autocast` holds unchanged: float32 residual stream,
LayerNorm statistics and losses, bf16 matmuls. (FSDP's own ``param_dtype=bfloat16`` would halve the
gathered bytes but put the LayerNorm weights, the embeddings and so the residual stream in bf16.)

A training step calls :meth:`Parallel.step_model` (torch.compile'd when asked, inside DDP under ddp).
Everything else that runs the model (evaluations, samples, HellaSwag, a test set's answers) runs the raw
model inside :meth:`Parallel.whole`: under FSDP every unit's weights are gathered once for the block, so
each process may run as many forward passes as its share of the work needs (a sharded unit would
otherwise wait at each pass for every process to run it too). A checkpoint's model files are written
from :meth:`Parallel.full_model`: the model itself, or under FSDP a whole copy on the first process's CPU.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from .model import Block
from .runtime import Processes


def mixed_precision():
    """FSDP's mixed-precision policy: float32 gathers and reductions; autocast does the casts (see above)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory): its structure,
    to be filled with weights later. Tied parameters stay tied."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict, device="cpu") -> nn.Module:
    """A copy of the meta ``skeleton`` with the tensors of ``state`` (a full state dict) on ``device``;
    tied parameters stay tied."""
    model, made = copy.deepcopy(skeleton), {}
    for m in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None:
                    if id(t) not in made:
                        new = torch.empty_like(t, device=device)
                        made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                    getattr(m, kind)[name] = made[id(t)]
    model.load_state_dict(state)
    return model


class Parallel:
    """How one run's model is spread over its processes: ``mode`` none (one process), ddp or fsdp."""

    def __init__(self, mode: str, env: Processes):
        self.mode, self.env = mode, env
        self._skeleton = None  # under fsdp: the model's structure, for full_model

    def shard(self, model: nn.Module) -> None:
        """Under fsdp, shard ``model`` in place (each transformer block, then the root); before the optimizer
        is made, which then holds the shards. Otherwise nothing."""
        if self.mode != "fsdp":
            return
        from torch.distributed.fsdp import fully_shard

        self._skeleton = meta_copy(model)
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mp_policy=mixed_precision())
        fully_shard(model, mp_policy=mixed_precision())

    def step_model(self, model: nn.Module, compile: bool) -> nn.Module:
        """What a training step calls: ``model`` (compiled when asked), inside DDP under ddp."""
        step_model = torch.compile(model) if compile else model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = self.env.device
            step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda"
                                                 else None)
        return step_model

    def no_sync(self, step_model: nn.Module, last: bool):
        """Around a micro-step's backward: DDP keeps the gradients local until the step's last micro-step.
        (FSDP reduce-scatters each micro-step's gradients into the shards, which add up the same.)"""
        return step_model.no_sync() if self.mode == "ddp" and not last else contextlib.nullcontext()

    @contextlib.contextmanager
    def whole(self, model: nn.Module):
        """A block in which ``model`` holds its whole weights on every process (see the module's doc). Every
        process enters and leaves it together."""
        if self.mode != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The model to write a checkpoint's files from: ``model``, or under fsdp a whole copy on the first
        process's CPU (None on the others). Every process calls this."""
        if self.mode != "fsdp":
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return materialize(self._skeleton, state) if self.env.main else None
