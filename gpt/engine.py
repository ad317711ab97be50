"""The training engine: one loop for pretraining and every finetuning task.

A *task* (:class:`Task`) says what differs between jobs: the model, the training examples and how a batch
is built from them, the loss, the evaluation, what a checkpoint's model files are, what happens at the
end. The engine owns the rest, the same for all: the learning-rate schedule, the optimizer rule
(:mod:`gpt.optim`), mixed precision, gradient accumulation and clipping, DistributedDataParallel under
torchrun, evaluations and checkpoints on a schedule, exact resume at any step, Ctrl-C (finish the
step, or cut the evaluation or sample after it short; save; stop), a run directory held from start to end
(:func:`gpt.rundir.claim_run_dir`), and an estimate of the run's length once its first steps are timed
(:mod:`gpt.clock`).
As nanoGPT's one loop serves every config and Lightning's ``Trainer`` every module.

**Which examples a step sees** (:mod:`gpt.sources`). Each epoch shuffles the training examples with a
generator seeded by (seed, epoch), or keeps their order (a task's ``shuffle = False``: prepared shards,
streamed). Optimizer step ``s`` of the epoch takes the next ``G`` examples of that order, where
``G = batch_size * accumulation * processes``; micro-step ``m`` takes ``batch_size * processes`` of them
and process ``r`` its ``r``-th ``batch_size``. Examples left over at an epoch's end are skipped (as
``drop_last``). The loss of a step is the mean over all its loss terms (tokens, or examples) on every
process, however they are split: one process with batch 8, two with batch 4, or one with batch 2 and 4
accumulation steps follow the same curve (up to float rounding).

**Exact resume.** A checkpoint is taken between two steps and holds everything the later steps depend
on: weights, optimizer, schedule, gradient scaler, the step, every process's position in the data and
its random generators (CPU and GPU: dropout masks and the attention kernels' dropout seeds), the running
loss since the last evaluation, and the step's evaluation or sample if Ctrl-C left it undone (a resume
does it first). Evaluations and samples run with the generators saved and put back
(:func:`gpt.runtime.rng_preserved`), so they never shift the training's random streams. A run stopped
at any step and resumed ends bit-identical to one that was never stopped (tested for every task).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checks import check_run_settings
from .clock import RunClock
from .model import set_recompute
from .optim import make_optimizer, make_scheduler, optimizer_step
from .rundir import LOG_FILE, STATE_FILE, RunLog, claim_run_dir, save_staged, tensor_bytes
from .runtime import (
    Precision,
    Processes,
    StopOnSignal,
    rng_preserved,
    rng_state,
    seed_all,
    set_rng_state,
    to_device,
)
from .sources import ExampleSource

STATE_FORMAT = "gpt-triton-trainer-3"  # 3: every process's data position ("data")


@dataclass
class RunConfig:
    """The settings every training job shares (:class:`gpt.pretrain.TrainConfig` and
    :class:`gpt.finetune.FinetuneConfig` add their own). ``None`` means "work it out" (see each comment)."""

    # the model to start from
    preset: str | None = None  # architecture of a fresh model; None: "mini" (ignored with checkpoint/hf)
    checkpoint: str | None = None  # start from one of our checkpoint directories instead
    hf: str | None = None  # ... or from a Hugging Face GPT-2 directory
    dropout: float | None = None  # None: the model's own (0.1 for the presets)
    kernels: str | None = None  # kernel backend of the model's fused ops: auto, triton, torch, reference; None:
    # $GPT_KERNELS if set, else auto (the rule of every command; resolved when the run starts, also on resume)
    # the run directory
    out: str | None = None  # None: a new folder under runs/ (or the --resume directory)
    resume: str | None = None  # a run directory to continue
    # the optimisation
    epochs: int | None = None  # passes over the training examples; None: the job's (10 pretraining, 5 or 2
    # finetuning, as the book's chapters)
    max_steps: int | None = None  # the run's length in optimizer steps instead of epochs (give one of them).
    # The schedule spans the run's length: a resume that changes it (either setting) reshapes what is left
    batch_size: int = 2  # examples per forward pass per process
    lr: float = 4e-4  # peak learning rate
    min_lr: float | None = None  # where the cosine ends; None: lr * MIN_LR_SHARE
    warmup_steps: int | None = None  # linear warm-up steps; None: WARMUP_SHARE of the run's steps
    weight_decay: float = 0.1  # AdamW's, on weights of 2 or more dimensions only (see gpt.optim)
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None or 0: no clipping
    # evaluation and checkpoints
    eval_every: int | None = 5  # optimizer steps between evaluations; None: after each epoch
    eval_batches: int | None = 5  # batches (of batch_size per process) per evaluated split; None: all
    save_every: int | None = 500  # optimizer steps between checkpoints; None: after each epoch (and always
    # at the end and on Ctrl-C)
    # the machine
    seed: int = 123
    device: str = "auto"  # auto, cpu, cuda, cuda:1 (under torchrun: each process's own GPU)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16, float16 (CUDA only)
    compile: bool = False  # torch.compile the model
    recompute: str = "none"  # activation recomputation: none, blocks, attention (gpt.model.RECOMPUTE)

    # settings a resumed run may change; every other one comes from the checkpoint (another data set, batch
    # or schedule would make the resumed run something other than a continuation)
    RESUME_MAY_CHANGE: ClassVar[frozenset] = frozenset({
        "epochs", "max_steps", "out", "resume", "device", "dtype", "compile", "recompute", "kernels", "eval_every",
        "eval_batches", "save_every"})
    WARMUP_SHARE: ClassVar[float] = 0.05  # warm-up steps when warmup_steps is None, as a share of the run
    MIN_LR_SHARE: ClassVar[float] = 0.1  # min_lr when None, as a share of lr

    def check(self) -> None:
        """Clear errors for settings that make no sense (before anything is loaded or written)."""
        check_run_settings(self)


@dataclass
class RunResult:
    model: nn.Module  # the trained model (not wrapped in DDP or torch.compile)
    out_dir: Path | None  # the run directory (None on processes other than the first)
    step: int  # optimizer steps done in total (including those before a resume)
    examples_seen: int  # training examples (windows, texts, records) the steps took, over all processes
    losses: list[float] = field(default_factory=list)  # the training loss of every step this call ran
    evals: list[dict] = field(default_factory=list)  # every evaluation of the run (also in log.jsonl)
    metrics: dict = field(default_factory=dict)  # the last evaluation's metrics and the task's final ones


class Task:
    """What a training job says; the engine does the rest. Set the attributes in ``__init__``."""

    name: str  # recorded in the checkpoint: a run resumes only as the task it was
    run_prefix: str = ""  # a new run's default directory is runs/<prefix>-<date-time>
    config: RunConfig  # the job's settings with everything resolved (what a resume continues with)
    model: nn.Module  # on the device, with its trainable parameters marked (requires_grad)
    train_set: Sequence  # the training examples: the engine shuffles and deals them out
    shuffle: bool = True  # a new order of train_set each epoch; False: its own order (streamed shards)
    examples_per_step: int | None = None  # all processes together; None: one batch per process
    eval_at_start: bool = False  # evaluate before the first step too
    after_training: str = ""  # untimed work after the last step, named in the time estimate

    def describe(self) -> list[str]:
        """Lines printed before training (the model, the data)."""
        return []

    def collate(self, items: list) -> tuple[torch.Tensor, ...]:
        """A batch (a tuple of CPU tensors) of examples of ``train_set`` (or of an evaluated split)."""
        raise NotImplementedError

    def count(self, batch) -> int:
        """How many terms the batch's mean loss averages (tokens with a target, examples)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The batch's mean loss (a scalar tensor), in training mode."""
        raise NotImplementedError

    def evaluate(self, run: Trainer) -> dict:
        """The metrics of an evaluation (use ``run.eval_sums``); the engine logs them."""
        raise NotImplementedError

    def report(self, record: dict) -> str:
        """One line for an evaluation's record."""
        raise NotImplementedError

    def epoch_end(self, run: Trainer) -> None:
        """After each epoch and after the last step (e.g. print a sample)."""

    def begin(self, run_dir: Path) -> None:
        """Once, when the run directory has been created (first process only)."""

    def save(self, run: Trainer, directory: Path) -> None:
        """Write the model's files of a checkpoint into ``directory`` (first process only)."""
        raise NotImplementedError

    def finish(self, run: Trainer) -> dict:
        """After the last step's checkpoint: final work (a test set) and its metrics."""
        return {}


