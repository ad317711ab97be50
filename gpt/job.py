"""How every training job runs (:func:`run`): check the settings, read the run to resume, plan the run
(its task's model and data loaded on the way), hand the task to the engine.

A job is a function taking a config dataclass (``gpt.pretrain.train(TrainConfig)``,
``gpt.classify.finetune_classifier(FinetuneConfig)``, ``gpt.instruct.finetune_instruct(FinetuneConfig)``);
the command line turns its options into that config and calls the job, nothing more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from gpt_kernels.backend import ENV_VAR

from . import trainer_state
from .engine import RunResult, Task, Trainer
from .errors import UserError
from .rundir import fresh_run_dir, hold_run_dir
from .runtime import Precision, Processes, check_backend, kernels_in_force, seed_all
from .settings import Machine, RunConfig, plan_run


def run(cfg: RunConfig, task_cls: type[Task], *, on_step: Callable[[int, float], None] | None = None) -> RunResult:
    """Train a task of ``task_cls`` as ``cfg`` says; ``on_step(step, loss)`` runs after every step.

    Every setting is checked, the data read and the model built before the run directory is created, so a
    bad setting leaves nothing behind. A run being resumed is held (:func:`gpt.rundir.hold_run_dir`) before
    it is read, and the run directory from its creation to the end.
    """
    cfg.check()
    env = Processes(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            saved = None
            if cfg.resume:
                if env.main:
                    held.enter_context(hold_run_dir(trainer_state.run_to_resume(cfg.resume)))
                    trainer_state.finish_cut_save(cfg.resume)
                env.barrier()
                saved = trainer_state.read(cfg.resume, task_cls.name)
            precision = None

            def open_task(settings: RunConfig) -> Task:
                """The checks that need this machine, then the task (its model and data)."""
                nonlocal precision
                kernels = f"--kernels {settings.kernels}" if cfg.kernels else f"{ENV_VAR}={settings.kernels}"
                check_backend(settings.kernels, env.device, kernels)  # (named as it was set, in errors)
                precision = Precision(env.device, settings.dtype)
                if precision.scaler is not None and settings.parallel == "fsdp":
                    raise UserError("--parallel fsdp does not take float16 (its gradient scaler would see only "
                                    "this process's shard): use --dtype bfloat16, or --parallel ddp")
                seed_all(settings.seed)  # the same initial weights in every process
                return task_cls(settings, env, saved)

            plan, task = plan_run(cfg, saved, Machine(world=env.world, kernels=kernels_in_force()), task_cls,
                                  open_task)
            out = plan.config.out
            run_dir = Path(out) if out else fresh_run_dir(task_cls.run_prefix)
            if env.main and not (saved and run_dir.resolve() == Path(plan.config.resume).resolve()):
                trainer_state.check_new_run_dir(run_dir, task=task_cls.name)
            return Trainer(task, plan, env, precision, saved, run_dir, on_step).fit()
    finally:
        env.close()
