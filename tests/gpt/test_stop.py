"""A run of any length says how long it will take at once, and one Ctrl-C stops any phase of it within a second or
two (issue 27, item 2): the estimate is counted, not walked step by step, and a Ctrl-C during the work after a step
(an evaluation, a sample) cuts it short; that work is saved as pending and done first when the run resumes, so the
resumed run ends exactly as one never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt.clock import RunClock, count_due
from gpt.data import default_text_path
from gpt.pretrain import PretrainTask, TrainConfig, train
from gpt.rundir import LOG_FILE
from gpt.trainer_state import STATE_FILE

REPO = Path(__file__).resolve().parents[2]


def test_the_evaluations_and_epoch_ends_left_are_counted_as_walking_the_steps_would():
    rng = random.Random(0)
    for _ in range(300):
        total, every = rng.randint(1, 60), rng.randint(1, 12)
        step = rng.randint(0, total)
        walked = sum(1 for s in range(step + 1, total + 1) if s % every == 0 or s == total)
        assert count_due(step, total, every) == walked, (step, total, every)
    clock = RunClock()
    for s in (9.0, 1.0, 1.0, 1.0):
        clock.step(s)
    t0 = time.perf_counter()
    line = clock.estimate_rest(4, 9 * 10**7, 5, 9, "the test set")  # 10 million epochs of 9 steps: walking them
    assert time.perf_counter() - t0 < 0.5  # takes seconds
    assert line.startswith("estimate: 3 years more (89,999,996 steps of 1.0 s, 18,000,000 evaluations not timed yet); "
                           "training done around 20")


def test_a_billion_epochs_get_an_estimate_at_once_and_stop_on_one_ctrl_c(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--context-length", "32",
                             "--epochs", "1000000000", "--device", "cpu", "--out", "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: dict[str, float] = {}
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            for key in ("Ep 1 (step 000000)", "estimate:", "stopped at step"):
                if line.startswith(key):
                    seen.setdefault(key, time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while "estimate:" not in seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Ep 1 (step 000000)" in seen, "".join(lines)  # the evaluation before the first step
        assert "estimate:" in seen, "".join(lines)
        assert seen["estimate:"] - seen["Ep 1 (step 000000)"] < 60  # four tiny steps (on a busy CPU), the estimate
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)  # one Ctrl-C
        proc.wait(timeout=120)
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    # the step under way finishes and its checkpoint is saved: seconds, more on a machine busy with other work
    assert proc.returncode == 130 and stopped_in < 60, (proc.returncode, stopped_in)
    estimate = next(line for line in lines if line.startswith("estimate:"))
    assert "years more" in estimate, estimate
    assert "stopped at step" in seen and (tmp_path / "run" / STATE_FILE).exists()


# ------------------------------------------------------------------------------------------ Ctrl-C mid-evaluation


def config(tmp_path: Path, out: str, **kw) -> TrainConfig:
    text = tmp_path / "verdict-start.txt"  # 14 windows of 32 tokens: 7 steps an epoch
    if not text.exists():
        text.write_text(open(default_text_path(), encoding="utf-8").read()[:2000])
    return TrainConfig(**{**dict(preset="tiny", context_length=32, batch_size=2, max_steps=6, eval_every=3,
                                 eval_batches=1, sample_tokens=3, dropout=0.1, device="cpu", data=str(text),
                                 out=str(tmp_path / out)), **kw})


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "speed")}  # (wall-clock figures)
            for line in (run_dir / LOG_FILE).read_text().splitlines()]


@pytest.mark.parametrize("when", ["during the evaluation", "during the step before it"])
def test_ctrl_c_stops_before_a_long_evaluation_and_the_resume_does_it_first(tmp_path, monkeypatch, when):
    whole = train(config(tmp_path, "whole"))
    evaluate = PretrainTask.evaluate

    def slow_evaluation(self, run):
        if run.step == 3 and when == "during the evaluation":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C at the start of the evaluation
        if run.step == 3:
            time.sleep(300)
        return evaluate(self, run)

    def ctrl_c_in_the_step(step, loss):
        if step == 3 and when == "during the step before it":
            signal.raise_signal(signal.SIGINT)  # the step finishes, and the evaluation after it waits

    monkeypatch.setattr(PretrainTask, "evaluate", slow_evaluation)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "stopped"), on_step=ctrl_c_in_the_step)
    assert time.monotonic() - t0 < 120  # not the five minutes the evaluation would take
    monkeypatch.undo()
    state = torch.load(tmp_path / "stopped" / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["pending"] == ["evaluate"]  # the step's checkpoint, its evaluation to do
    assert [r["step"] for r in records(tmp_path / "stopped") if r["event"] == "eval"] == [0]
    resumed = train(TrainConfig(resume=str(tmp_path / "stopped")))
    assert resumed.losses == whole.losses[3:]
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert records(tmp_path / "stopped") == records(whole.out_dir)  # the evaluation at step 3 is in the log, once