# ------------------------------------------------------------------------------------------ the loop


class Trainer:
    """One run of a task: the schedule, the steps, the evaluations and checkpoints (see the module's doc).

    What a task may use: ``model`` (the raw model), ``step``, ``epoch`` (fractional), ``steps_per_epoch``,
    ``total_steps``, ``per_step`` (examples per step), ``env`` (rank, world size), ``run_dir``, ``evals``,
    ``say``, ``log_record``, ``elapsed``, ``running_loss`` and ``eval_sums``.
    """

    def __init__(self, task: Task, env: Processes, precision: Precision, state: dict | None, run_dir: Path,
                 on_step: Callable[[int, float], None] | None = None):
        self.task, self.env, self.precision, self.run_dir, self.on_step = task, env, precision, run_dir, on_step
        self.model = task.model
        self.say = tqdm.write if env.main else (lambda *a, **k: None)
        self._plan(task.config)
        self.step, self.evals, self.losses = 0, [], []
        self._running = [0.0, 0]  # sum and count of the step losses since the last evaluation
        self.source = ExampleSource(task.train_set, self.config.seed if task.shuffle else None)
        self._pending = ["evaluate"] if task.eval_at_start else []  # the step's evaluation and epoch end, not done
        self._finished = False  # the task's final work (Task.finish) is done for this step
        self.in_place = bool(task.config.resume) and Path(task.config.resume).resolve() == run_dir.resolve()
        self._checkpoint = (Path(task.config.resume), state["step"]) if state else None  # (where, step): latest
        self.clock = RunClock()
        fused = env.device.type in ("cuda", "cpu")
        self.optimizer = make_optimizer(self.model, self.config.lr, self.config.weight_decay, fused=fused)
        self.scheduler = make_scheduler(self.optimizer, self.config.lr, self.config.min_lr,
                                        self.config.warmup_steps, self.total_steps)
        if state is not None:
            self._restore(state)
        else:
            seed_all(self.config.seed + env.rank)  # the same weights everywhere, different dropout per process
        set_recompute(self.model, self.config.recompute)
        self.fwd_model = torch.compile(self.model) if self.config.compile else self.model
        self.train_model = self.fwd_model
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.fwd_model, device_ids=ids)
        self.model.train()

    def _plan(self, cfg: RunConfig) -> None:
        """How many examples make a step, how many steps an epoch and the run; the schedule's ends."""
        self.per_micro = cfg.batch_size * self.env.world  # examples per micro-step, all processes together
        self.per_step = self.task.examples_per_step or self.per_micro
        if self.per_step % self.per_micro:
            raise ValueError(f"{self.per_step} examples per optimizer step is not a multiple of the "
                             f"{cfg.batch_size} per batch x {self.env.world} process(es) = {self.per_micro} of a "
                             f"micro-step: change the batch size or the examples per step")
        self.accum = self.per_step // self.per_micro
        n = len(self.task.train_set)
        self.steps_per_epoch = n // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {n} examples, fewer than one optimizer step needs "
                             f"({cfg.batch_size} per batch x {self.env.world} process(es) x {self.accum} "
                             f"accumulation step(s) = {self.per_step}): lower the batch size or the examples per "
                             f"step, or give more data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if cfg.warmup_steps and cfg.warmup_steps >= self.total_steps and not cfg.resume:
            raise ValueError(f"--warmup-steps {cfg.warmup_steps} is not shorter than the run ({self.total_steps} "
                             f"steps): the learning rate would never reach --lr {cfg.lr:g}; use fewer warm-up steps")
        warmup = cfg.warmup_steps
        if warmup is None:
            warmup = max(1, round(cfg.WARMUP_SHARE * self.total_steps)) if cfg.WARMUP_SHARE else 0
        min_lr = cfg.lr * cfg.MIN_LR_SHARE if cfg.min_lr is None else cfg.min_lr
        self.config = replace(cfg, warmup_steps=warmup, min_lr=min_lr)  # as resolved: what a resume continues

    def _restore(self, state: dict) -> None:
        if state["examples_per_step"] != self.per_step:
            raise ValueError(f"cannot resume {self.config.resume} with {self.env.world} process(es) of batch "
                             f"{self.config.batch_size}: the run took {state['examples_per_step']} examples per "
                             f"optimizer step, and micro-steps of {self.per_micro} do not add up to that; resume "
                             f"with the number of processes it was saved with ({state['world_size']})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step, self._running, self._pending = state["step"], list(state["running"]), state.get("pending", [])
        self.source.load_state_dict(state["data"], self.env.rank)
        if state["world_size"] == self.env.world:
            set_rng_state(state["rng"][self.env.rank])
        else:
            seed_all(self.config.seed + self.env.rank + self.step)
            self.say(f"note: the run was saved with {state['world_size']} process(es), not {self.env.world}: the "
                     f"data order continues exactly, the dropout masks do not")
        log = RunLog(Path(self.config.resume) / LOG_FILE).read(self.step)
        self.evals = [r for r in log if r.get("event") == "eval"]
        self._finished = {"event": "finished", "step": self.step} in log

    # ---- what tasks use

    @property
    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def elapsed(self) -> float:
        """Seconds since this call started training."""
        return time.time() - self.t_start

    def running_loss(self) -> float:
        """The mean training loss of the steps since the last evaluation (nan if none)."""
        total, n = self._running
        return total / n if n else float("nan")

    def eval_sums(self, dataset: Sequence, fn: Callable, width: int, whole: bool = False) -> list[float]:
        """Sum ``fn(model, batch)`` (``width`` numbers, e.g. a loss sum and a count) over the first
        ``eval_batches`` batches of ``dataset`` (all processes together; all of it when None or ``whole``),
        in eval mode and the run's precision, without touching the random generators. Returns the totals."""
        limit = len(dataset)
        if self.config.eval_batches is not None and not whole:
            limit = min(limit, self.config.eval_batches * self.per_micro)
        mine = range(self.env.rank, limit, self.env.world)  # this process's share
        totals = torch.zeros(width, dtype=torch.float64, device=self.env.device)
        model, bs = self.fwd_model, self.config.batch_size
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), rng_preserved():
                for i in range(0, len(mine), bs):
                    batch = to_device(self.task.collate([dataset[j] for j in mine[i:i + bs]]), self.env.device)
                    with self.precision.autocast():
                        sums = fn(model, batch)
                    totals += torch.stack([torch.as_tensor(s, dtype=torch.float64, device=totals.device)
                                           for s in sums])
        finally:
            model.train(was_training)
        return self.env.sum(totals.tolist())

    def log_record(self, record: dict) -> None:
        """Add a record (a sample, say) to the run's log.jsonl (first process only)."""
        if self.env.main:
            self.log.append(record)

    # ---- the run

    def fit(self) -> RunResult:
        for line in self.task.describe():
            self.say(line)
        self._announce()
        if self.step >= self.total_steps and self._finished:
            self.say(f"{self.config.resume} has already trained {self.step} steps ({self.epoch:g} epochs): raise "
                     f"--epochs or --max-steps to train more")
            return self._result({})
        claim = claim_run_dir(self.run_dir, not self.in_place, self.task.name) if self.env.main else None
        with claim or contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> RunResult:
        """Train (the pending work of the last step first), save, then the task's final work."""
        self._open_run_dir()
        self.t_start = time.time()
        with StopOnSignal() as stop, tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                                          dynamic_ncols=True, disable=not self.env.main) as bar:
            stopped = self._loop(stop, bar)
        if stopped:
            self.say(f"stopped at step {self.step}; checkpoint saved in {self.run_dir}. Continue with --resume "
                     f"{self.run_dir}")
            raise KeyboardInterrupt(f"training stopped at step {self.step}; checkpoint in {self.run_dir}")
        self._save()
        try:
            final = self.task.finish(self) or {}
        except KeyboardInterrupt:
            self.say(f"stopped after the last step's checkpoint, in the run's final work: --resume {self.run_dir} "
                     f"does that work again")
            raise
        self.log_record({"event": "finished", "step": self.step})
        return self._result(final)

    def _announce(self) -> None:
        c = self.config
        lr = f"lr {c.lr:g}" + (f" after {c.warmup_steps} warm-up steps" if c.warmup_steps else "")
        lr += f", cosine down to {c.min_lr:g}" if c.min_lr != c.lr else " (constant)"
        self.say(f"schedule: {self.total_steps} steps ({self.steps_per_epoch} per epoch; {self.per_step} examples "
                 f"per step = {c.batch_size} per batch x {self.accum} accumulation x {self.env.world} process(es)), "
                 f"{lr}; {self.precision.name} on {self.env.device}; run directory {self.run_dir}"
                 + (f" (resumed at step {self.step})" if self.step else ""))

    def _open_run_dir(self) -> None:
        """Create the run directory (after every check passed); a resumed run's log, up to its checkpoint."""
        self.log = RunLog(self.run_dir / LOG_FILE)
        if not self.env.main:
            return
        if self.config.resume:
            self.log.rewrite(RunLog(Path(self.config.resume) / LOG_FILE).read(self.step))
        self.task.begin(self.run_dir)

    def _loop(self, stop: StopOnSignal, bar) -> bool:
        """Train to the last step; True if stopped by a signal (after saving). After each step come its
        evaluation and epoch end (when due), an estimate (once), and a checkpoint (when due). A signal during
        a step stops after it; during the work after it, at once: what was cut short is saved as pending and
        done first when the run resumes (see :class:`gpt.runtime.StopOnSignal`)."""
        c, spe = self.config, self.steps_per_epoch
        estimate_due = stepped = False
        while True:
            try:  # (processes must stop together: after a step and its work, so never at once under DDP)
                with stop.at_once(self.env.world == 1):
                    if not (stop.requested and self.env.world == 1):  # stopped in the step: its work waits for resume
                        self._do_pending()
                        if estimate_due:
                            self._say_estimate()
            except KeyboardInterrupt:
                if not stop.requested:
                    raise
            last = self.step >= self.total_steps
            if self.env.sum([float(stop.requested)])[0] > 0:  # every process stops at the same step
                self._save()
                return True
            if last:
                return False
            if stepped and (self.step % c.save_every == 0 if c.save_every else self.step % spe == 0):
                self._save()
            t0 = time.perf_counter()
            loss, lr = self._train_step()
            step_s = time.perf_counter() - t0
            self.step, stepped = self.step + 1, True
            self.losses.append(loss)
            self._running = [self._running[0] + loss, self._running[1] + 1]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", ex_s=f"{self.per_step / max(step_s, 1e-9):,.1f}")
            if self.on_step is not None:
                self.on_step(self.step, loss)
            estimate_due = self.clock.step(step_s)
            epoch_done = self.step % spe == 0 or self.step == self.total_steps
            self._pending = ["evaluate"] * self._evaluates_at(self.step) + ["epoch_end"] * epoch_done

    def _do_pending(self) -> None:
        """The evaluation and epoch end due after the last step, each taken off the list once done."""
        while self._pending:
            if self._pending[0] == "evaluate":
                self._evaluate()
            else:
                t0 = time.perf_counter()
                with rng_preserved():
                    self.task.epoch_end(self)
                self.clock.epoch_end(time.perf_counter() - t0)
            self._pending.pop(0)

    def _evaluates_at(self, step: int) -> bool:
        every = self.config.eval_every
        return step == self.total_steps or (step % every == 0 if every else step % self.steps_per_epoch == 0)

    def _say_estimate(self) -> None:
        """The time the rest of the run should take (see :mod:`gpt.clock`), unless nothing is left."""
        if self.step < self.total_steps:
            self.say(self.clock.estimate_rest(self.step, self.total_steps, self.config.eval_every or
                                              self.steps_per_epoch, self.steps_per_epoch, self.task.after_training))

    def _batches(self) -> list[tuple]:
        """This process's micro-batches of the next step (see the module's doc)."""
        items = self.source.next_step(self.accum, self.config.batch_size, self.env.world, self.env.rank)
        return [self.task.collate(examples) for examples in items]

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step; returns its loss (the mean over every loss term of every process) and lr."""
        batches = self._batches()
        counts = [self.task.count(b) for b in batches]
        total = self.env.sum([float(sum(counts))])[0]  # loss terms of the step, all processes together
        scaler, world = self.precision.scaler, self.env.world
        loss_sum = torch.zeros((), device=self.env.device)
        for m, (batch, n) in enumerate(zip(batches, counts)):
            last = m == len(batches) - 1
            sync = contextlib.nullcontext() if last or world == 1 else self.train_model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss = self.task.loss(self.train_model, to_device(batch, self.env.device))  # mean of n terms
                # DDP averages the processes' gradients: scaled so that the step's gradient is that of the mean
                # over all `total` terms, however they are split into micro-batches and processes
                scaled = loss * (n * world / total)
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach().float() * n
        lr = optimizer_step(self.optimizer, self.scheduler, scaler, self.model, self.config.grad_clip)
        step_loss = self.env.sum([loss_sum.item()])[0] / total
        if not math.isfinite(step_loss):
            kept = (f"the checkpoint of step {self._checkpoint[1]} in {self._checkpoint[0]} is untouched"
                    if self._checkpoint else f"no checkpoint had been saved, so nothing is kept in {self.run_dir}")
            raise RuntimeError(f"the training loss became {step_loss} at step {self.step + 1}: lower --lr (it is "
                               f"{self.config.lr:g}) or use --dtype bfloat16/float32; {kept}")
        return step_loss, lr

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        record = {"event": "eval", "step": self.step, "epoch": self.epoch, **self.task.evaluate(self),
                  "lr": self.scheduler.get_last_lr()[0], "time": round(self.elapsed(), 2)}
        self._running = [0.0, 0]
        self.evals.append(record)
        self.log_record(record)
        self.say(self.task.report(record))
        if self.clock.evaluation(time.perf_counter() - t0):  # the first estimate had no evaluation timed
            self._say_estimate()

    def _save(self) -> None:
        rng = self.env.gather(rng_state())  # every process's generators, so a resume continues them all
        data = self.env.gather(self.source.state_dict())  # ... and its position in the data
        if not self.env.main:
            return
        state = {"format": STATE_FORMAT, "task": self.task.name, "step": self.step, "world_size": self.env.world,
                 "examples_per_step": self.per_step, "train_config": asdict(self.config), "running": self._running,
                 "pending": list(self._pending),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None, "rng": rng,
                 "data": data}

        def write(staging: Path):
            self.task.save(self, staging)
            torch.save(state, staging / STATE_FILE)

        save_staged(self.run_dir, write, f"the checkpoint of step {self.step}",
                    tensor_bytes([state, self.model.state_dict()]))
        self._checkpoint = (self.run_dir, self.step)

    def _result(self, final: dict) -> RunResult:
        metrics = {k: v for k, v in (self.evals[-1] if self.evals else {}).items()
                   if k not in ("event", "time", "lr")}
        return RunResult(model=self.model, out_dir=self.run_dir if self.env.main else None, step=self.step,
                         examples_seen=self.step * self.per_step, losses=self.losses, evals=self.evals,
                         metrics={**metrics, **final})
