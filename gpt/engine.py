"""The training engine: one loop for pretraining and every finetuning task.

A *task* (:class:`Task`) says what differs between jobs: the model, the training examples and how a batch
is built from them, the loss, the evaluation, what a checkpoint's model files are, what happens at the
end. The engine owns the rest, the same for all: the learning-rate schedule, the optimizer rule
(:mod:`gpt.optim`), mixed precision, gradient accumulation and clipping, several processes under
torchrun (DDP or FSDP2: :mod:`gpt.parallel`), evaluations and checkpoints on a schedule, exact resume at
any step (:mod:`gpt.trainer_state`), Ctrl-C (finish the step, or cut the evaluation or sample after it
short; save; stop), a run directory held from start to end, the training's speed (tokens/s in the
progress bar and the log) and an estimate of the run's length once its first steps are timed
(:mod:`gpt.clock`). As nanoGPT's one loop serves every config and Lightning's ``Trainer`` every module.

The run's settings come resolved in a frozen :class:`gpt.settings.Plan` (``run.plan``, its settings
``run.config``); neither the engine nor a task changes them. The model has two handles: ``model``, the
raw model (sharded in place under FSDP), which evaluations, samples and saves use, and ``step_model``,
what a training step calls (compiled when asked, inside DDP under ddp).

**Which examples a step sees** (:mod:`gpt.sources`). Each epoch shuffles the training examples with a
generator seeded by (seed, epoch), or keeps their order (a task's ``shuffle = False``: prepared shards,
streamed). Optimizer step ``s`` of the epoch takes the next ``G`` examples of that order, where
``G = batch_size * accumulation * processes``; micro-step ``m`` takes ``batch_size * processes`` of them
and process ``r`` its ``r``-th ``batch_size``. Examples left over at an epoch's end are skipped (as
``drop_last``). The loss of a step is the mean over all its loss terms (tokens, or examples) on every
process, however they are split: one process with batch 8, two with batch 4, or one with batch 2 and 4
accumulation steps follow the same curve (up to float rounding), under DDP or FSDP alike.

**Exact resume.** A checkpoint is taken between two steps and holds everything the later steps depend
on: weights, optimizer, schedule, gradient scaler, the step, every process's position in the data and
its random generators (CPU and GPU: dropout masks and the attention kernels' dropout seeds), the running
loss since the last evaluation, and the step's evaluation or sample if Ctrl-C left it undone (a resume
does it first). Evaluations and samples run with the generators saved and put back
(:func:`gpt.runtime.rng_preserved`), so they never shift the training's random streams. A run stopped
at any step and resumed ends bit-identical to one that was never stopped (tested for every task, and
for FSDP); resumed with another number of processes, it continues with the same data and schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import trainer_state
from .clock import RunClock, Throughput
from .errors import UserError
from .flops import device_peak, flops_per_token
from .model import set_recompute
from .optim import make_optimizer, make_scheduler, optimizer_step
from .parallel import Parallel
from .rundir import LOG_FILE, RunLog
from .runtime import Precision, Processes, StopOnSignal, rng_preserved, seed_all, to_device
from .settings import Plan
from .sources import ExampleSource


@dataclass
class RunResult:
    model: nn.Module  # the trained model (not wrapped in DDP or torch.compile; sharded in place under FSDP)
    out_dir: Path | None  # the run directory (None on processes other than the first)
    step: int  # optimizer steps done in total (including those before a resume)
    examples_seen: int  # training examples (windows, texts, records) the steps took, over all processes
    losses: list[float] = field(default_factory=list)  # the training loss of every step this call ran
    evals: list[dict] = field(default_factory=list)  # every evaluation of the run (also in log.jsonl)
    metrics: dict = field(default_factory=dict)  # the last evaluation's metrics and the task's final ones


class Task:
    """What a training job says; the engine does the rest. ``__init__(settings, env, saved)`` loads the
    model and the data under ``settings`` (the run's settings as far as they are known before its model
    and data are: :func:`gpt.settings.plan_run`) and sets the attributes; after that a task reads the run's
    settings from ``run.config``."""

    name: str  # recorded in the checkpoint: a run resumes only as the task it was
    run_prefix: str = ""  # a new run's default directory is runs/<prefix>-<date-time>
    default_epochs: int  # the run's length when neither epochs nor max_steps is given
    model: nn.Module  # on the device, with its trainable parameters marked (requires_grad)
    train_set: Sequence  # the training examples: the engine shuffles and deals them out
    found: dict  # the settings the task worked out from its model and data (context length...): the plan's
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

    def tokens(self, batch) -> int:
        """How many tokens the model reads for the batch (its speed is counted in these): the input ids'."""
        return batch[0].numel()

    # whether the loss runs the vocabulary head (its FLOPs are the model's: :func:`gpt.flops.flops_per_token`)
    head_flops = True

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

    def save(self, run: Trainer, model: nn.Module, directory: Path) -> None:
        """Write the model's files of a checkpoint into ``directory`` (first process only), from ``model``:
        the trained model, whole (under FSDP a copy gathered on this process's CPU)."""
        raise NotImplementedError

    def finish(self, run: Trainer) -> dict:
        """After the last step's checkpoint: final work (a test set) and its metrics."""
        return {}


