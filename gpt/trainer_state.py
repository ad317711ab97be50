"""The trainer state: what a resume needs besides the model's own files. This module alone writes it,
reads it and puts it back into a run, and knows which directories hold a run.

A checkpoint (one step's, staged whole: :func:`gpt.rundir.save_staged`) is the task's model files
(``config.json`` + ``model.safetensors``, or a finetuning run's files: always whole, whatever the
processes held) and:

    trainer_state.pt   the task, the step, the settings as resolved (``train_config``: what a resume continues
                       with), the number of processes and examples per step, every process's position in the data
                       and random generators, the running loss, the step's pending work, the schedule, the
                       gradient scaler, and the optimizer's state by parameter name (``optimizer``)
    optimizer/         instead of ``optimizer``, for a sharded run (``--parallel fsdp``): every process's shard
                       of the AdamW moments, written by ``torch.distributed.checkpoint`` (DCP)

``trainer_state.pt`` is read with ``torch.load(weights_only=True)``: plain containers and tensors, never
code. The optimizer's state is keyed by parameter name (``torch.distributed.checkpoint.state_dict``), so a
run saved whole resumes sharded and a sharded one whole or at another number of processes (DCP reshards
as it loads). Under torchrun, every process takes part in a save; the first writes the files (a sharded
run's processes each write their shard too, so their run directory must be on a disk they share).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .rundir import (
    MANIFEST,
    STAGING_DIR,
    create_run_dir,
    discard_run_dir,
    hold_run_dir,
    need,
    recover_staged,
    save_staged,
    tensor_bytes,
)
from .runtime import rng_state, seed_all, set_rng_state
from .weights import CheckpointError

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = "gpt-triton-trainer-4"  # 4: the optimizer's state by parameter name, or sharded in optimizer/
OPTIMIZER_DIR = "optimizer"  # a sharded run's optimizer state (DCP)


# ------------------------------------------------------------------------------------------ reading


def run_to_resume(run_dir) -> Path:
    """``run_dir`` checked to be a directory (what ``--resume`` must name)."""
    return need(run_dir, "directory", "--resume", "give the run directory that a training command wrote")


def finish_cut_save(run_dir) -> None:
    """Finish (or drop) a checkpoint save that a crash cut short, before the run is read."""
    if recover_staged(run_to_resume(run_dir)):
        print(f"note: {run_dir}: finished putting in place the checkpoint a crash had cut short")


def read(run_dir, task: str) -> dict:
    """The trainer state of a run directory, with clear errors for what can be wrong with it (no state,
    a truncated or foreign file, a run of another ``task``)."""
    run_dir = run_to_resume(run_dir)
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
    if state.get("task") != task:
        raise UserError(f"cannot resume {run_dir} as {task}: it holds a {state.get('task')} run")
    return state


def task_of(directory) -> str | None:
    """The task ("pretraining", ...) of the run in ``directory``, None if it holds none (or an unreadable
    one). Memory-mapped: only the small record is read, not the optimizer's tensors."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("task") or "training"
    except Exception:  # a truncated or foreign file: a run of no known task
        return "training"


def holds_run(directory) -> bool:
    """Whether ``directory`` holds a training run's checkpoint (or a committed save of one)."""
    directory = Path(directory)
    return (directory / STATE_FILE).exists() or (directory / STAGING_DIR / MANIFEST).exists()


# ------------------------------------------------------------------------------------------ run directories


