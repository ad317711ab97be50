"""Bad input a new user gives the commands (issue 15, items 3, 4, 5, 11 and 12): each is refused with the exit
code 1 and one line on stderr that says what was wrong and what to do, and nothing is written or lost.

Text that is not UTF-8 is refused, not decoded with U+FFFD in place of the bytes that do not fit (GPT-2's BPE
reads UTF-8 bytes; another encoding would train on garbage), naming the file (or stdin, or the option) and
the first bad byte's offset and line. An explicit --encoding was the other way; converting a file is one
iconv away, and an encoding setting would have to be threaded through every reader and recorded for --resume.
"""

import hashlib
import io
import json
import sys
from pathlib import Path

import pytest

from gpt import GPT, save_checkpoint
from gpt.cli import main
from gpt.finetune import FinetuneConfig
from gpt.instruct import finetune_instruct

GOOD = "Every effort moves you.\n" * 60  # 60 lines of UTF-8, 1,440 bytes
LATIN1 = "Caf\xe9 au lait.\n".encode("latin-1")  # the \xe9 is byte 3
TINY = ["--preset", "tiny", "--device", "cpu", "--out", "out"]


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its content's hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, capsys, *matches) -> str:
    """Run the command; it must exit 1 with one error line holding every one of ``matches``."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]  # (a progress bar may precede it)
    assert len(errors) == 1 and errors[0] == captured.err.strip().splitlines()[-1], captured.err
    assert "Traceback" not in captured.err
    for m in matches:
        assert m in errors[0], errors[0]
    return captured.out


def stdin(monkeypatch, data: bytes) -> None:
    """Put ``data`` on stdin as the bytes a pipe delivers."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# ------------------------------------------------------------------------------------------ item 3: UTF-8


def write_data(tmp_path: Path, command: str) -> tuple[list[str], str, int, int]:
    """A data file (or directory) for ``command`` whose one Latin-1 byte comes after some good text: (its
    argv, the path the error names, the bad byte's offset, its line)."""
    if command == "train, a text file":
        path = tmp_path / "book.txt"
        path.write_bytes(GOOD.encode() + LATIN1)
        return ["train", "--data", str(path)], str(path), len(GOOD) + 3, 61
    if command == "train, a directory":  # through the token file, in chunks
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text(GOOD)
        (corpus / "b.txt").write_bytes(GOOD.encode() + LATIN1)
        return ["train", "--data", str(corpus)], str(corpus / "b.txt"), len(GOOD) + 3, 61
    if command == "finetune-classifier":
        path = tmp_path / "messages.csv"
        path.write_bytes(b"text,label\n" + b"hello there,ham\n" * 10 + b"Caf\xe9 offer,spam\n")
        return ["finetune-classifier", "--data", str(path)], str(path), 11 + 16 * 10 + 3, 12
    path = tmp_path / "instructions.json"
    path.write_bytes(b'[{"instruction": "Name a drink.", "output": "Caf\xe9."}]')
    return ["finetune-instruct", "--data", str(path)], str(path), 48, 1


@pytest.mark.parametrize("command", ["train, a text file", "train, a directory", "finetune-classifier",
                                     "finetune-instruct"])
