"""gpt.settings.plan_run: every setting of a run resolved once, from the config, the run being resumed, the
machine and what the task found, into a frozen Plan. Pure: these tests give it a made-up machine and task."""

import dataclasses

import pytest

from gpt.errors import UserError
from gpt.finetune import FinetuneConfig
from gpt.pretrain import TrainConfig
from gpt.settings import BETA2, Machine, Plan, plan_run


class FakeTask:
    """A task that holds ``n`` examples and found what ``found`` says (pretraining: a context length)."""

    default_epochs = 3

    def __init__(self, settings, n=100, examples_per_step=None, found=None):
        self.settings, self.train_set, self.examples_per_step = settings, range(n), examples_per_step
        self.found = {"context_length": 32} if found is None else found


def plan(cfg, saved=None, machine=None, **task) -> tuple[Plan, FakeTask]:
    return plan_run(cfg, saved, machine or Machine(), FakeTask, lambda settings: FakeTask(settings, **task))


def saved_run(cfg: TrainConfig, world=1, per_step=2) -> dict:
    """A trainer state as a run of ``cfg`` (its plan) would have saved it."""
    done, _ = plan(cfg, machine=Machine(world=world))
    return {"train_config": dataclasses.asdict(done.config), "examples_per_step": per_step, "world_size": world}


def test_a_new_run_gets_every_default_worked_out():
    p, task = plan(TrainConfig(batch_size=2, max_steps=40))
    c = p.config
    assert (c.warmup_steps, c.min_lr) == (2, pytest.approx(4e-5))  # 5% of 40 steps; a tenth of lr
    assert (c.epochs, c.beta2, c.kernels, c.parallel, c.context_length) == (3, BETA2, "auto", "none", 32)
    assert (p.examples_per_micro, p.examples_per_step, p.accumulation, p.steps_per_epoch, p.total_steps) == (
        2, 2, 1, 50, 40)
    assert task.settings.epochs == 3 and task.settings.warmup_steps is None  # the task saw what was known then
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.total_steps = 1


def test_finetuning_keeps_a_constant_rate_and_accumulation_makes_the_step():
    p, _ = plan(FinetuneConfig(batch_size=2, epochs=2, lr=1e-3), machine=Machine(world=2), examples_per_step=8,
                found={})
    assert (p.config.warmup_steps, p.config.min_lr) == (0, 1e-3)
    assert (p.examples_per_micro, p.accumulation, p.steps_per_epoch, p.total_steps) == (4, 2, 12, 24)
    with pytest.raises(UserError, match="6 examples per optimizer step is not a multiple of the 2 per batch x 2"):
        plan(FinetuneConfig(batch_size=2), machine=Machine(world=2), examples_per_step=6, found={})


def test_the_kernels_follow_the_option_else_the_machine():
    assert plan(TrainConfig(), machine=Machine(kernels="torch"))[0].config.kernels == "torch"  # $GPT_KERNELS
    assert plan(TrainConfig(kernels="reference"), machine=Machine(kernels="torch"))[0].config.kernels == "reference"


def test_the_parallel_mode_ddp_under_torchrun_none_alone_and_a_resume_keeps_its_own():
    assert plan(TrainConfig(), machine=Machine(world=2))[0].config.parallel == "ddp"
    assert plan(TrainConfig(parallel="fsdp"), machine=Machine(world=2))[0].config.parallel == "fsdp"
    with pytest.raises(UserError, match="--parallel fsdp is for several processes: start the run with torchrun"):
        plan(TrainConfig(parallel="fsdp"))
    sharded = saved_run(TrainConfig(parallel="fsdp", batch_size=1), world=2)
    resume = TrainConfig(resume="run", batch_size=1)
    for world, given, mode in [(2, None, "fsdp"), (1, None, "none"), (2, "ddp", "ddp")]:  # as it was; alone; told
        p, _ = plan(dataclasses.replace(resume, parallel=given), sharded, Machine(world=world), examples_per_step=2)
        assert (p.config.parallel, p.accumulation) == (mode, 3 - world)


def test_a_resume_keeps_its_run_s_settings_and_refuses_to_contradict_them():
    saved = saved_run(TrainConfig(batch_size=2, max_steps=40, beta2=0.95, lr=1e-3))
    p, _ = plan(TrainConfig(resume="run", max_steps=80), saved)
    assert (p.config.lr, p.config.beta2, p.config.warmup_steps, p.total_steps) == (1e-3, 0.95, 2, 80)  # warm-up kept
    with pytest.raises(UserError, match="cannot resume run with --beta2 0.99: that run was trained with --beta2 0.95"):
        plan(TrainConfig(resume="run", beta2=0.99), saved)
    with pytest.raises(UserError, match="the run took 2 examples per optimizer step"):
        plan(TrainConfig(resume="run"), saved, Machine(world=4))  # 4 processes of batch 2 make 8
