"""gpt train: the loop, the run directory, exact resume, Ctrl-C, and clear errors for bad input."""

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from gpt import GPT, CheckpointError, load_checkpoint
from gpt.cli import main
from gpt.optim import lr_at, make_optimizer
from gpt.pretrain import TrainConfig, train
from gpt.trainer_state import STATE_FILE


def tiny(out, **kw) -> TrainConfig:
    """A run of a few milliseconds a step: the tiny preset on 32-token windows of The Verdict."""
    base = dict(preset="tiny", context_length=32, batch_size=2, max_steps=4, eval_every=2, eval_batches=1,
                sample_tokens=4, device="cpu", out=str(out))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny run, copied by the tests that need a run directory to damage or resume."""
    out = tmp_path_factory.mktemp("runs") / "base"
    train(tiny(out, max_steps=2))
    return out


def copy_run(src, tmp_path):
    return shutil.copytree(src, tmp_path / "run")


# ------------------------------------------------------------------------------------------ the schedule


def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lrs = [lr_at(s, 1e-3, 1e-4, warmup_steps=4, total_steps=20) for s in range(25)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))  # half-way down
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after the warm-up
    assert lrs[20] == pytest.approx(1e-4) and lrs[24] == pytest.approx(1e-4)  # stays at min_lr past the end


def test_weight_decay_skips_biases_and_layer_norms():
    model = GPT.from_preset("tiny")
    decay, no_decay = make_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert len(ids) == len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert id(model.tok_emb.weight) in {id(p) for p in decay["params"]}  # tied with the head: once


@pytest.mark.parametrize("beta2", [None, 0.95])
def test_beta2_reaches_adamw_and_the_run_records_it(tmp_path, beta2):
    train(tiny(tmp_path / "run", max_steps=1, eval_every=None, sample_tokens=0, beta2=beta2))
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    want = 0.999 if beta2 is None else beta2  # None: PyTorch's default, which the book's runs use
    assert state["train_config"]["beta2"] == want  # what a resume continues with
    assert [tuple(g["betas"]) for g in state["optimizer"]["param_groups"]] == [(0.9, want)] * 2


# ------------------------------------------------------------------------------------------ a whole run


def test_gpt_train_learns_and_writes_a_run_that_gpt_generate_loads(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--max-steps", "12",
               "--lr", "1e-2", "--eval-every", "6", "--eval-batches", "2", "--save-every", "5",
               "--sample-tokens", "5", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sample at step 12" in printed and "Every effort moves you" in printed
    for name in ("config.json", "model.safetensors", STATE_FILE, "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".saving").exists()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert [r["tokens"] for r in evals] == [0, 6 * 4 * 32, 12 * 4 * 32]
    assert evals[0]["train_loss"] == pytest.approx(math.log(50257), abs=0.3)  # a fresh model: near-uniform
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 2.0  # it learns (the word frequencies at least)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    assert any(r["event"] == "sample" for r in records)
    state = torch.load(out / STATE_FILE, weights_only=True)  # plain containers only
    assert state["step"] == 12 and state["train_config"]["tokens_per_step"] == 128
    assert json.loads((out / "config.json").read_text())["step"] == 12

    assert load_checkpoint(out).config.context_length == 32
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Every effort moves you", "--max-new-tokens",
                 "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_gradient_accumulation_follows_the_same_curve_as_one_big_batch(tmp_path):
    one = train(tiny(tmp_path / "a", batch_size=4, dropout=0.0, max_steps=3, eval_every=100, sample_tokens=0))
    acc = train(tiny(tmp_path / "b", batch_size=2, tokens_per_step=4 * 32, dropout=0.0, max_steps=3,
                     eval_every=100, sample_tokens=0, kernels="torch"))
    assert acc.model.kernel_backend == "torch" and one.model.kernel_backend == "auto"  # --kernels
    assert acc.examples_seen == one.examples_seen == 3 * 4
    assert acc.metrics["tokens_seen"] == one.metrics["tokens_seen"] == 3 * 4 * 32
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(one.losses), rtol=0, atol=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


def test_a_directory_of_text_files_trains_through_the_memory_mapped_token_file(tmp_path):
    from gpt.data import default_text_path

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = open(default_text_path(), encoding="utf-8").read()
    (corpus / "a.txt").write_text(text[:8000])
    (corpus / "b.txt").write_text(text[8000:16000])
    result = train(tiny(tmp_path / "out", data=str(corpus), max_steps=2, eval_every=100, sample_tokens=0))
    assert result.step == 2 and all(math.isfinite(x) for x in result.losses)
    assert (corpus / "corpus.tokens.u16").is_file()  # tokenized once, then memory-mapped


# ------------------------------------------------------------------------------------------ resume
# (exact resume after Ctrl-C or a crash, for every task: test_resume.py)


def test_resume_can_extend_a_finished_run_into_another_directory(finished_run, tmp_path):
    result = train(TrainConfig(resume=str(finished_run), max_steps=3, out=str(tmp_path / "more")))
    assert result.step == 3 and len(result.losses) == 1
    assert torch.load(tmp_path / "more" / STATE_FILE, weights_only=True)["step"] == 3
    assert torch.load(finished_run / STATE_FILE, weights_only=True)["step"] == 2  # the original is untouched
    steps = [json.loads(line)["step"] for line in (tmp_path / "more" / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 3  # the log of the run so far, continued


def test_vocab_padding_defaults_to_64_on_a_gpu_and_a_checkpoint_keeps_its_own(finished_run, tmp_path):
    """On CUDA a fresh model's head gets 50,304 rows (16-byte aligned: the loss kernel's vector loads); on the
    CPU none unless asked; a run records what it used, and a checkpoint's padding cannot be changed."""
    from gpt.pretrain import _build_model

    assert _build_model(tiny(None), torch.device("cuda"))[0].config.pad_vocab_multiple == 64  # built on the CPU
    assert _build_model(tiny(None), torch.device("cpu"))[0].config.pad_vocab_multiple == 1
    assert load_checkpoint(finished_run).config.pad_vocab_multiple == 1
    train(tiny(tmp_path / "padded", pad_vocab_multiple=48, max_steps=1))
    model = load_checkpoint(tmp_path / "padded")
    assert model.config.pad_vocab_multiple == 48 and model.tok_emb.weight.shape[0] == 50304  # 50,257 -> 48 x 1048
    state = torch.load(tmp_path / "padded" / STATE_FILE, weights_only=True)
    assert state["train_config"]["pad_vocab_multiple"] == 48  # what a resume continues with
    x = torch.randint(0, 50257, (1, 8))
    assert model.eval()(x).shape == (1, 8, 50257)  # the padding never reaches the logits
    with pytest.raises(ValueError, match="--pad-vocab-multiple 64: .* padded to a multiple of 48"):
        train(tiny(tmp_path / "again", checkpoint=str(tmp_path / "padded"), pad_vocab_multiple=64))
    with pytest.raises(ValueError, match="--pad-vocab-multiple must be a positive integer"):
        train(tiny(tmp_path / "bad", pad_vocab_multiple=0))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case, error, match", [
    ("missing data", FileNotFoundError, "does not exist"),
    ("empty data", ValueError, "empty"),
    ("short text", ValueError, "fewer than one window"),
    ("short validation", ValueError, "validation split"),
    ("batch too big", ValueError, "fewer than one optimizer step"),
    ("bad backend", ValueError, "--kernels 'cuda-magic' is not a kernel backend"),
    ("bad lr", ValueError, "lr must be > 0"),
])
def test_bad_settings_and_data_are_clear_errors(tmp_path, case, error, match):
    text = tmp_path / "text.txt"
    kw = {}
    if case == "missing data":
        kw["data"] = str(tmp_path / "nope.txt")
    elif case == "empty data":
        text.write_text("")
        kw["data"] = str(text)
    elif case == "short text":
        text.write_text("Every effort moves you. " * 3)
        kw["data"] = str(text)
    elif case == "short validation":
        text.write_text("Every effort moves you. " * 40)  # 200 tokens: 20 for validation, a window needs 33
        kw["data"] = str(text)
    elif case == "batch too big":
        kw["batch_size"] = 1000
    elif case == "bad backend":
        kw["kernels"] = "cuda-magic"
    elif case == "bad lr":
        kw["lr"] = 0.0
    with pytest.raises(error, match=match):
        train(tiny(tmp_path / "out", **kw))
    assert not (tmp_path / "out" / STATE_FILE).exists()