# ------------------------------------------------------------------------------------------ the loop


class Trainer:
    """One run of a task as its plan says: the steps, the evaluations and checkpoints (see the module's doc).

    What a task may use: ``config`` (the run's settings), ``model`` (the raw model), ``step``, ``epoch``
    (fractional), ``steps_per_epoch``, ``total_steps``, ``per_step`` (examples per step), ``env`` (rank,
    world size), ``precision``, ``run_dir``, ``evals``, ``say``, ``log_record``, ``elapsed``,
    ``running_loss`` and ``eval_sums``.
    """

    def __init__(self, task: Task, plan: Plan, env: Processes, precision: Precision, saved: dict | None,
                 run_dir: Path, on_step: Callable[[int, float], None] | None = None):
        c = self.config = plan.config
        self.task, self.plan, self.env, self.precision, self.run_dir = task, plan, env, precision, run_dir
        self.on_step, self.model = on_step, task.model
        self.say = tqdm.write if env.main else (lambda *a, **k: None)
        self.step, self.evals, self.losses = 0, [], []
        self.running = [0.0, 0]  # sum and count of the step losses since the last evaluation
        self.pending = ["evaluate"] if task.eval_at_start else []  # the step's evaluation and epoch end, not done
        self.finished = False  # the task's final work (Task.finish) is done for this step
        self.source = ExampleSource(task.train_set, c.seed if task.shuffle else None)
        self.in_place = bool(c.resume) and Path(c.resume).resolve() == run_dir.resolve()
        peak = device_peak(env.device, precision.name)  # None on a CPU: FLOP/s without an MFU
        self.clock, self.speed = RunClock(), Throughput(peak.flops if peak else None, env.world)
        # the model spread over the processes, then the optimizer over what each holds, and the schedule
        self.parallel = Parallel(c.parallel, env)
        self.parallel.shard(self.model)
        self.optimizer = make_optimizer(self.model, c.lr, c.weight_decay, fused=env.device.type in ("cuda", "cpu"),
                                        betas=(0.9, c.beta2))
        self.scheduler = make_scheduler(self.optimizer, c.lr, c.min_lr, c.warmup_steps, plan.total_steps)
        if saved is not None:
            trainer_state.restore(self, saved)
            log = RunLog(Path(c.resume) / LOG_FILE).read(self.step)
            self.evals = [r for r in log if r.get("event") == "eval"]
            self.finished = {"event": "finished", "step": self.step} in log
        else:
            seed_all(c.seed + env.rank)  # the same weights everywhere, different dropout per process
        self.checkpoint = (Path(c.resume), saved["step"]) if saved else None  # (where, step): the latest
        set_recompute(self.model, c.recompute)
        self.step_model = self.parallel.step_model(self.model, c.compile)
        self.model.train()

    # ---- what tasks use

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def per_step(self) -> int:
        return self.plan.examples_per_step

    @property
    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def elapsed(self) -> float:
        """Seconds since this call started training."""
        return time.time() - self.t_start

    def running_loss(self) -> float:
        """The mean training loss of the steps since the last evaluation (nan if none)."""
        total, n = self.running
        return total / n if n else float("nan")

    def eval_sums(self, dataset: Sequence, fn: Callable, width: int, whole: bool = False) -> list[float]:
        """Sum ``fn(model, batch)`` (``width`` numbers, e.g. a loss sum and a count) over the first
        ``eval_batches`` batches of ``dataset`` (all processes together; all of it when None or ``whole``),
        in eval mode and the run's precision, without touching the random generators. Returns the totals."""
        limit = len(dataset)
        if self.config.eval_batches is not None and not whole:
            limit = min(limit, self.config.eval_batches * self.plan.examples_per_micro)
        mine = range(self.env.rank, limit, self.env.world)  # this process's share
        totals = torch.zeros(width, dtype=torch.float64, device=self.env.device)
        model, bs = self.model, self.config.batch_size
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
        if self.step >= self.total_steps and self.finished:
            self.say(f"{self.config.resume} has already trained {self.step} steps ({self.epoch:g} epochs): raise "
                     f"--epochs or --max-steps to train more")
            return self._result({})
        claim = (trainer_state.claim_run_dir(self.run_dir, not self.in_place, self.task.name) if self.env.main
                 else None)
        with claim or contextlib.nullcontext():
            self.log = RunLog(self.run_dir / LOG_FILE)
            if self.env.main and self.config.resume:  # the resumed run's log, up to its checkpoint
                self.log.rewrite(RunLog(Path(self.config.resume) / LOG_FILE).read(self.step))
            return self._fit()

    def _fit(self) -> RunResult:
        """Train (the pending work of the last step first), save, then the task's final work."""
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
            with self.parallel.whole(self.model):
                final = self.task.finish(self) or {}
        except KeyboardInterrupt:
            self.say(f"stopped after the last step's checkpoint, in the run's final work: --resume {self.run_dir} "
                     f"does that work again")
            raise
        self.log_record({"event": "finished", "step": self.step})
        return self._result(final)

    def _announce(self) -> None:
        c, p = self.config, self.plan
        lr = f"lr {c.lr:g}" + (f" after {c.warmup_steps} warm-up steps" if c.warmup_steps else "")
        lr += f", cosine down to {c.min_lr:g}" if c.min_lr != c.lr else " (constant)"
        processes = f"{self.env.world} process(es)" + (f" ({c.parallel})" if self.env.world > 1 else "")
        self.say(f"schedule: {p.total_steps} steps ({p.steps_per_epoch} per epoch; {p.examples_per_step} examples "
                 f"per step = {c.batch_size} per batch x {p.accumulation} accumulation x {processes}), {lr}; "
                 f"{self.precision.name} on {self.env.device}; run directory {self.run_dir}"
                 + (f" (resumed at step {self.step})" if self.step else ""))

    def _loop(self, stop: StopOnSignal, bar) -> bool:
        """Train to the last step; True if stopped by a signal (after saving). Each turn: the last step's
        evaluation and epoch end (when due), an estimate (once), a checkpoint (when due), the next step. A
        signal during a step stops after it; during the work after it, at once: what was cut short is saved
        as pending and done first when the run resumes (see :class:`gpt.runtime.StopOnSignal`)."""
        c, spe = self.config, self.steps_per_epoch
        estimate_due = stepped = False
        while True:
            try:  # (processes must stop together: after a step and its work, so never at once with several)
                with stop.at_once(self.env.world == 1):
                    if not (stop.requested and self.env.world == 1):  # stopped in the step: its work waits
                        self._do_pending()
                        if estimate_due:
                            self._say_estimate()
            except KeyboardInterrupt:
                if not stop.requested:
                    raise
            if self.env.sum([float(stop.requested)])[0] > 0:  # every process stops at the same step
                self._save()
                return True
            if self.step >= self.total_steps:
                return False
            if stepped and (self.step % c.save_every == 0 if c.save_every else self.step % spe == 0):
                self._save()
            t0 = time.perf_counter()
            loss, lr, tokens, flops = self._train_step()
            step_s = time.perf_counter() - t0
            self.step, stepped = self.step + 1, True
            self.losses.append(loss)
            self.running = [self.running[0] + loss, self.running[1] + 1]
            speed = self.speed.step(tokens, self.per_step, step_s, flops)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **Throughput.postfix(speed))
            if self.on_step is not None:
                self.on_step(self.step, loss)
            estimate_due = self.clock.step(step_s)
            epoch_done = self.step % spe == 0 or self.step == self.total_steps
            self.pending = ["evaluate"] * self._evaluates_at(self.step) + ["epoch_end"] * epoch_done

    def _do_pending(self) -> None:
        """The evaluation and epoch end due after the last step, each taken off the list once done."""
        if not self.pending:
            return
        with self.parallel.whole(self.model):
            while self.pending:
                if self.pending[0] == "evaluate":
                    self._evaluate()
                else:
                    t0 = time.perf_counter()
                    with rng_preserved():
                        self.task.epoch_end(self)
                    self.clock.epoch_end(time.perf_counter() - t0)
                self.pending.pop(0)

    def _evaluates_at(self, step: int) -> bool:
        every = self.config.eval_every
        return step == self.total_steps or (step % every == 0 if every else step % self.steps_per_epoch == 0)

    def _say_estimate(self) -> None:
        """The time the rest of the run should take (see :mod:`gpt.clock`), unless nothing is left."""
        if self.step < self.total_steps:
            self.say(self.clock.estimate_rest(self.step, self.total_steps, self.config.eval_every or
                                              self.steps_per_epoch, self.steps_per_epoch, self.task.after_training))

    def _train_step(self) -> tuple[float, float, int, float]:
        """One optimizer step; returns its loss (the mean over every loss term of every process), its learning
        rate, and the tokens it read and its model FLOPs (:func:`gpt.flops.flops_per_token`), all processes'."""
        batches = [self.task.collate(examples) for examples in self.source.next_step(
            self.plan.accumulation, self.config.batch_size, self.env.world, self.env.rank)]
        counts = [self.task.count(b) for b in batches]
        flops = sum(b[0].numel() * flops_per_token(self.model.config, b[0].shape[-1], self.task.head_flops)
                    for b in batches)  # the input ids' (rows, length)
        total, tokens, flops = self.env.sum([float(sum(counts)), float(sum(self.task.tokens(b) for b in batches)),
                                             float(flops)])
        scaler, world = self.precision.scaler, self.env.world
        loss_sum = torch.zeros((), device=self.env.device)
        for m, (batch, n) in enumerate(zip(batches, counts)):
            with self.parallel.no_sync(self.step_model, last=m == len(batches) - 1):
                with self.precision.autocast():
                    loss = self.task.loss(self.step_model, to_device(batch, self.env.device))  # mean of n terms
                # DDP and FSDP average the processes' gradients: scaled so that the step's gradient is that of
                # the mean over all `total` terms, however they are split into micro-batches and processes
                scaled = loss * (n * world / total)
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach().float() * n
        lr = optimizer_step(self.optimizer, self.scheduler, scaler, self.model, self.config.grad_clip)
        step_loss = self.env.sum([loss_sum.item()])[0] / total
        if not math.isfinite(step_loss):
            kept = (f"the checkpoint of step {self.checkpoint[1]} in {self.checkpoint[0]} is untouched"
                    if self.checkpoint else f"no checkpoint had been saved, so nothing is kept in {self.run_dir}")
            raise UserError(f"the training loss became {step_loss} at step {self.step + 1}: lower --lr (it is "
                            f"{self.config.lr:g}) or use --dtype bfloat16/float32; {kept}")
        return step_loss, lr, int(tokens), flops

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        record = {"event": "eval", "step": self.step, "epoch": self.epoch, **self.task.evaluate(self),
                  "lr": self.scheduler.get_last_lr()[0], "time": round(self.elapsed(), 2)}
        speed = self.speed.since_last()
        if speed:  # the training's speed since the last evaluation
            record["speed"] = speed
        self.running = [0.0, 0]
        self.evals.append(record)
        self.log_record(record)
        self.say(self.task.report(record))
        if self.clock.evaluation(time.perf_counter() - t0):  # the first estimate had no evaluation timed
            self._say_estimate()

    def _save(self) -> None:
        """A checkpoint of this step (every process takes part; see :mod:`gpt.trainer_state`)."""
        model = self.parallel.full_model(self.model)
        trainer_state.save(self, model, lambda staging: self.task.save(self, model, staging))
        self.checkpoint = (self.run_dir, self.step)

    def _result(self, final: dict) -> RunResult:
        metrics = {k: v for k, v in (self.evals[-1] if self.evals else {}).items()
                   if k not in ("event", "time", "lr", "speed")}
        return RunResult(model=self.model, out_dir=self.run_dir if self.env.main else None, step=self.step,
                         examples_seen=self.step * self.per_step, losses=self.losses, evals=self.evals,
                         metrics={**metrics, **final})

