"""What every training job shares: its common settings (:class:`RunConfig`) and how a run starts
(:func:`run`): check the settings, resolve a resume, build the task, hand it to the engine.

A job is a function taking a config dataclass (``gpt.pretrain.train(TrainConfig)``,
``gpt.classify.finetune_classifier(FinetuneConfig)``, ``gpt.instruct.finetune_instruct(FinetuneConfig)``);
the command line turns its options into that config and calls the job, nothing more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .engine import STATE_FORMAT, RunConfig, RunResult, Task, Trainer, flag
from .rundir import STATE_FILE, check_new_run_dir, fresh_run_dir, need, recover_staged
from .runtime import Precision, Processes, check_backend, seed_all
from .weights import CheckpointError


def run(cfg: RunConfig, task_cls: type[Task], *, defaults: dict | None = None,
        on_step: Callable[[int, float], None] | None = None) -> RunResult:
    """Check ``cfg``, resolve a resume, then build the task (``task_cls(cfg, env, state)``) and train it.

    Every setting is checked, the data read and the model built before the run directory is created, so a
    bad setting leaves nothing behind. ``defaults`` fill settings left None after a resume is resolved
    (a job's own defaults, e.g. the number of epochs). ``on_step(step, loss)`` runs after every step.
    """
    cfg.check()
    env = Processes(cfg.device)
    try:
        state = None
        if cfg.resume:
            if env.main:
                recover_staged_save(cfg.resume)
            env.barrier()
            state = load_trainer_state(cfg.resume)
            if state.get("task") != task_cls.name:
                raise ValueError(f"cannot resume {cfg.resume} as {task_cls.name}: it holds a {state.get('task')} "
                                 f"run")
            cfg = resolve_resume(cfg, state)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (defaults or {}).items() if getattr(cfg, k) is None})
        precision = Precision(env.device, cfg.dtype)
        check_backend(cfg.kernels, env.device)
        run_dir = Path(cfg.out) if cfg.out else fresh_run_dir(task_cls.run_prefix)
        in_place = bool(cfg.resume) and run_dir.resolve() == Path(cfg.resume).resolve()
        if env.main and not in_place:
            check_new_run_dir(run_dir)
        seed_all(cfg.seed)  # the same initial weights in every process
        task = task_cls(cfg, env, state)
        return Trainer(task, env, precision, state, run_dir, on_step).fit()
    finally:
        env.close()


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


def _check_run_to_resume(run_dir: Path) -> None:
    need(run_dir, "directory", "--resume", "give the run directory that a training command wrote")


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
            raise ValueError(f"cannot resume {cfg.resume} with {flag(f.name)} {mine!r}: that run was trained with "
                             f"{flag(f.name)} {theirs!r}. A resumed run keeps its settings: leave that option out, or "
                             f"start a new run from its weights with --checkpoint {cfg.resume}")
        else:
            merged[f.name] = theirs
    merged.update(resume=cfg.resume, out=cfg.out or cfg.resume)
    return cls(**merged)


