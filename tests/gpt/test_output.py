"""What the commands show and write (issue 15, items 7, 9, 14 and 15): help texts with descriptions and
defaults, errors that name the options typed, samples whose line breaks show, finetuning's plot, run files
that all have the same permissions, and an estimate of a run's length once its first steps are timed."""

import argparse
import json
import os
import re

import pytest

from gpt.cli import build_parser, main
from gpt.clock import RunClock, duration
from gpt.config import PRESETS
from gpt.pretrain import TrainConfig, train
from gpt.tokenizer import visible

NO_DEFAULT = {"--checkpoint", "--hf", "--resume"}  # where the model or run comes from: given or not


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# ------------------------------------------------------------------------------------------ item 9: help


@pytest.mark.parametrize("name", list(commands()))
def test_every_command_has_a_description_and_every_option_its_help_and_default(name):
    p = commands()[name]
    assert p.description and len(p.description) > 40, name
    p.format_help()  # renders (a stray % in a help text would raise here)
    for a in p._actions:
        if not a.option_strings or "--help" in a.option_strings or a.help == argparse.SUPPRESS:
            continue
        assert a.help, f"{name} {a.option_strings[0]} has no help"
        if not (a.required or a.option_strings[0] in NO_DEFAULT):
            assert "default" in a.help, f"{name} {a.option_strings[0]}: {a.help}"
        if a.option_strings[0] == "--preset":
            assert all(preset in a.help for preset in PRESETS), a.help


def test_help_says_what_the_finetuning_commands_start_from_read_and_write():
    cmds = commands()
    for name in ("finetune-classifier", "finetune-instruct"):
        helps = {a.option_strings[0]: a.help for a in cmds[name]._actions if a.option_strings}
        assert "a run directory of gpt train" in helps["--checkpoint"]
        assert "untrained" in helps["--preset"]
        assert "loss.png" in helps["--out"] and f"runs/{name.removeprefix('finetune-')}-" in helps["--out"]
    data = {name: next(a.help for a in cmds[name]._actions if "--data" in a.option_strings)
            for name in ("train", "finetune-classifier", "finetune-instruct")}
    assert "UTF-8 text file" in data["train"]
    assert "CSV or TSV" in data["finetune-classifier"] and "--text-column" in data["finetune-classifier"]
    assert all(key in data["finetune-instruct"] for key in ('"instruction"', '"input"', '"output"'))


@pytest.mark.parametrize("argv, match", [
    (["generate", "--prompt", "x", "--preset", "tiny", "--max-new-tokens", "-1"],
     "--max-new-tokens must be a non-negative integer, got -1"),
    (["generate", "--prompt", "x", "--preset", "tiny", "--top-k", "-2"],
     "--top-k must be a positive integer (0 = off)"),
    (["chat", "--checkpoint", ".", "--temperature", "-1"], "--temperature must be >= 0"),
    (["train", "--preset", "tiny", "--eval-every", "0"], "--eval-every must be a positive integer, got 0"),
    (["finetune-classifier", "--preset", "tiny", "--lr", "0"], "--lr must be > 0"),
])
def test_errors_name_the_options_a_user_typed(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert "max_new_tokens" not in err and "or None" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ item 9: the plot


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_finetuning_plots_the_loss_and_a_classifier_also_its_accuracy(tiny_runs):
    classifier, instruct = (png_size(tiny_runs / name / "loss.png") for name in ("classifier", "instruct"))
    assert classifier == (1200, 400) and instruct == (600, 400)  # loss | accuracy side by side; the loss alone


# ------------------------------------------------------------------------------------------ item 7: samples


def test_samples_show_their_line_breaks_and_the_log_keeps_the_text(tmp_path, capsys):
    assert visible("a\n\nb\r\n") == "a\\n\\nb\\r\\n"
    result = train(TrainConfig(preset="tiny", context_length=32, max_steps=1, eval_batches=1, sample_tokens=2,
                               sample_prompt="Every effort\n\nmoves you", device="cpu", out=str(tmp_path / "run")))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample")]
    assert len(printed) == 1 and printed[0].startswith("sample at step 1: Every effort\\n\\nmoves you")
    samples = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["text"][:23] for r in samples if r["event"] == "sample"] == ["Every effort\n\nmoves you"]


# ------------------------------------------------------------------------------------------ item 14


def test_every_file_of_a_run_gets_the_permissions_of_a_new_file(tiny_runs):
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {str(p.relative_to(tiny_runs)): oct(p.stat().st_mode & 0o777) for p in tiny_runs.rglob("*") if p.is_file()}
    assert "classifier/model.safetensors" in modes and "lora/adapters.safetensors" in modes  # (safetensors made 0600)
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


# ------------------------------------------------------------------------------------------ item 15


def test_the_estimate_adds_the_timed_steps_and_evaluations_and_skips_the_warm_up():
    clock = RunClock()
    assert [clock.step(s) for s in (30.0, 1.0, 2.0)] == [False, False, False]  # the first step is the warm-up
    assert clock.step(3.0)  # the third timed step: an estimate is due
    line = clock.estimate(steps=10, evals=2, epoch_ends=1)
    assert line.startswith("estimate: 20 s more (10 steps of 2.0 s, 2 evaluations not timed yet); training done "
                           "around")
    assert clock.evaluation(1.5)  # that estimate had no evaluation timed: a second one is due now
    clock.epoch_end(0.5)
    line = clock.estimate(steps=9, evals=2, epoch_ends=1, then="the test set")
    assert re.fullmatch(r"estimate: 22 s more \(9 steps of 2\.0 s, 2 evaluations of 1\.5 s\); training done around "
                        r"\d\d:\d\d, then the test set", line), line
    assert not clock.evaluation(1.5)  # once
    assert [duration(s) for s in (4.26, 59, 125, 1800, 8000)] == ["4.3 s", "59 s", "2 min 5 s", "30 min", "2 h 13 min"]


def test_a_run_prints_its_estimate_after_its_first_timed_steps(tmp_path, capsys):
    train(TrainConfig(preset="tiny", context_length=32, max_steps=7, eval_every=3, eval_batches=1, sample_tokens=0,
                      device="cpu", out=str(tmp_path / "run")))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("estimate:")]
    # after step 4 (step 1 is the warm-up, 2-4 are timed): steps 5-7 and the evaluations at 6 and 7 are left
    assert len(lines) == 1 and re.match(r"estimate: .* more \(3 steps of .*, 2 evaluations of .*\); training done "
                                        r"around \d\d:\d\d$", lines[0]), lines
