"""Which examples each optimizer step takes, on each process, and where a run stands in its data.

The engine (:mod:`gpt.engine`) hands a task's training examples to an :class:`ExampleSource`, which
deals them out step by step and keeps the position: the epoch, and the cursor (the first example of the
next step in the epoch's order). The order of an epoch is a permutation drawn from (seed, epoch) for the
examples a task holds in memory, or the examples' own order for prepared shards (``seed=None``: the
windows are read in sequence, each process its own, as build-nanogpt and llm.c stream their shards).

Step ``s`` of an epoch takes the next ``G = batch_size * accumulation * processes`` examples of the order;
micro-step ``m`` takes ``batch_size * processes`` of them and process ``r`` its ``r``-th ``batch_size``.
So within a step the processes' examples are disjoint, and over an epoch they cover every example but the
fewer-than-``G`` left at its end (skipped, as ``drop_last``).

Every process's position is part of the trainer state (:meth:`state_dict`, gathered from all processes);
a resumed run continues from it exactly. With another number of processes (and the same ``G``) the
global position continues and only the dealing of each step changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import UserError


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled example indices of ``epoch``, (num_examples,): the same in every process and resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_examples, generator=g)


class ExampleSource:
    """The examples of a run, dealt out step by step (see the module's doc)."""

    def __init__(self, examples: Sequence, seed: int | None):
        self.examples, self.seed = examples, seed  # seed None: in order
        self.epoch, self.cursor, self.rank, self.last = 0, 0, 0, -1
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.examples)

    def _order_of(self, epoch: int):
        if self.seed is None:
            return range(len(self.examples))
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, epoch_order(len(self.examples), self.seed, epoch)
        return self._order

    def next_step(self, accum: int, batch_size: int, world: int, rank: int) -> list[list]:
        """This process's examples of the next step: ``accum`` lists of ``batch_size``; the position moves on."""
        per_micro = batch_size * world
        per_step = per_micro * accum
        if self.cursor + per_step > len(self):  # what is left of the epoch does not fill a step
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._order_of(self.epoch)
        out = []
        for m in range(accum):
            start = self.cursor + m * per_micro + rank * batch_size
            out.append([self.examples[int(i)] for i in order[start:start + batch_size]])
        self.cursor, self.rank, self.last = self.cursor + per_step, rank, start + batch_size - 1
        return out

    def state_dict(self) -> dict:
        """This process's position: the epoch, the next step's first example (all processes together) and
        the last example (in the epoch's order) this process read."""
        return {"epoch": self.epoch, "cursor": self.cursor, "rank": self.rank, "last": self.last,
                "examples": len(self), "fingerprint": getattr(self.examples, "fingerprint", None)}

    def load_state_dict(self, states: list[dict], rank: int) -> None:
        """Continue from ``states`` (every process's :meth:`state_dict`, in rank order, as saved)."""
        mine = states[rank] if rank < len(states) else states[0]
        if mine["examples"] != len(self) or mine["fingerprint"] != getattr(self.examples, "fingerprint", None):
            raise UserError(f"the training data changed since the run was saved ({mine['examples']:,} examples "
                            f"then, {len(self):,} now{'; other shards' if mine['fingerprint'] else ''}): resume "
                            f"with the data it was trained on, or start a new run from its weights")
        if any((s["epoch"], s["cursor"]) != (mine["epoch"], mine["cursor"]) for s in states):
            raise UserError("the saved positions of the processes disagree: the trainer state is corrupt")
        self.epoch, self.cursor = mine["epoch"], mine["cursor"]
        if rank < len(states):
            self.rank, self.last = mine["rank"], mine["last"]
