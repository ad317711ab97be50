"""Run directories: a command that writes a run never writes into a directory holding anything but its own run
being resumed, and a bad setting is refused before anything is created (issue 15, items 1 and 6).

Each refusal is checked for the exit code, the one-line message and that no file anywhere changed.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.classify import finetune_classifier
from gpt.cli import main
from gpt.finetune import FinetuneConfig
from gpt.pretrain import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["--preset", "tiny", "--context-length", "32", "--max-steps", "1", "--device", "cpu"]
TINY_FINETUNE = ["--preset", "tiny", "--limit", "20", "--max-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretraining run, a classifier run and a LoRA classifier run, one step each."""
    base = tmp_path_factory.mktemp("runs")
    train(TrainConfig(preset="tiny", context_length=32, max_steps=1, eval_batches=1, sample_tokens=0, device="cpu",
                      out=str(base / "pretraining")))
    for name, lora in (("classifier", None), ("lora", 2)):
        finetune_classifier(FinetuneConfig(preset="tiny", limit=20, max_steps=1, eval_batches=1, lora_rank=lora,
                                           device="cpu", out=str(base / name)))
    return base


def snapshot(root: Path) -> dict:
    """Every file under ``root``: its content's hash and its modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, capsys, match: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("case", [
    "finetune-classifier over a pretraining run",
    "finetune-classifier over an earlier classifier run",
    "finetune-instruct into a directory with other files",
    "train over a classifier run",
    "lora-merge over a pretraining run",
    "lora-merge into the LoRA run itself",
    "a resumed run copied on into a directory that holds a run",
    "finetune-classifier resuming a pretraining run",
    "train resuming a classifier run",
])
def test_a_command_never_writes_over_another_run(runs, tmp_path, capsys, case):
    work = tmp_path / "runs"
    shutil.copytree(runs, work)
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("my notes")
    r, c, lora, notes = (str(work / n) for n in ("pretraining", "classifier", "lora", "notes"))
    before = snapshot(work)
    other = "give another --out, a new or empty directory"  # --resume is suggested only where it would work
    argv, match = {
        "finetune-classifier over a pretraining run": (
            ["finetune-classifier", *TINY_FINETUNE, "--checkpoint", r, "--out", r],
            f"{r} already holds a pretraining run: {other}"),
        "finetune-classifier over an earlier classifier run": (
            ["finetune-classifier", *TINY_FINETUNE, "--out", c],
            f"{c} already holds a classifier finetuning run: continue it with --resume {c}, or give another --out"),
        "finetune-instruct into a directory with other files": (
            ["finetune-instruct", *TINY_FINETUNE, "--out", notes], "is not empty (it holds todo.txt)"),
        "train over a classifier run": (["train", *TINY_TRAIN, "--out", c],
                                        f"{c} already holds a classifier finetuning run: {other}"),
        "lora-merge over a pretraining run": (["lora-merge", "--checkpoint", lora, "--out", r],
                                              f"{r} already holds a pretraining run: {other}"),
        "lora-merge into the LoRA run itself": (["lora-merge", "--checkpoint", lora, "--out", lora],
                                                f"{lora} already holds a classifier finetuning run: {other}"),
        "a resumed run copied on into a directory that holds a run": (
            ["train", "--resume", r, "--max-steps", "2", "--out", c],
            f"{c} already holds a classifier finetuning run: {other}"),
        "finetune-classifier resuming a pretraining run": (
            ["finetune-classifier", "--resume", r, "--epochs", "2"], "it holds a pretraining run"),
        "train resuming a classifier run": (["train", "--resume", c], "it holds a classifier finetuning run"),
    }[case]
    refused(argv, capsys, match)
    assert snapshot(work) == before  # not a byte written, not a file touched


def test_a_resumed_run_may_continue_in_place_or_into_a_new_directory(runs, tmp_path, capsys):
    work = tmp_path / "classifier"
    shutil.copytree(runs / "classifier", work)
    assert main(["finetune-classifier", "--resume", str(work), "--max-steps", "2", "--out", str(tmp_path / "on")]) == 0
    assert main(["finetune-classifier", "--resume", str(work), "--max-steps", "2"]) == 0  # in place


@pytest.mark.parametrize("argv, match", [
    (["train", *TINY_TRAIN, "--dtype", "float16"], "float16 training needs a CUDA GPU"),
    (["finetune-classifier", *TINY_FINETUNE, "--dtype", "float16"], "float16 training needs a CUDA GPU"),
    (["finetune-classifier", *TINY_FINETUNE, "--data", "missing.csv"], "does not exist"),
    (["finetune-instruct", *TINY_FINETUNE, "--max-length", "65"], "between 1 and the model's context length 64"),
    (["train", *TINY_TRAIN, "--batch-size", "1000"], "fewer than one optimizer step"),
])
def test_a_bad_setting_creates_nothing(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)  # where the default run directory, runs/<date-time>, would go
    refused(argv, capsys, match)
    refused([*argv, "--out", "out"], capsys, match)
    assert list(tmp_path.iterdir()) == []


def test_triton_kernels_on_the_cpu_are_refused_before_anything_is_created(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gpt", "train", *TINY_TRAIN, "--kernels", "triton"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--kernels triton cannot run on cpu" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
