"""Training on the shards of ``gpt prepare-data`` (:mod:`gpt.shards`): windows read by memory map.

    corpus = ShardCorpus("data/edu10b", context_length=1024)
    corpus.train[0]        # (inputs (1024,), targets (1024,)): the first window of the first training shard
    corpus.val             # the validation shard's windows (a SlidingWindowDataset), or None

Nothing is read until a window is: a 10B-token corpus opens in milliseconds and costs no memory but the
page cache. The training windows are ``context_length + 1`` tokens, ``stride`` apart, within each shard
(the few tokens at a shard's end that do not fill a window are left out), numbered through the shards in
the index's order. The engine reads them in that order (:class:`gpt.sources.ExampleSource` with no seed),
each process its own windows of each step, and keeps every process's position in the trainer state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .data import SlidingWindowDataset
from .errors import UserError
from .shards import DTYPE, FORMAT, INDEX_FILE, check_shards


def is_shard_folder(path) -> bool:
    """Whether ``path`` is a folder written by ``gpt prepare-data``."""
    return path is not None and (Path(path) / INDEX_FILE).is_file()


def read_index(directory) -> dict:
    """The index of a finished ``gpt prepare-data`` folder, its shards' sizes checked."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): prepare the data again with gpt prepare-data") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not an index of this version's gpt prepare-data: prepare the data again")
    if not index.get("complete"):
        raise UserError(f"{directory} is not finished: run the same gpt prepare-data command again to finish it")
    check_shards(directory, index, "prepare the data again")
    return index


class ShardWindows:
    """The training windows of every training shard, in order (see the module's doc). A sequence."""

    def __init__(self, shards: list[np.ndarray], context_length: int, stride: int, fingerprint: str):
        self.shards, self.context_length, self.stride = shards, context_length, stride
        counts = [max(0, (len(s) - context_length - 1) // stride + 1) for s in shards]
        self.starts = np.cumsum([0] + counts)  # (shards + 1,): the first window of each shard
        self.fingerprint = fingerprint  # which shards these are (a resume checks it)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[k])) * self.stride
        chunk = torch.from_numpy(self.shards[k][start:start + self.context_length + 1].astype(np.int64))  # (T + 1,)
        return chunk[:-1], chunk[1:]  # inputs (T,), targets (T,)


class ShardCorpus:
    """A prepared folder: its training windows (``train``), validation windows (``val``) and token counts."""

    def __init__(self, directory, context_length: int, stride: int | None = None):
        directory = Path(directory)
        self.index = index = read_index(directory)
        self.source = str(directory)
        self.vocab_size = index["tokenizer"]["vocab_size"]
        maps = {s["file"]: np.memmap(directory / s["file"], dtype=DTYPE, mode="r") if s["tokens"] else
                np.empty(0, DTYPE) for s in index["shards"]}
        train = [maps[s["file"]] for s in index["shards"] if s["split"] == "train"]
        val = [maps[s["file"]] for s in index["shards"] if s["split"] == "val"]
        self.num_train_tokens, self.num_val_tokens = sum(map(len, train)), sum(map(len, val))
        what = json.dumps([index["tokenizer"], [(s["file"], s["tokens"], s["sha256"]) for s in index["shards"]]])
        self.train = ShardWindows(train, context_length, stride or context_length,
                                  hashlib.sha256(what.encode()).hexdigest()[:16])
        if len(self.train) == 0:
            raise UserError(f"the training shards of {directory} have {self.num_train_tokens:,} tokens, fewer than "
                            f"one window of {context_length} (+1 for the targets): prepare more data or use a "
                            f"smaller --context-length")
        self.val = None
        if val and len(val[0]) > context_length:
            self.val = SlidingWindowDataset(val[0], context_length, context_length)
