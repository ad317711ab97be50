"""What every training job shares: its common settings (:class:`RunConfig`) and how a run starts
(:func:`run`): check the settings, resolve a resume, build the task, hand it to the engine.

A job is a function taking a config dataclass (``gpt.pretrain.train(TrainConfig)``,
``gpt.classify.finetune_classifier(FinetuneConfig)``, ``gpt.instruct.finetune_instruct(FinetuneConfig)``);
the command line turns its options into that config and calls the job, nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .checks import flag
from .engine import STATE_FORMAT, RunConfig, RunResult, Task, Trainer
from .rundir import STATE_FILE, check_new_run_dir, fresh_run_dir, hold_run_dir, need, recover_staged
from .runtime import Precision, Processes, check_backend, seed_all
from .weights import CheckpointError


def run(cfg: RunConfig, task_cls: type[Task], *, defaults: dict | None = None,
        on_step: Callable[[int, float], None] | None = None) -> RunResult:
    """Check ``cfg``, resolve a resume, then build the task (``task_cls(cfg, env, state)``) and train it.

    Every setting is checked, the data read and the model built before the run directory is created, so a
    bad setting leaves nothing behind. A run being resumed is held (:func:`gpt.rundir.hold_run_dir`) before
    it is read, and the run directory from its creation to the end. ``defaults`` fill settings left None
    after a resume is resolved (a job's own defaults, e.g. the number of epochs). ``on_step(step, loss)``
    runs after every step.
    """
    cfg.check()
    from gpt_kernels.backend import ENV_VAR, get_backend

    # the kernels: --kernels, else $GPT_KERNELS (checked here), else auto; the rule of every command. A resume
    # takes this machine's setting too (it is in RESUME_MAY_CHANGE, and never left None)
    backend = cfg.kernels or get_backend()
    kernels = f"--kernels {backend}" if cfg.kernels else f"{ENV_VAR}={backend}"  # (named so in errors)
    cfg = dataclasses.replace(_plain_paths(cfg), kernels=backend)
    env = Processes(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            state = None
            if cfg.resume:
                if env.main:
                    held.enter_context(hold_run_dir(_check_run_to_resume(Path(cfg.resume))))
                    recover_staged_save(cfg.resume)
                env.barrier()
                state = load_trainer_state(cfg.resume)
                if state.get("task") != task_cls.name:
                    raise ValueError(f"cannot resume {cfg.resume} as {task_cls.name}: it holds a "
                                     f"{state.get('task')} run")
                cfg = resolve_resume(cfg, state)
            cfg = dataclasses.replace(cfg, **{k: v for k, v in (defaults or {}).items() if getattr(cfg, k) is None})
            precision = Precision(env.device, cfg.dtype)
            check_backend(cfg.kernels, env.device, kernels)
            run_dir = Path(cfg.out) if cfg.out else fresh_run_dir(task_cls.run_prefix)
            in_place = bool(cfg.resume) and run_dir.resolve() == Path(cfg.resume).resolve()
            if env.main and not in_place:
                check_new_run_dir(run_dir, task=task_cls.name)
            seed_all(cfg.seed)  # the same initial weights in every process
            task = task_cls(cfg, env, state)
            return Trainer(task, env, precision, state, run_dir, on_step).fit()
    finally:
        env.close()


def _plain_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its paths as text (a checkpoint records the settings as plain values) and the data's
    absolute, so that a resume from another working directory finds the same data."""
    paths = {f.name: os.fspath(v) for f in dataclasses.fields(cfg) if isinstance(v := getattr(cfg, f.name),
                                                                                os.PathLike)}
    cfg = dataclasses.replace(cfg, **paths)
    data = getattr(cfg, "data", None)
    return dataclasses.replace(cfg, data=str(Path(data).resolve())) if data else cfg


def load_trainer_state(run_dir) -> dict:
    """Read ``trainer_state.pt`` of a run directory, with clear errors for what can be wrong with it."""
    run_dir = Path(run_dir)
    _check_run_to_resume(run_dir)
    path = run_dir / STATE_FILE
    if not path.exists():
        hint = (f" It holds model weights only: start a new run from them with --checkpoint {run_dir}"
                if (run_dir / "config.json").exists() else "")
        raise CheckpointError(f"cannot resume from {run_dir}: it has no {STATE_FILE}.{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or something the safe loader refuses
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}): the file is truncated "
                              f"or corrupt; no run can be resumed from it") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a trainer state written by this version of the trainer")
    return state


def _check_run_to_resume(run_dir: Path) -> Path:
    return need(run_dir, "directory", "--resume", "give the run directory that a training command wrote")


def recover_staged_save(run_dir) -> None:
    """Finish (or drop) a checkpoint save that a crash cut short, before the run is read."""
    _check_run_to_resume(Path(run_dir))
    if recover_staged(run_dir):
        print(f"note: {run_dir}: finished putting in place the checkpoint a crash had cut short")


def resolve_resume(cfg: RunConfig, state: dict) -> RunConfig:
    """The settings of a resumed run: the checkpoint's, with those in ``RESUME_MAY_CHANGE`` taken from
    ``cfg`` where it sets them. Any other setting given in ``cfg`` (not left at its default) that
    contradicts the checkpoint is an error rather than silently ignored."""
    cls = type(cfg)
    defaults, saved = cls(), state["train_config"]
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
            raise ValueError(f"cannot resume {cfg.resume} with {flag(f.name)} {mine!r}: that run was trained {was}. "
                             f"A resumed run keeps its settings: leave that option out, or start a new run from its "
                             f"weights with --checkpoint {cfg.resume}")
        else:
            merged[f.name] = theirs
    merged.update(resume=cfg.resume, out=cfg.out or cfg.resume)
    return cls(**merged)