def test_cli_prints_one_line_for_a_user_mistake(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt train: error:") and "does not exist" in err[0]


def test_a_new_run_never_overwrites_an_existing_one(finished_run):
    with pytest.raises(ValueError, match=f"already holds a pretraining run: continue it with --resume {finished_run}"):
        train(tiny(finished_run))


def test_resume_errors(finished_run, tmp_path):
    with pytest.raises(ValueError, match="trained with --preset 'tiny'"):
        train(TrainConfig(resume=str(finished_run), preset="mini"))
    with pytest.raises(ValueError, match="--batch-size 8"):
        train(TrainConfig(resume=str(finished_run), batch_size=8))
    with pytest.raises(FileNotFoundError, match="--resume '.*nope' does not exist"):
        train(TrainConfig(resume=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--resume '.*file' is a file, not a directory"):
        train(TrainConfig(resume=str(tmp_path / "file")))
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(finished_run / name, weights_only / name)
    with pytest.raises(CheckpointError, match="--checkpoint"):
        train(TrainConfig(resume=str(weights_only)))


@pytest.mark.parametrize("name", [STATE_FILE, "model.safetensors"])
def test_truncated_checkpoint_is_a_clear_error(finished_run, tmp_path, name):
    run = copy_run(finished_run, tmp_path)
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        train(TrainConfig(resume=str(run)))


def test_a_failed_save_keeps_the_previous_checkpoint(finished_run, tmp_path, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    before = {n: (run / n).read_bytes() for n in ("config.json", "model.safetensors", STATE_FILE)}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint there is intact"):
        train(TrainConfig(resume=str(run), max_steps=3))
    monkeypatch.undo()
    assert {n: (run / n).read_bytes() for n in before} == before
    assert not (run / ".saving").exists()
    assert train(TrainConfig(resume=str(run), max_steps=3)).step == 3  # and it still resumes


def test_a_save_cut_short_after_its_commit_is_finished_when_the_run_resumes(finished_run, tmp_path, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    moved, replace = [], os.replace

    def crash_after_one_file(src, dst):  # the staged files are complete and committed; then the machine dies
        if Path(src).parent.name == ".saving" and Path(dst).parent == run:
            moved.append(Path(dst).name)
            if len(moved) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_one_file)
    with pytest.raises(OSError, match="put in place when the run is resumed"):
        train(TrainConfig(resume=str(run), max_steps=3))
    monkeypatch.undo()
    assert (run / ".saving" / "COMMITTED").exists()  # half the files of step 3 in place, half still staged
    result = train(TrainConfig(resume=str(run), max_steps=4))  # finishes the save first, then goes on
    assert result.step == 4 and len(result.losses) == 1 and not (run / ".saving").exists()
    assert json.loads((run / "config.json").read_text())["step"] == 4


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_run_with_autocast_fused_adamw_and_the_default_kernels(tmp_path, dtype):
    run = tmp_path / "run"
    result = train(tiny(run, device="cuda", dtype=dtype, max_steps=6, lr=3e-3, eval_every=3))
    assert all(math.isfinite(x) for x in result.losses)
    assert result.evals[-1]["train_loss"] < result.evals[0]["train_loss"]
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    assert (state["scaler"] is not None) == (dtype == "float16")  # a grad scaler for fp16 only
    assert train(TrainConfig(resume=str(run), max_steps=8)).step == 8
    assert load_checkpoint(run).config.context_length == 32