def check_new_run_dir(path, option: str = "--out", task: str | None = None) -> Path:
    """Refuse ``path`` as the directory of a new run unless it is absent or empty; creates nothing. ``task``:
    the kind of run the command makes (``--resume`` is suggested for a run of that kind only)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a directory: give a new directory for the run")
    entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
    if not entries:
        return path
    held = task_of(path)
    if held:
        a = "an" if held[0] in "aeiou" else "a"
        if held == task:
            raise UserError(f"{path} already holds {a} {task} run: continue it with --resume {path}, or give "
                            f"another {option}")
        raise UserError(f"{path} already holds {a} {held} run: give another {option}, a new or empty directory")
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise UserError(f"{path} is not empty (it holds {shown}): writing there could overwrite those files; "
                    f"give a new or empty directory with {option}")


@contextlib.contextmanager
def claim_run_dir(path, new: bool, task: str | None = None):
    """Create the run directory if needed and hold it (:func:`gpt.rundir.hold_run_dir`) for the block. A
    ``new`` run's directory is checked again once held: it must still be empty (another run may have
    started there since the first check, and ended). If the block fails before a checkpoint is there,
    what it wrote is removed, and the directory too if this created it: nothing half-made blocks giving
    it again."""
    path = Path(path)
    created = not path.exists()
    if created:
        create_run_dir(path)
    with hold_run_dir(path):
        if new:
            check_new_run_dir(path, task=task)
        if not created:  # checked for writing only once held: a command refused changes nothing
            create_run_dir(path)
        try:
            yield path
        except BaseException:
            if new and not holds_run(path):
                discard_run_dir(path, created)
            raise


# ------------------------------------------------------------------------------------------ saving


def save(run, model: nn.Module | None, model_files: Callable[[Path], object]) -> None:
    """Save the checkpoint of ``run`` (a :class:`gpt.engine.Trainer`) at its step, into its run directory.
    Every process calls this; the first writes ``model_files(staging)`` (the task's files of ``model``, the
    whole model) and the state."""
    env = run.env
    rng = env.gather(rng_state())  # every process's generators, so a resume continues them all
    data = env.gather(run.source.state_dict())  # ... and its position in the data
    # the optimizer's state (none before the first step: a resume then starts it afresh), whole or in shards
    shards = run.config.parallel == "fsdp" and bool(run.optimizer.state)
    optimizer = None
    if shards:
        _save_shards(run)
    elif run.optimizer.state and env.main:
        optimizer = _optimizer_state(run.model, run.optimizer)
    if env.main:
        state = {"format": STATE_FORMAT, "task": run.task.name, "step": run.step, "world_size": env.world,
                 "examples_per_step": run.plan.examples_per_step, "train_config": asdict(run.config),
                 "running": list(run.running), "pending": list(run.pending), "optimizer": optimizer,
                 "optimizer_dir": OPTIMIZER_DIR if shards else None,
                 "scheduler": run.scheduler.state_dict(),
                 "scaler": run.precision.scaler.state_dict() if run.precision.scaler else None, "rng": rng,
                 "data": data}

        def write(staging: Path):
            model_files(staging)
            torch.save(state, staging / STATE_FILE)

        save_staged(run.run_dir, write, f"the checkpoint of step {run.step}", tensor_bytes([state, model.state_dict()]),
                    fresh=not shards)
        if not shards:
            shutil.rmtree(run.run_dir / OPTIMIZER_DIR, ignore_errors=True)  # a sharded run's, resumed whole
    env.barrier()


def _optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def _save_shards(run) -> None:
    """Every process writes its shard of the optimizer state into the staging directory (emptied first)."""
    import torch.distributed.checkpoint as dcp

    staging = run.run_dir / STAGING_DIR
    if run.env.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    run.env.barrier()
    try:
        dcp.save({"optimizer": _optimizer_state(run.model, run.optimizer)}, checkpoint_id=staging / OPTIMIZER_DIR)
    except dcp.api.CheckpointException as e:
        if run.env.main:
            shutil.rmtree(staging, ignore_errors=True)
        raise OSError(f"could not save the optimizer's shards of step {run.step} in {run.run_dir} ({e}); the "
                      f"previous checkpoint there is intact. Free some disk space or fix the permissions, then "
                      f"continue with --resume {run.run_dir}") from None


# ------------------------------------------------------------------------------------------ resuming


def restore(run, saved: dict) -> None:
    """Put the trainer state ``saved`` (of ``run.config.resume``) back into ``run``, a
    :class:`gpt.engine.Trainer` whose optimizer, schedule and data source are made (and its model sharded)."""
    _load_optimizer(run, saved)
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.precision.scaler is not None and saved.get("scaler"):
        run.precision.scaler.load_state_dict(saved["scaler"])
    run.step, run.running, run.pending = saved["step"], list(saved["running"]), list(saved["pending"])
    run.source.load_state_dict(saved["data"], run.env.rank)
    if saved["world_size"] == run.env.world:
        set_rng_state(saved["rng"][run.env.rank])
    else:
        seed_all(run.config.seed + run.env.rank + run.step)
        run.say(f"note: the run was saved with {saved['world_size']} process(es), not {run.env.world}: the data "
                f"order continues exactly, the dropout masks do not")


def _load_optimizer(run, saved: dict) -> None:
    """The optimizer's state, saved whole or sharded, into this run's optimizer, whole or sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if saved["optimizer"] is not None:  # whole: every process shards it as its model is sharded
        sharded = run.config.parallel == "fsdp"
        set_optimizer_state_dict(run.model, run.optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=sharded))
    elif saved["optimizer_dir"]:
        import torch.distributed.checkpoint as dcp

        state = {"optimizer": get_optimizer_state_dict(run.model, run.optimizer)}  # the shapes to fill
        path = Path(run.config.resume) / saved["optimizer_dir"]
        if not path.is_dir():
            raise CheckpointError(f"{path} is missing: the checkpoint's optimizer state is gone, and the run "
                                  f"cannot be resumed exactly; start a new run from its weights with --checkpoint "
                                  f"{run.config.resume}")
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
        set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"])