def test_data_that_is_not_utf8_is_refused_naming_the_file_and_the_byte(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    argv, path, offset, line = write_data(tmp_path, command)
    before = snapshot(tmp_path)
    refused([*argv, *TINY], capsys, f"{path} is not UTF-8 text: byte 0xe9 at byte offset {offset:,} (line {line})",
            "iconv")
    assert snapshot(tmp_path) == before  # no run directory, no token file, nothing touched


def test_stdin_and_arguments_that_are_not_utf8_are_refused(tiny_runs, monkeypatch, capsys):
    stdin(monkeypatch, b"hello\n" + LATIN1)
    out = refused(["classify", "--checkpoint", str(tiny_runs / "classifier")], capsys,
                  "stdin is not UTF-8 text: byte 0xe9 at byte offset 9 (line 2)")
    assert out == ""  # nothing classified from half the input
    # Python hands a command-line argument's undecodable byte over as a lone surrogate: \xe9 -> \udce9
    refused(["generate", "--prompt", "Caf\udce9", "--preset", "tiny"], capsys,
            "--prompt is not UTF-8 text: byte 0xe9 at byte offset 3")
    refused(["classify", "--checkpoint", str(tiny_runs / "classifier"), "Caf\udce9"], capsys,
            "the text to classify is not UTF-8 text: byte 0xe9")


# ------------------------------------------------------------------------------------------ item 4


def test_tokens_per_step_that_is_not_a_whole_number_of_micro_steps_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # batch 2 x context 32 x 1 process = 64 tokens a micro-step
    refused(["train", "--context-length", "32", "--tokens-per-step", "100", *TINY], capsys,
            "--tokens-per-step 100 is not a multiple of the 64 tokens of a micro-step", "use 64 or 128")
    refused(["train", "--context-length", "32", "--tokens-per-step", "10", *TINY], capsys, "use 64,")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ item 5: chat


def test_chat_refuses_a_model_not_finetuned_on_instructions(tiny_runs, monkeypatch, capsys):
    stdin(monkeypatch, b"Name a color.\n")
    out = refused(["chat", "--checkpoint", str(tiny_runs / "pretraining")], capsys, "holds a pretrained model, not one "
                  "finetuned to follow instructions", f"gpt finetune-instruct --checkpoint {tiny_runs / 'pretraining'}")
    assert out == ""
    stdin(monkeypatch, b"Name a color.\n")
    refused(["chat", "--checkpoint", str(tiny_runs / "classifier")], capsys, "holds a classifier")


def test_chat_reports_each_line_it_cannot_answer_answers_the_rest_and_exits_1(tiny_runs, monkeypatch, capsys):
    too_long = " ".join(["word"] * 80)  # tiny's context is 64 tokens
    stdin(monkeypatch, b"Name a color.\n" + too_long.encode() + b"\n" + LATIN1 + b"What is 2 + 2?\n")
    assert main(["chat", "--checkpoint", str(tiny_runs / "instruct"), "--max-new-tokens", "2"]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()  # one line for each line read (issue 27, item 7): lines 1 and 4 answered
    assert len(out) == 4 and out[1].startswith("[error] line 2: ") and out[2].startswith("[error] line 3: ")
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert errors[0].startswith("gpt chat: error: line 2: the instruction is too long") and "context of 64" in errors[0]
    assert errors[1].startswith("gpt chat: error: line 3: stdin is not UTF-8 text: byte 0xe9 at byte offset "
                                f"{14 + len(too_long) + 1 + 3} (line 3)")


# ------------------------------------------------------------------------------------------ item 11: LoRA


def test_a_lora_run_given_where_a_whole_model_is_needed_points_to_lora_merge(tiny_runs, capsys):
    lora = tiny_runs / "lora"
    before = snapshot(tiny_runs)
    refused(["generate", "--checkpoint", str(lora), "--prompt", "Hi"], capsys, "holds LoRA adapters, not a whole "
            f"model: merge them into their base model with `gpt lora-merge --checkpoint {lora} --out NEW_DIR`")
    refused(["train", "--checkpoint", str(lora), "--max-steps", "1", "--out", str(tiny_runs / "new")], capsys,
            "gpt lora-merge --checkpoint")
    assert snapshot(tiny_runs) == before and not (tiny_runs / "new").exists()


def test_a_moved_lora_base_is_named_as_the_runs_base_model(tmp_path, capsys):
    save_checkpoint(GPT.from_preset("tiny"), tmp_path / "base")
    lora = tmp_path / "lora"
    finetune_instruct(FinetuneConfig(checkpoint=str(tmp_path / "base"), limit=10, max_steps=1, eval_batches=1,
                                     max_new_tokens=2, lora_rank=2, device="cpu", out=str(lora)))
    (tmp_path / "base").rename(tmp_path / "moved")
    before = snapshot(tmp_path)
    for argv in (["lora-merge", "--checkpoint", str(lora), "--out", str(tmp_path / "merged")],
                 ["chat", "--checkpoint", str(lora)]):
        refused(argv, capsys, f"the base model of the LoRA adapters in {lora} is gone", f"names '{tmp_path / 'base'}'"
                ", which does not exist. Put that model back there")
    assert snapshot(tmp_path) == before and not (tmp_path / "merged").exists()
    assert json.loads((lora / "finetune.json").read_text())["base"] == {"checkpoint": str(tmp_path / "base")}


# ------------------------------------------------------------------------------------------ item 12


@pytest.mark.parametrize("case", ["classifier data is a directory", "instruction data is a directory",
                                  "classify checkpoint is a file", "chat checkpoint is a file",
                                  "lora-merge checkpoint is a file", "resume is a file"])
def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("notes")
    before = snapshot(tmp_path)
    stdin(monkeypatch, b"Name a color.\n")
    data = tmp_path / "data"
    argv, match = {
        "classifier data is a directory": (["finetune-classifier", "--data", "data", *TINY],
                                           f"data file '{data}' is a directory, not a file: give a CSV or TSV file"),
        "instruction data is a directory": (["finetune-instruct", "--data", "data", *TINY],
                                            f"instruction file '{data}' is a directory, not a file: give a JSON file"),
        "classify checkpoint is a file": (["classify", "--checkpoint", "notes.txt", "hi"],
                                          "'notes.txt' is a file, not a directory"),
        "chat checkpoint is a file": (["chat", "--checkpoint", "notes.txt"], "'notes.txt' is a file, not a directory"),
        "lora-merge checkpoint is a file": (["lora-merge", "--checkpoint", "notes.txt", "--out", "m"],
                                            "'notes.txt' is a file, not a directory"),
        "resume is a file": (["train", "--resume", "notes.txt"], "--resume 'notes.txt' is a file, not a directory"),
    }[case]
    refused(argv, capsys, match)
    assert "does not exist" not in match
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]
