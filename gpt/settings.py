"""A run's settings and their one owner: what a user sets (:class:`RunConfig`) and everything the run
then follows (:class:`Plan`), worked out once by :func:`plan_run`.

As nanoGPT's train.py resolves every setting at its top and later code only reads them, every training
job (:func:`gpt.job.run`) asks :func:`plan_run` once and gets a frozen :class:`Plan`; the task and the
engine read it and change nothing. The settings are worked out in this order, each from the ones before:

1. a resumed run's settings: the checkpoint's, with those in ``RESUME_MAY_CHANGE`` taken from the config
   where it sets them (anything else the config sets that contradicts the checkpoint is refused);
2. the machine's: the kernel backend (``--kernels``, else ``$GPT_KERNELS``, else auto: the rule of every
   command, taken anew by a resume), the parallel mode (ddp under torchrun, none alone; a resume under
   torchrun keeps its run's), AdamW's beta2, the task's default number of epochs;
3. the task's: its model and data are loaded under those settings (``open_task``) and it says what it
   worked out from them (``Task.found``: the model's context length, the longest text, LoRA's rank...);
4. the steps: examples per micro-step and per optimizer step, gradient accumulation, steps per epoch and
   in the run, and the learning-rate schedule's ends (warm-up steps, ``min_lr``).

The plan's ``config`` is what a checkpoint records (:mod:`gpt.trainer_state`) and a resume continues.
Nothing here reads a file or the environment: the machine comes in as a :class:`Machine`, the resumed
run as its trainer state, the task through ``open_task``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .checks import check_run_settings, flag
from .errors import UserError
from .runtime import PARALLEL_MODES

BETA2 = 0.999  # AdamW's beta2 when none is given: PyTorch's default, which the book's runs use (GPT-2
# recipes, nanoGPT, llm.c and build-nanogpt use 0.95: give --beta2 0.95 for those)


@dataclass(frozen=True)
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
    min_lr: float | None = None  # where the cosine ends; None: lr * min_lr_share
    warmup_steps: int | None = None  # linear warm-up steps; None: warmup_share of the run's steps
    warmup_share: float = 0.05  # the warm-up when warmup_steps is None, as a share of the run (at least 1 step)
    min_lr_share: float = 0.1  # min_lr when None, as a share of lr
    weight_decay: float = 0.1  # AdamW's, on weights of 2 or more dimensions only (see gpt.optim)
    beta2: float | None = None  # AdamW's second-moment decay (beta1 is 0.9); None: BETA2
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
    parallel: str | None = None  # under torchrun: ddp (each process holds the whole model) or fsdp (FSDP2:
    # each holds a shard of every weight, gradient and AdamW moment); None: ddp, or the resumed run's mode

    # settings a resumed run may change; every other one comes from the checkpoint (another data set, batch
    # or schedule would make the resumed run something other than a continuation)
    RESUME_MAY_CHANGE: ClassVar[frozenset] = frozenset({
        "epochs", "max_steps", "out", "resume", "device", "dtype", "compile", "kernels", "eval_every",
        "eval_batches", "save_every", "parallel", "recompute"})

    def check(self) -> None:
        """Clear errors for settings that make no sense (before anything is loaded or written)."""
        check_run_settings(self)


@dataclass(frozen=True)
class Machine:
    """Where a run is planned to run: what :func:`plan_run` needs to know besides the settings."""

    world: int = 1  # processes training together (torchrun's WORLD_SIZE)
    kernels: str = "auto"  # the kernel backend this machine's commands run when not told: $GPT_KERNELS, or auto


@dataclass(frozen=True)
class Plan:
    """Every setting of a run, resolved (see the module's doc). Frozen: nothing changes it once made."""

    config: RunConfig  # every setting worked out: what the run follows, its checkpoints record, a resume continues
    world: int  # processes training together
    examples_per_micro: int  # examples of one micro-step, all processes together (batch_size x world)
    examples_per_step: int  # examples of one optimizer step, all processes together
    accumulation: int  # micro-steps per optimizer step
    steps_per_epoch: int  # optimizer steps in one pass over the training examples
    total_steps: int  # optimizer steps of the whole run (including those before a resume)


def configure(cls: type[RunConfig], cfg: RunConfig | None, settings: dict) -> RunConfig:
    """A job's config as its caller gave it: ``cfg`` (default: ``cls()``) with ``settings`` (keyword
    arguments: ``train(epochs=2)`` is ``train(TrainConfig(epochs=2))``). Nothing is resolved yet."""
    return dataclasses.replace(cfg or cls(), **settings)


def plan_run(cfg: RunConfig, saved: dict | None, machine: Machine, task_cls: type,
             open_task: Callable[[RunConfig], Any]) -> tuple[Plan, Any]:
    """The :class:`Plan` of a run of ``cfg`` (see the module's doc), and its task.

    ``saved``: the trainer state of the run being resumed (``cfg.resume``), None for a new run.
    ``task_cls``: the task's class (:class:`gpt.engine.Task`: its ``default_epochs``). ``open_task(settings)``:
    the task, its model and data loaded under the settings worked out so far; its ``found`` holds what
    it worked out from them, its ``examples_per_step`` how many examples make a step (None: one batch per
    process) and its ``train_set`` the training examples.
    """
    c = _plain_paths(dataclasses.replace(cfg, kernels=cfg.kernels or machine.kernels))
    if saved is not None:
        c = _resumed(c, saved["train_config"])
    parallel = _parallel_mode(cfg.parallel, saved, machine.world)
    c = dataclasses.replace(c, parallel=parallel, beta2=BETA2 if c.beta2 is None else c.beta2,
                            epochs=task_cls.default_epochs if c.epochs is None else c.epochs)
    task = open_task(c)
    c = dataclasses.replace(c, **task.found)

    per_micro = c.batch_size * machine.world
    per_step = task.examples_per_step or per_micro
    if saved is not None and (saved["examples_per_step"] != per_step or per_step % per_micro):
        raise UserError(f"cannot resume {c.resume} with {machine.world} process(es) of batch {c.batch_size}: the "
                        f"run took {saved['examples_per_step']} examples per optimizer step, and micro-steps of "
                        f"{per_micro} do not add up to that; resume with the number of processes it was saved "
                        f"with ({saved['world_size']})")
    if per_step % per_micro:
        raise UserError(f"{per_step} examples per optimizer step is not a multiple of the {c.batch_size} per batch "
                        f"x {machine.world} process(es) = {per_micro} of a micro-step: change the batch size or the "
                        f"examples per step")
    n = len(task.train_set)
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {n} examples, fewer than one optimizer step needs ({c.batch_size} "
                        f"per batch x {machine.world} process(es) x {per_step // per_micro} accumulation step(s) = "
                        f"{per_step}): lower the batch size or the examples per step, or give more data")
    total = c.max_steps or c.epochs * steps_per_epoch
    if c.warmup_steps and c.warmup_steps >= total and saved is None:
        raise UserError(f"--warmup-steps {c.warmup_steps} is not shorter than the run ({total} steps): the "
                        f"learning rate would never reach --lr {c.lr:g}; use fewer warm-up steps")
    warmup = c.warmup_steps
    if warmup is None:
        warmup = max(1, round(c.warmup_share * total)) if c.warmup_share else 0
    min_lr = c.lr * c.min_lr_share if c.min_lr is None else c.min_lr
    plan = Plan(config=dataclasses.replace(c, warmup_steps=warmup, min_lr=min_lr), world=machine.world,
                examples_per_micro=per_micro, examples_per_step=per_step, accumulation=per_step // per_micro,
                steps_per_epoch=steps_per_epoch, total_steps=total)
    return plan, task


def _plain_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its paths as text (a checkpoint records the settings as plain values) and the data's
    absolute, so that a resume from another working directory finds the same data."""
    paths = {f.name: os.fspath(v) for f in dataclasses.fields(cfg) if isinstance(v := getattr(cfg, f.name),
                                                                                os.PathLike)}
    data = paths.get("data", getattr(cfg, "data", None))
    if data:
        paths["data"] = str(Path(data).resolve())
    return dataclasses.replace(cfg, **paths)


def _resumed(cfg: RunConfig, saved: dict) -> RunConfig:
    """The settings of a resumed run: the checkpoint's (``saved``), with those in ``RESUME_MAY_CHANGE``
    taken from ``cfg`` where it sets them. Any other setting given in ``cfg`` (not left at its default) that
    contradicts the checkpoint is an error rather than silently ignored."""
    cls = type(cfg)
    defaults = cls()
    # the run's length is one choice: either setting given names it anew (--epochs 2 after --max-steps 3 runs
    # the two epochs), neither keeps the checkpoint's
    length = ("epochs", "max_steps")
    new_length = any(getattr(cfg, name) != getattr(defaults, name) for name in length)
    merged = {}
    for f in dataclasses.fields(cls):
        mine, default = getattr(cfg, f.name), getattr(defaults, f.name)
        theirs = saved.get(f.name, default)
        if f.name in length:
            merged[f.name] = mine if new_length else theirs
        elif f.name in cls.RESUME_MAY_CHANGE:
            merged[f.name] = mine if mine != default else theirs
        elif mine != default and mine != theirs:
            was = f"with {flag(f.name)} {theirs!r}" if theirs is not None else f"without {flag(f.name)}"
            raise UserError(f"cannot resume {cfg.resume} with {flag(f.name)} {mine!r}: that run was trained {was}. "
                            f"A resumed run keeps its settings: leave that option out, or start a new run from its "
                            f"weights with --checkpoint {cfg.resume}")
        else:
            merged[f.name] = theirs
    merged.update(resume=cfg.resume, out=cfg.out or cfg.resume)
    return cls(**merged)


def _parallel_mode(given: str | None, saved: dict | None, world: int) -> str:
    """"none" alone; under torchrun the mode given, else the resumed run's (if it ran under torchrun), else ddp."""
    if world == 1:
        if given is not None:
            raise UserError(f"--parallel {given} is for several processes: start the run with torchrun "
                            f"--nproc_per_node N (N >= 2), or leave the option out")
        return "none"
    if given is not None:
        return given
    was = saved and saved["train_config"].get("parallel")
    return was if was in PARALLEL_MODES else "ddp"
