"""What a new user ran into, round two (issue 27, items 3 and 5 to 9; item 1 is in test_run_lock.py, item 2 in
test_stop.py): one GPT_KERNELS rule for every command, a diverged run that leaves nothing half-made, final work
that a resume does again, one line of chat output per line of input, messages that say what happened, and no
setting that is silently dropped. Each refusal is checked for its exit status, its one line and that nothing was
written."""

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import gpt_kernels.reference as reference
from gpt import GPT, save_checkpoint
from gpt.cli import main
from gpt.finetune import FinetuneConfig
from gpt.instruct import RESPONSES_FILE
from gpt.pretrain import TrainConfig, train
from gpt.rundir import LOG_FILE
from gpt.trainer_state import STATE_FILE

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
TINY_TRAIN = ["--preset", "tiny", "--context-length", "32", "--max-steps", "1", "--device", "cpu"]
TINY_FINETUNE = ["--preset", "tiny", "--limit", "10", "--max-steps", "1", "--device", "cpu"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def refused(argv, capsys, *matches) -> str:
    """Run the command: exit 1 with one error line (the last on stderr) holding every one of ``matches``."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == captured.err.strip().splitlines()[-1], captured.err
    for m in matches:
        assert m in errors[0], errors[0]
    return captured.out


def stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# ------------------------------------------------------------------------------------------ item 3: GPT_KERNELS


@pytest.mark.parametrize("command", ["train", "finetune-classifier", "finetune-instruct", "generate", "classify",
                                     "chat", "info"])
def test_a_gpt_kernels_that_is_no_backend_is_refused_by_every_command(tiny_runs, tmp_path, monkeypatch, capsys,
                                                                      command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT_KERNELS", "nonsense")
    stdin(monkeypatch, b"Name a color.\n")
    argv = {"train": ["train", *TINY_TRAIN], "finetune-classifier": ["finetune-classifier", *TINY_FINETUNE],
            "finetune-instruct": ["finetune-instruct", *TINY_FINETUNE],
            "generate": ["generate", "--preset", "tiny", "--prompt", "Hi"],
            "classify": ["classify", "--checkpoint", str(tiny_runs / "classifier"), "Hi"],
            "chat": ["chat", "--checkpoint", str(tiny_runs / "instruct")], "info": ["info"]}[command]
    out = refused(argv, capsys, "$GPT_KERNELS: unknown kernel backend 'nonsense': choose one of auto, triton, torch, "
                                "reference")
    assert out == "" or command == "info" and "backend" not in out
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_gpt_kernels_triton_is_checked_on_the_cpu_by_training_and_generation(tmp_path):
    env = {**ENV, "GPT_KERNELS": "triton", "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    for argv in (["train", *TINY_TRAIN], ["generate", "--preset", "tiny", "--prompt", "Hi", "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "gpt", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert proc.stderr.strip().splitlines() == [f"gpt {argv[0]}: error: GPT_KERNELS=triton cannot run on cpu: "
                                                    "kernel backend 'triton' got CPU tensors: move them to a CUDA "
                                                    "device, or set TRITON_INTERPRET=1 before importing `gpt_kernels` "
                                                    "to run the kernels in Triton's (slow) CPU interpreter, or use "
                                                    "GPT_KERNELS=torch"]
    assert list(tmp_path.iterdir()) == []


def test_training_runs_the_backend_gpt_kernels_names(tmp_path, monkeypatch):
    calls = []
    for name in ("layer_norm", "add_layer_norm"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setenv("GPT_KERNELS", "reference")
    result = train(TrainConfig(preset="tiny", context_length=32, max_steps=1, eval_batches=1, sample_tokens=0,
                               device="cpu", out=str(tmp_path / "run")))
    assert calls  # the reference ops ran, not PyTorch's (what "auto" picks on the CPU)
    assert result.model.kernel_backend == "reference"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["kernels"] == "reference"


# ------------------------------------------------------------------------------------------ item 5: a NaN loss


def test_a_run_that_diverges_before_its_first_checkpoint_leaves_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "tiny", "--context-length", "32", "--max-steps", "5", "--device", "cpu",
            "--out", "run"]
    refused([*argv, "--lr", "1e9"], capsys, "the training loss became nan at step ",
            "lower --lr (it is 1e+09) or use --dtype bfloat16/float32; no checkpoint had been saved, so nothing is "
            "kept in run")
    assert list(tmp_path.iterdir()) == []  # not a log without a checkpoint, that blocks the same --out
    assert main(argv) == 0  # the same --out, a sane --lr


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_resumable(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--context-length", "32", "--max-steps", "5", "--save-every", "1",
            "--lr", "1e9", "--device", "cpu", "--out", str(run)]
    refused(argv, capsys, "the training loss became nan at step 2", f"the checkpoint of step 1 in {run} is untouched")
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert state["step"] == json.loads((run / "config.json").read_text())["step"] == 1
    assert main(["train", "--resume", str(run), "--max-steps", "1"]) == 0  # it resumes (and finishes: step 1 of 1)


# ------------------------------------------------------------------------------------------ item 6


def test_an_instruct_run_stopped_while_answering_its_test_set_answers_it_when_resumed(tmp_path, monkeypatch, capsys):
    import gpt.instruct as instruct

    run = tmp_path / "run"
    answer = instruct.score_responses

    def ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the test set is being answered, after the last checkpoint

    monkeypatch.setattr(instruct, "score_responses", ctrl_c)
    assert main(["finetune-instruct", *TINY_FINETUNE, "--max-new-tokens", "2", "--out", str(run)]) == 130
    assert f"--resume {run} does that work again" in capsys.readouterr().out
    assert not (run / RESPONSES_FILE).exists()
    monkeypatch.setattr(instruct, "score_responses", answer)
    assert main(["finetune-instruct", "--resume", str(run)]) == 0
    assert len(json.loads((run / RESPONSES_FILE).read_text())) == 1  # the test set's one record, answered
    assert "test_rouge_l_f1" in json.loads((run / "finetune.json").read_text())
    capsys.readouterr()
    before = snapshot(run)
    assert main(["finetune-instruct", "--resume", str(run)]) == 0  # now done: nothing more to do
    assert "has already trained 1 steps" in capsys.readouterr().out and snapshot(run) == before


# ------------------------------------------------------------------------------------------ item 7: chat


def test_chat_prints_one_line_for_every_line_it_reads(tiny_runs, monkeypatch, capsys):
    too_long = " ".join(["word"] * 80)  # tiny's context is 64 tokens
    stdin(monkeypatch, b"Name a color.\n\n" + too_long.encode() + b"\nCaf\xe9\nWhat is 2 + 2?\n")
    assert main(["chat", "--checkpoint", str(tiny_runs / "instruct"), "--max-new-tokens", "3"]) == 1
    captured = capsys.readouterr()
    out = captured.out.split("\n")
    assert len(out) == 6 and out[-1] == ""  # five lines in, five out
    assert out[1] == ""  # an empty line gets an empty answer
    assert out[2].startswith("[error] line 3: the instruction is too long")
    assert out[3].startswith("[error] line 4: stdin is not UTF-8 text: byte 0xe9")
    assert not out[0].startswith("[error]") and not out[4].startswith("[error]")
    assert [line.split(": ")[1] for line in captured.err.splitlines()] == ["error", "error"]


def test_chat_jsonl_answers_records_with_records(tiny_runs, monkeypatch, capsys):
    lines = [{"instruction": "Name a color.", "input": ""}, {"instruction": "Add these.", "input": "2 and 2"}]
    stdin(monkeypatch, "\n".join([json.dumps(lines[0]), "not json", json.dumps(lines[1])]).encode() + b"\n")
    assert main(["chat", "--checkpoint", str(tiny_runs / "instruct"), "--max-new-tokens", "3", "--jsonl"]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 3
    assert {k: out[0][k] for k in lines[0]} == lines[0] and isinstance(out[0]["response"], str)
    assert out[1]["line"] == 2 and out[1]["error"].startswith("not JSON")
    assert {k: out[2][k] for k in lines[1]} == lines[1] and isinstance(out[2]["response"], str)


# ------------------------------------------------------------------------------------------ item 8: messages


def test_resume_refusals_name_a_setting_the_run_did_not_have(tiny_runs, tmp_path, capsys):
    (tmp_path / "book.txt").write_text("Every effort moves you.\n" * 100)
    run = tiny_runs / "pretraining"
    before = snapshot(tiny_runs)
    refused(["train", "--resume", str(run), "--checkpoint", str(run)], capsys,
            f"cannot resume {run} with --checkpoint '{run}': that run was trained without --checkpoint. A resumed run "
            "keeps its settings")
    refused(["train", "--resume", str(run), "--data", str(tmp_path / "book.txt")], capsys,
            "that run was trained without --data")
    assert snapshot(tiny_runs) == before


def test_a_full_disk_during_a_save_says_so_and_how_much_a_checkpoint_needs(tiny_runs, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(tiny_runs / "pretraining", tmp_path / "run")
    before = {n: (run / n).read_bytes() for n in ("config.json", "model.safetensors", STATE_FILE)}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 10**6, 5 * 10**6))
    previous, limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 10**6, limit[1]))  # files stop at 20 MB: the disk is full
    try:  # (the weights, 13 MB, fit; torch.save's optimizer state, 27 MB, fails: "[enforce fail at ...]")
        refused(["train", "--resume", str(run), "--max-steps", "2"], capsys,
                f"could not save the checkpoint of step 2 in {run}: the disk is full (5.0 MB free, and a checkpoint "
                f"takes about 5", f" MB); the previous checkpoint there is intact. Free some space, then continue with "
                f"--resume {run}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert {n: (run / n).read_bytes() for n in before} == before and not (run / ".saving").exists()


def test_a_read_only_data_directory_gets_its_token_file_in_the_cache_directory(tmp_path):
    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Every effort moves you.\n" * 200)  # a directory: always through a token file
    argv = [sys.executable, "-m", "gpt", "train", *TINY_TRAIN, "--data", str(corpus), "--out", str(tmp_path / "run")]
    if os.geteuid() != 0:
        os.chmod(corpus, 0o555)
        reason = "Permission denied"
    else:  # root writes through permissions: a read-only mount, in a mount namespace of the command's own
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
            pytest.skip("running as root without the right to make a read-only mount (unshare -m)")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && '
                'exec "$@"', "sh", str(corpus), *argv]
        reason = "Read-only file system"
    before = snapshot(corpus)
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env={**ENV, "XDG_CACHE_HOME": str(cache)}, capture_output=True,
                              text=True, timeout=300)
    finally:
        os.chmod(corpus, 0o755)
    assert proc.returncode == 0, proc.stderr
    tokens = list(cache.rglob("corpus.tokens.u16"))
    assert len(tokens) == 1 and tokens[0].parent.parent == cache / "gpt-triton" / "tokens"
    assert f"note: cannot write the token file beside the data ({corpus}: {reason}); it goes to {tokens[0]}" in \
        proc.stderr, proc.stderr
    assert snapshot(corpus) == before


def test_generate_fails_before_printing_anything_and_says_why(tmp_path, capsys):
    model = GPT.from_preset("tiny")
    with torch.no_grad():
        model.final_norm.weight.fill_(3e38)  # finite weights whose normed states overflow to inf
    save_checkpoint(model, tmp_path / "overflows")
    out = refused(["generate", "--checkpoint", str(tmp_path / "overflows"), "--prompt", "Every effort moves you"],
                  capsys, "the model's next-token scores are not numbers (nan or inf): its weights hold nan/inf, or "
                          "its dtype overflowed; try --dtype float32, or another checkpoint")
    assert out == ""  # not the prompt, then an error
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "nan")
    out = refused(["generate", "--checkpoint", str(tmp_path / "nan"), "--prompt", "Hi"], capsys,
                  f"{tmp_path / 'nan' / 'model.safetensors'}: 1 tensor(s) hold nan or inf values "
                  "(blocks.0.mlp.fc.weight): the run that saved them had diverged. Use another checkpoint")
    assert out == ""


# ------------------------------------------------------------------------------------------ item 9: surprises


@pytest.mark.parametrize("extra, match", [
    (["--epochs", "2", "--max-steps", "3"], "--epochs 2 and --max-steps 3 both set the run's length: give one of them"),
    (["--warmup-steps", "1000", "--max-steps", "5"], "--warmup-steps 1000 is not shorter than the run (5 steps): the "
                                                     "learning rate would never reach --lr 0.0004; use fewer warm-up"),
])
def test_settings_that_would_be_dropped_or_never_take_effect_are_refused(tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    refused(["train", "--preset", "tiny", "--context-length", "32", "--device", "cpu", *extra], capsys, match)
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_model_given_a_longer_context_says_it_grows(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--context-length", "80", "--max-steps", "1", "--sample-tokens", "0",
                 "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert ("note: a fresh model takes --context-length as its own: this one's is 80, not the preset's 64 (its "
            "position table has 80 rows)") in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["context_length"] == 80


@pytest.mark.parametrize("config, match", [
    (TrainConfig(lr="x"), "--lr must be a number, got 'x' (str)"),
    (TrainConfig(data=123), "--data must be text (a path or a name) (or None), got 123 (int)"),
    (TrainConfig(batch_size=2.5), "--batch-size must be an integer, got 2.5 (float)"),
    (FinetuneConfig(mask_prompt="yes"), "--mask-prompt must be True or False, got 'yes' (str)"),
])
def test_settings_of_the_wrong_type_are_value_errors_naming_the_option(tmp_path, monkeypatch, config, match):
    monkeypatch.chdir(tmp_path)
    from gpt.instruct import finetune_instruct

    job = train if isinstance(config, TrainConfig) else finetune_instruct
    with pytest.raises(ValueError) as e:
        job(config)
    assert str(e.value) == match
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_option_shows_the_usage_of_its_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "2", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: gpt train ")
    assert err.strip().splitlines()[-1] == "gpt train: error: unrecognized arguments: --bogus"


def test_a_closed_pipe_ends_gpt_info_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader has gone (gpt info | head -1, once head has its line)
    proc = subprocess.run([sys.executable, "-m", "gpt", "info"], env=ENV, stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"gpt {version('gpt-triton')} (the gpt-triton package)\n"


def test_the_log_of_a_finished_run_says_its_final_work_is_done(tiny_runs):
    records = [json.loads(line) for line in (tiny_runs / "pretraining" / LOG_FILE).read_text().splitlines()]
    assert records[-1] == {"event": "finished", "step": 1}
