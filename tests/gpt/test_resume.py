"""Exact resume, for every task of the engine: a run stopped at any step and resumed ends bit-identical to
one never stopped, with dropout on.

Each task trains two epochs on a slice of its data, evaluating every few steps. It is stopped either by
SIGINT (what Ctrl-C sends: the step finishes, a checkpoint is saved) or by a crash right after a periodic
checkpoint (the steps after that checkpoint are lost and redone); the stops fall at steps that are neither
epoch nor evaluation boundaries, so the resumed run starts mid-epoch, between evaluations.
"""

import json
import signal
from pathlib import Path

import pytest
import torch

from gpt.classify import finetune_classifier
from gpt.data import default_text_path
from gpt.finetune import FinetuneConfig
from gpt.instruct import finetune_instruct
from gpt.pretrain import TrainConfig, train
from gpt.trainer_state import STATE_FILE

# job, settings, steps per epoch (2 epochs), eval_every, the SIGINT step, (periodic save, crash) steps
TASKS = {
    "pretraining": (train, dict(preset="tiny", context_length=32, batch_size=2, eval_batches=1, sample_tokens=3),
                    7, 4, 9, (5, 6)),
    "classifier": (finetune_classifier, dict(preset="tiny", limit=20, batch_size=2, eval_batches=1, lr=1e-3,
                                             trainable="all"), 7, 4, 9, (5, 6)),
    "instruct": (finetune_instruct, dict(preset="tiny", limit=10, batch_size=2, eval_batches=1, lr=1e-3,
                                         max_new_tokens=2), 4, 3, 5, (5, 7)),
}


class Crash(Exception):
    """Stands for a kill -9: the run ends with no save."""


def config(task: str, out: Path, data_dir: Path, **kw):
    job, settings, _, eval_every, _, _ = TASKS[task]
    cls = TrainConfig if task == "pretraining" else FinetuneConfig
    settings = {**settings, "epochs": 2, "eval_every": eval_every, "dropout": 0.1, "device": "cpu", "out": str(out),
                "save_every": 1000, **kw}
    if task == "pretraining":  # 2,000 characters of The Verdict: 14 windows of 32 tokens, 7 steps an epoch
        text = data_dir / "verdict-start.txt"
        if not text.exists():
            text.write_text(open(default_text_path(), encoding="utf-8").read()[:2000])
        settings["data"] = str(text)
    return job, cls(**settings)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each task's run from start to end without a stop (made once, on first use)."""
    runs = {}

    def get(task: str):
        if task not in runs:
            base = tmp_path_factory.mktemp(task)
            job, cfg = config(task, base / "straight", base)
            runs[task] = (job(cfg), base)
        return runs[task]

    return get


def records(run_dir: Path) -> list[dict]:
    """The log's records, without their wall-clock times and the speed measured by them."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "speed")} for line in lines]


@pytest.mark.parametrize("stop", ["sigint", "periodic checkpoint"])
@pytest.mark.parametrize("task", list(TASKS))
def test_a_run_stopped_at_any_step_resumes_bit_identical(straight, tmp_path, task, stop):
    whole, data_dir = straight(task)
    job, _, steps_per_epoch, eval_every, sigint_at, (save_at, crash_at) = TASKS[task]
    assert whole.step == 2 * steps_per_epoch
    stop_at, saved_at = (sigint_at, sigint_at) if stop == "sigint" else (crash_at, save_at)
    assert saved_at % steps_per_epoch and saved_at % eval_every  # mid-epoch, between evaluations

    def stop_there(step, loss):
        if step == stop_at:
            if stop == "sigint":
                signal.raise_signal(signal.SIGINT)  # the step finishes, then a checkpoint, then KeyboardInterrupt
            else:
                raise Crash

    out = tmp_path / "stopped"
    _, cfg = config(task, out, data_dir, save_every=save_at if stop != "sigint" else 1000)
    with pytest.raises(KeyboardInterrupt if stop == "sigint" else Crash):
        job(cfg, on_step=stop_there)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == saved_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put Ctrl-C's handler back

    resumed = job(FinetuneConfig(resume=str(out)) if task != "pretraining" else TrainConfig(resume=str(out)))
    assert resumed.step == whole.step and resumed.losses == whole.losses[saved_at:]  # exactly, step by step
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert records(out) == records(whole.out_dir)  # one log, continued: every evaluation and sample the same
    assert resumed.metrics == whole.metrics
