"""Pretraining: chapter 5's training loop of "Build a Large Language Model (From Scratch)", grown up.

    from gpt.pretrain import TrainConfig, train
    result = train(TrainConfig(epochs=10))        # what `gpt train` runs: The Verdict, the "mini" preset
    result.model, result.out_dir, result.metrics

The task is the book's ``train_model_simple``: batches of sliding windows over the text, next-token
cross-entropy, a train/validation loss every few steps, a sample from "Every effort moves you" after each
epoch. The engine (:mod:`gpt.engine`) adds what a long run needs: a learning rate that warms up, then
follows a cosine down to ``min_lr`` (the book's appendix D), gradient clipping and accumulation up to
``tokens_per_step``, bf16 autocast (or fp16 with a gradient scaler) on CUDA, ``torch.compile``,
DistributedDataParallel under ``torchrun``, checkpoints that resume exactly, and Ctrl-C to save and stop.

``data`` may also be a folder of ``gpt prepare-data`` (:mod:`gpt.shards`, a corpus of any size): its
training shards are streamed by memory map, in order, each process reading its own windows of each step
(:mod:`gpt.stream`), and the evaluations read its validation shard.

A run directory (``--out``, default ``runs/<date-time>``) holds:

    config.json, model.safetensors   the latest weights: ``gpt.weights.load_checkpoint(run_dir)`` loads them
    trainer_state.pt                 optimizer, schedule, step and random generators (for --resume;
                                     a sharded run's optimizer in optimizer/: gpt.trainer_state)
    log.jsonl                        one JSON line per evaluation and per generated sample
    loss.png                         training and validation loss against tokens seen
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .checks import check_positive
from .config import PRESETS
from .data import SlidingWindowDataset, default_text_path, load_tokens, split_tokens
from .engine import RunResult, Task, Trainer
from .errors import UserError
from .generate import generate
from .hellaswag import read_hellaswag, score
from .job import run
from .model import GPT
from .plot import plot_losses
from .runtime import Processes, rng_preserved
from .settings import RunConfig, configure
from .stream import ShardCorpus, is_shard_folder
from .tokenizer import VOCAB_SIZE, decode, encode, visible
from .weights import (
    check_vocab_padding,
    load_checkpoint,
    load_model,
    model_source,
    save_checkpoint,
    vocab_padding,
)

DEFAULT_PRESET = "mini"  # trains on The Verdict in minutes on a laptop CPU
DEFAULT_EPOCHS = 10  # chapter 5
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Everything a pretraining run depends on: the shared settings of :class:`gpt.engine.RunConfig` and
    these. The defaults are chapter 5's run, on the small ``mini`` model instead of GPT-2 small."""

    book_init: bool = False  # a fresh model as the book's chapter 5 builds it: PyTorch's default init and an
    # untied output head (GPT-2's init, std 0.02 and tied, memorises The Verdict far more slowly)
    pad_vocab_multiple: int | None = None  # embedding/head rows of a fresh or GPT-2 model rounded up to a
    # multiple of this; None: 64 on CUDA (50,304 rows: the head's matmuls and the loss kernel get 16-byte
    # aligned rows and vector loads), 1 elsewhere. A checkpoint keeps its own.
    # the data
    data: str | None = None  # a text file, a directory of .txt files, or a folder of gpt prepare-data's shards
    # (streamed in order; validation: its validation shard); None: The Verdict (bundled)
    val_ratio: float = 0.1  # the last 10% of the tokens are the validation split, as in the book (not for shards)
    context_length: int | None = None  # tokens per window; None: the model's context length
    stride: int | None = None  # tokens between window starts; None: context_length (no overlap)
    tokens_per_step: int | None = None  # tokens per optimizer step (accumulating micro-batches to reach it);
    # None: one micro-batch per process
    # the sample after each epoch
    sample_prompt: str = "Every effort moves you"  # continued greedily after each epoch
    sample_tokens: int = 50
    # HellaSwag (gpt.hellaswag) at evaluations, into the log
    hellaswag: str | None = None  # a HellaSwag JSON-lines file (hellaswag_val.jsonl); None: none
    hellaswag_every: int | None = None  # steps between HellaSwag scores (a multiple of eval_every; and at the
    # end); None: at every evaluation

    RESUME_MAY_CHANGE: ClassVar[frozenset] = RunConfig.RESUME_MAY_CHANGE | {"sample_prompt", "sample_tokens",
                                                                            "hellaswag", "hellaswag_every"}

    def check(self) -> None:
        super().check()
        for name in ("context_length", "stride", "tokens_per_step", "pad_vocab_multiple", "hellaswag_every"):
            check_positive(self, name, allow_none=True)
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 0:
            raise UserError(f"--sample-tokens must be >= 0 (0: no samples), got {self.sample_tokens!r}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise UserError(f"--val-ratio must be in [0, 1), got {self.val_ratio}")
        if self.hellaswag_every and self.eval_every and self.hellaswag_every % self.eval_every:
            raise UserError(f"--hellaswag-every {self.hellaswag_every} must be a multiple of --eval-every "
                            f"{self.eval_every}: HellaSwag is scored at evaluations")
        if self.hellaswag_every and not self.hellaswag:
            raise UserError("--hellaswag-every needs --hellaswag FILE.jsonl")


def train(cfg: TrainConfig | None = None, *, on_step=None, **settings) -> RunResult:
    """Pretrain a model as ``cfg`` says (or ``train(epochs=2, preset="tiny", ...)``); see :class:`TrainConfig`.

    Returns the run's :class:`gpt.engine.RunResult` (the model, the run directory, the losses and the
    evaluations). ``on_step(step, loss)`` is called after every optimizer step (``step`` counts from 1).
    Raises ValueError/OSError for bad settings, data or checkpoints (before anything is written), and
    KeyboardInterrupt after saving a checkpoint when stopped by Ctrl-C.
    """
    return run(configure(TrainConfig, cfg, settings), PretrainTask, on_step=on_step)


# ------------------------------------------------------------------------------------------ the task


class PretrainTask(Task):
    """Next-token prediction on sliding windows of a text (see :mod:`gpt.engine` for the loop)."""

    name = "pretraining"
    default_epochs = DEFAULT_EPOCHS
    eval_at_start = True  # the loss before training: about ln(50257) = 10.8 for a fresh model

    def __init__(self, cfg: TrainConfig, env: Processes, saved: dict | None):
        if saved is not None:
            model, what = load_checkpoint(cfg.resume, kernel_backend=cfg.kernels), f"run {cfg.resume}"
        else:
            model, what = _build_model(cfg, env.device)
        self.model, self.what = model.to(env.device), what
        ctx = cfg.context_length or model.config.context_length
        preset_ctx = PRESETS[cfg.preset or DEFAULT_PRESET].context_length if what.startswith("preset") else ctx
        self.grown = (f"note: a fresh model takes --context-length as its own: this one's is {ctx}, not the preset's "
                      f"{preset_ctx} (its position table has {ctx} rows)") if ctx != preset_ctx else None
        if ctx > model.config.context_length:
            raise UserError(f"context length {ctx} is longer than the model's {model.config.context_length}: "
                            f"use --context-length {model.config.context_length} or less")
        self.shuffle = not is_shard_folder(cfg.data)  # prepared shards are streamed in order
        self.data = _Data(cfg, ctx, env) if self.shuffle else ShardCorpus(cfg.data, ctx, cfg.stride)
        if self.data.vocab_size > model.config.vocab_size:
            raise UserError(f"the data's tokenizer has {self.data.vocab_size:,} token ids, more than the model's "
                            f"vocabulary of {model.config.vocab_size:,}")
        self.train_set = self.data.train
        self.hellaswag = read_hellaswag(cfg.hellaswag) if cfg.hellaswag else None
        accum = _accumulation(cfg, ctx, env.world)
        self.examples_per_step, self.ctx, self.main = cfg.batch_size * env.world * accum, ctx, env.main
        self.tokens_per_step = self.examples_per_step * ctx
        self.found = {"preset": cfg.preset or (None if cfg.checkpoint or cfg.hf else DEFAULT_PRESET),
                      "context_length": ctx, "stride": cfg.stride or ctx, "tokens_per_step": self.tokens_per_step,
                      "pad_vocab_multiple": model.config.pad_vocab_multiple}
        self.lines = [f"model: {self.what}, {model.num_parameters() / 1e6:.1f}M parameters, context {ctx}, "
                      f"dropout {model.config.dropout}, kernels {cfg.kernels}"
                      + (" with torch.compile" if cfg.compile else "")]

    def describe(self) -> list[str]:
        d = self.data
        return [*self.lines,
                *([self.grown] if self.grown else []),
                f"data: {d.source}: {d.num_train_tokens:,} training / {d.num_val_tokens:,} validation tokens; "
                f"{len(d.train):,} windows of {self.ctx}, {self.tokens_per_step:,} tokens per step"]

    def collate(self, items):
        x = torch.stack([x for x, _ in items])  # (B, T)
        y = torch.stack([y for _, y in items])  # (B, T)
        return x, y

    def count(self, batch) -> int:
        return batch[1].numel()  # every position has a target

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y)  # train mode: (None, mean loss over B*T tokens)
        return loss

    def evaluate(self, run: Trainer) -> dict:
        record = {"tokens": run.step * self.tokens_per_step, "train_loss": self._mean_loss(run, self.data.train),
                  "val_loss": self._mean_loss(run, self.data.val)}
        every = run.config.hellaswag_every
        if self.hellaswag and (not every or run.step % every == 0 or run.step == run.total_steps):
            record.update(self._hellaswag(run))
        return record

    def _hellaswag(self, run: Trainer) -> dict:
        """acc and acc_norm on the HellaSwag file, the examples shared out among the processes."""
        with rng_preserved():
            r = score(run.model, self.hellaswag, run.config.batch_size, run.env.device,
                      run.precision.autocast, run.env.rank, run.env.world)
        n, correct, norm = run.env.sum([r["n"], r["correct"], r["correct_norm"]])
        return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": norm / n}

    @staticmethod
    def _mean_loss(run: Trainer, ds) -> float | None:
        if ds is None:
            return None

        def sums(model, batch):
            x, y = batch
            _, loss = model(x, y, return_logits=False)
            return loss * y.numel(), y.numel()

        total, n = run.eval_sums(ds, sums, 2)
        return total / n

    def report(self, r: dict) -> str:
        return (f"Ep {max(1, math.ceil(r['epoch']))} (step {r['step']:06d}): train loss {r['train_loss']:.3f}"
                + (f", val loss {r['val_loss']:.3f}" if r["val_loss"] is not None else "")
                + (f", HellaSwag acc_norm {r['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in r else ""))

    def epoch_end(self, run: Trainer) -> None:
        c = run.config
        if not (self.main and c.sample_prompt and c.sample_tokens):
            return
        ids = encode(c.sample_prompt)[-self.ctx:]
        out = generate(self.model, ids, c.sample_tokens)  # greedy, as the book's generate_and_print_sample
        text = decode(out.tolist())
        run.log_record({"event": "sample", "step": run.step, "epoch": run.epoch, "text": text})
        when = f"after epoch {round(run.epoch)}" if run.step % run.steps_per_epoch == 0 else f"at step {run.step}"
        run.say(f"sample {when}: {visible(text)}")

    def save(self, run: Trainer, model: GPT, directory: Path) -> None:
        save_checkpoint(model, directory,
                        extra_config={"step": run.step, "train": dataclasses.asdict(run.config)})
        plot_losses(run.evals, directory / PLOT_FILE, title=f"{run.run_dir.name}: {self.what}")

    def finish(self, run: Trainer) -> dict:
        last = run.evals[-1] if run.evals else {}
        run.say(f"done: {run.step} steps, {run.step * self.tokens_per_step:,} tokens in {run.elapsed():.0f} s; "
                f"train loss {last.get('train_loss', float('nan')):.3f}, val loss "
                f"{last.get('val_loss') or float('nan'):.3f}. "
                f"Checkpoint, log.jsonl and loss.png in {run.run_dir}; try: gpt generate --checkpoint "
                f"{run.run_dir} --prompt \"{run.config.sample_prompt}\"")
        return {"tokens_seen": run.step * self.tokens_per_step}


def _accumulation(cfg: TrainConfig, ctx: int, world: int) -> int:
    """Micro-steps per optimizer step: ``tokens_per_step`` must be a whole number of micro-steps (the
    batches of every process together), or the run would silently use another number of tokens."""
    micro = cfg.batch_size * world * ctx  # tokens of one micro-step, all processes together
    if cfg.tokens_per_step is None:
        return 1
    if cfg.tokens_per_step % micro and cfg.resume:
        raise UserError(f"cannot resume {cfg.resume} with {world} process(es): the run took "
                        f"{cfg.tokens_per_step:,} tokens per optimizer step, which micro-steps of {micro:,} tokens "
                        f"do not add up to; resume with the number of processes it was saved with")
    if cfg.tokens_per_step % micro:
        lower, higher = cfg.tokens_per_step // micro * micro, (cfg.tokens_per_step // micro + 1) * micro
        nearest = " or ".join(f"{n:,}" for n in (lower, higher) if n)
        raise UserError(f"--tokens-per-step {cfg.tokens_per_step:,} is not a multiple of the {micro:,} tokens of a "
                        f"micro-step (--batch-size {cfg.batch_size} x context {ctx} x {world} process(es)): use "
                        f"{nearest}, or change the batch size or the context length")
    return cfg.tokens_per_step // micro


def _build_model(cfg: TrainConfig, device: torch.device) -> tuple[GPT, str]:
    kind, source = model_source(cfg.checkpoint, cfg.hf, cfg.preset, DEFAULT_PRESET)
    overrides = {}
    if kind == "preset":
        overrides = {"context_length": cfg.context_length} if cfg.context_length else {}
        if cfg.book_init:
            overrides.update(init="torch", tie_weights=False)
    overrides.update(vocab_padding(kind, cfg.pad_vocab_multiple, device))
    model = load_model(source, kind=kind, kernel_backend=cfg.kernels, **overrides)
    check_vocab_padding(model, cfg.pad_vocab_multiple, source)
    if cfg.dropout is not None and cfg.dropout != model.config.dropout:
        model.set_dropout(cfg.dropout)
    return model, {"checkpoint": f"from {source}", "hf": f"from GPT-2 {source}", "preset": f"preset {source!r}"}[kind]


class _Data:
    """The token ids split 90/10 into training and validation windows."""

    def __init__(self, cfg: TrainConfig, context_length: int, env: Processes):
        source = cfg.data or default_text_path()
        self.source, self.vocab_size = source, VOCAB_SIZE
        # A big corpus is tokenized once into a token file beside it. Under torchrun, process 0 does that
        # first, then the first process of each other machine (whose disk may not be shared), then the rest
        # read the file, so no two processes ever write the same file.
        tokens = None
        for my_turn in (env.main, env.local_rank == 0 and not env.main, env.local_rank != 0):
            if my_turn:
                tokens = load_tokens(source)
            env.barrier()
        train_tokens, val_tokens = split_tokens(tokens, cfg.val_ratio)
        self.num_train_tokens, self.num_val_tokens = len(train_tokens), len(val_tokens)
        try:
            self.train = SlidingWindowDataset(train_tokens, context_length, cfg.stride or context_length)
        except ValueError:
            raise UserError(f"the training split of {source} has {len(train_tokens)} tokens, fewer than one "
                            f"window of {context_length} (+1 for the targets): use a longer text, a smaller "
                            f"--context-length or a smaller --val-ratio") from None
        self.val = None
        if cfg.val_ratio > 0:
            try:
                self.val = SlidingWindowDataset(val_tokens, context_length, context_length)
            except ValueError:
                raise UserError(f"the validation split of {source} ({cfg.val_ratio:.0%} of it) has "
                                f"{len(val_tokens)} tokens, fewer than one window of {context_length} "
                                f"(+1 for the targets): use a longer text, a smaller --context-length, a larger "
                                f"--val-ratio, or --val-ratio 0 to train without validation") from None
