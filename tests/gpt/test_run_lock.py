"""One command at a time writes a run directory (issue 27, item 1): two commands given the same --out are never
both let in, the second is refused with one line naming the first's process, and a lock dies with its process.

Two commands are started together as a user starts them (two shells); the one still running once the other is
refused is stopped with Ctrl-C and its directory must hold its own run alone. A holder that is just another
process with the directory's flock (what a running command holds) makes the refusals deterministic, and is
then killed with SIGKILL: the next command must get in.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.cli import main
from gpt.rundir import LOG_FILE
from gpt.trainer_state import STATE_FILE

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
LONG = ["--preset", "tiny", "--max-steps", "100000", "--device", "cpu"]  # runs until stopped
COMMANDS = {
    "train": ["train", *LONG, "--context-length", "32", "--sample-tokens", "0"],
    "finetune-classifier": ["finetune-classifier", *LONG, "--limit", "20", "--batch-size", "2"],
    "finetune-instruct": ["finetune-instruct", *LONG, "--limit", "10", "--batch-size", "2", "--max-new-tokens", "2"],
}


def gpt(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt", *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line or "Traceback" in line]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_two_commands_started_together_never_share_a_run_directory(tmp_path, command):
    out = tmp_path / "run"
    procs = {seed: gpt([*COMMANDS[command], "--seed", str(seed), "--out", str(out)], tmp_path) for seed in (7, 8)}
    try:
        deadline = time.monotonic() + 180
        while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.2)  # the first to end is the one refused (the other trains until it is stopped)
        ended = [s for s, p in procs.items() if p.poll() is not None]
        assert ended, "both commands are still running in the same directory after 3 minutes"
        loser = ended[0]
        winner = 15 - loser
        _, err = procs[loser].communicate(timeout=60)
        assert procs[loser].returncode == 1, err
        assert errors(err) == [f"gpt {command}: error: {out} is being written by process {procs[winner].pid}, "
                               f"another command still running: wait for it to end, or give another directory"], err
        procs[winner].send_signal(signal.SIGINT)  # Ctrl-C: the step finishes, a checkpoint is saved
        _, err = procs[winner].communicate(timeout=120)
        assert procs[winner].returncode == 130, err
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["train_config"]["seed"] == winner  # the winner's run alone...
    log = (out / LOG_FILE).read_text().splitlines() if (out / LOG_FILE).exists() else []  # (finetuning: per epoch)
    steps = [r["step"] for r in map(json.loads, log) if r["event"] == "eval"]
    assert steps == sorted(set(steps)) and all(s <= state["step"] for s in steps)  # ... one log, not two mixed
    if command == "train":
        assert json.loads((out / "config.json").read_text())["step"] == state["step"]  # weights of that step


def test_two_lora_merges_started_together_write_one_merged_model(tiny_runs, tmp_path):
    out = tmp_path / "merged"
    procs = [gpt(["lora-merge", "--checkpoint", str(tiny_runs / "lora"), "--out", str(out)], tmp_path) for _ in "ab"]
    results = [(p.wait(timeout=120), p.stderr.read(), p.pid) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 1]
    (_, err, _), (_, _, winner) = sorted(results, key=lambda r: -r[0])  # the refused one, the one that merged
    assert len(errors(err)) == 1 and "Traceback" not in err, err
    # refused while the other writes (naming it), or once it is done (its model is there)
    assert (f"{out} is being written by process {winner}" in err or f"{out} is not empty" in err), err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "finetune.json", "model.safetensors"]
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0


# ------------------------------------------------------------------------------------------ a held directory


@pytest.fixture
def holder():
    """``hold(path)``: another process takes the flock on ``path`` and keeps it until killed (SIGKILL)."""
    procs = []

    def hold(path: Path) -> subprocess.Popen:
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                "print('held', flush=True); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline() == "held\n"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


ONE_STEP = ["--preset", "tiny", "--max-steps", "1", "--device", "cpu"]


@pytest.mark.parametrize("case", ["train", "finetune-classifier", "finetune-instruct", "lora-merge", "train --resume",
                                  "prepare-data"])
def test_a_held_directory_is_refused_naming_its_holder_until_the_holder_dies(tiny_runs, tmp_path, holder, capsys,
                                                                           case):
    out = tmp_path / "out"
    argv = {"train": ["train", *ONE_STEP, "--context-length", "32", "--out", str(out)],
            "finetune-classifier": ["finetune-classifier", *ONE_STEP, "--limit", "20", "--out", str(out)],
            "finetune-instruct": ["finetune-instruct", *ONE_STEP, "--limit", "10", "--out", str(out)],
            "lora-merge": ["lora-merge", "--checkpoint", str(tiny_runs / "lora"), "--out", str(out)],
            "train --resume": ["train", "--resume", str(out), "--max-steps", "2"],
            "prepare-data": ["prepare-data", str(tmp_path / "corpus.txt"), "--out", str(out),
                             "--val-tokens", "0"]}[case]
    (tmp_path / "corpus.txt").write_text("It had always been a surprise to me. " * 50)
    if case == "train --resume":
        shutil.copytree(tiny_runs / "pretraining", out)
    else:
        out.mkdir()  # (an empty directory is a new run's)
    stale = out / ".log.jsonl.tmp-4194305"  # what a process killed inside atomic_write leaves (a resumed run's)
    if case in ("train --resume", "prepare-data"):
        stale.write_text('{"half": ')
    before = listing(tmp_path)
    held = holder(out)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"gpt {argv[0]}: error: {out} is being written by process {held.pid}, another command "
                       f"still running: wait for it to end, or give another directory")
    assert listing(tmp_path) == before  # nothing written, nothing read-and-changed (a resume recovers nothing)
    held.kill()
    held.wait()  # a kill -9 leaves no stale lock behind
    assert main(argv) == 0
    assert not stale.exists()  # the next holder removes it
