import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gpt import GPT, GPTClassifier, save_checkpoint
from gpt.classify import (
    ClassificationDataset,
    accuracy,
    balance_classes,
    class_names,
    classification_loss,
    collate_classification,
    finetune_classifier,
    read_sms_spam,
    read_table,
    split_examples,
)
from gpt.cli import main
from gpt.finetune import FinetuneConfig, load_finetuned, set_trainable
from gpt.instruct import (
    InstructionDataset,
    collate_instructions,
    finetune_instruct,
    format_prompt,
    instruction_loss,
    lcs_length,
    load_instruction_data,
    rouge_l_f1,
    split_instruction_data,
    validate_instruction_data,
)
from gpt.tokenizer import EOT_ID
from gpt.trainer_state import STATE_FILE

# ------------------------------------------------------------------------------------------ data handling


def test_instruction_collate_on_a_hand_made_batch():
    # the book's example (chapter 7): three sequences of different lengths
    batch = [([0, 1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 2)]
    inputs, targets = collate_instructions(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT_ID, EOT_ID, EOT_ID], [7, 8, 9, EOT_ID, EOT_ID]]
    # the first end-of-text is a target (the model learns to stop), the rest of the padding is ignored
    assert targets.tolist() == [[1, 2, 3, 4, EOT_ID], [6, EOT_ID, -100, -100, -100], [8, 9, EOT_ID, -100, -100]]

    inputs, targets = collate_instructions(batch, max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, EOT_ID], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, EOT_ID, -100], [8, 9, EOT_ID]]

    # mask the prompt: the targets that are prompt tokens (token 1 .. p-1) are ignored
    inputs, targets = collate_instructions(batch, mask_prompt=True)
    assert inputs.tolist()[0] == [0, 1, 2, 3, 4]
    assert targets.tolist() == [[-100, 2, 3, 4, EOT_ID], [6, EOT_ID, -100, -100, -100], [-100, 9, EOT_ID, -100, -100]]


def test_alpaca_prompt_format():
    with_input = format_prompt({"instruction": "Edit the sentence.", "input": "He go.", "output": "He goes."})
    assert with_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\nEdit the sentence.\n\n### Input:\nHe go."
                          "\n\n### Response:\n")
    assert "### Input" not in format_prompt({"instruction": "Name a color.", "input": "", "output": "Red."})


def test_bundled_instruction_data_splits_85_5_10():
    data = load_instruction_data()
    train, val, test = split_instruction_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)  # the book's sizes


def test_classification_collate_pads_and_records_lengths():
    ids, lengths, labels = collate_classification([([5, 6, 7], 1), ([8], 0)])
    assert ids.tolist() == [[5, 6, 7], [8, EOT_ID, EOT_ID]]
    assert lengths.tolist() == [3, 1] and labels.tolist() == [1, 0]


def test_spam_data_is_balanced_and_split_70_10_20():
    texts, labels = read_sms_spam()
    assert class_names(labels) == ["ham", "spam"]
    examples = balance_classes(texts, labels, seed=123)
    assert sum(1 for _, lab in examples if lab == "ham") == sum(1 for _, lab in examples if lab == "spam") == 747
    train, val, test = split_examples(examples, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's sizes
    assert split_examples(examples, seed=123)[0] == train and split_examples(examples, seed=7)[0] != train
    limited = balance_classes(texts, labels, seed=123, limit=21)
    assert sorted(lab for _, lab in limited) == ["ham"] * 10 + ["spam"] * 10


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])  # predicts 0, 1, 0, 0
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.5
    assert accuracy(logits, torch.tensor([0, 1, 0, 0])) == 1.0


def test_rouge_l_f1():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l_f1("The cat sat.", "the cat sat") == 1.0
    assert rouge_l_f1("dog", "the cat sat") == 0.0
    # LCS "the cat" = 2 words; precision 2/3, recall 2/4 -> F1 = 4/7
    assert rouge_l_f1("the big cat", "the cat sat down") == pytest.approx(4 / 7)


# ------------------------------------------------------------------------------------------------ models


def test_classifier_reads_the_last_real_token_so_padding_changes_nothing():
    model = GPTClassifier(GPT.from_preset("tiny", dropout=0.0), 3).eval()
    a, b = [11, 22, 33, 44, 55], [66, 77]
    ids, lengths, _ = collate_classification([(a, 0), (b, 1)])
    with torch.no_grad():
        batched = model(ids, lengths)  # (2, 3)
        alone = torch.cat([model(torch.tensor([a])), model(torch.tensor([b]))])
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_last_block_mode_trains_the_last_block_final_norm_and_new_head():
    model = GPTClassifier(GPT.from_preset("tiny"), 2)
    set_trainable(model.gpt, "last-block", new_modules=[model.head])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = model.gpt.config.n_layers - 1
    assert trainable and all(n.startswith((f"gpt.blocks.{last}.", "gpt.final_norm.", "head.")) for n in trainable)
    assert {"head.weight", "head.bias", "gpt.final_norm.weight", f"gpt.blocks.{last}.mlp.fc.weight"} <= trainable


def take_steps(model, batch, loss_fn, steps: int, lr: float) -> None:
    """Plain AdamW steps on one batch: the loss function alone, without the engine."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_classifier_loss_falls_over_a_few_steps():
    torch.manual_seed(0)
    model = GPTClassifier(GPT.from_preset("tiny", dropout=0.0, vocab_size=1000), 2)  # a small vocabulary: fast
    set_trainable(model.gpt, "last-block", new_modules=[model.head])
    batch = collate_classification([(torch.randint(0, 1000, (int(n),)).tolist(), i % 2)
                                    for i, n in enumerate(torch.randint(3, 12, (8,)))], pad_id=999)
    before = classification_loss(model, batch).item()
    take_steps(model, batch, classification_loss, steps=15, lr=1e-3)
    after = classification_loss(model, batch).item()
    assert after < 0.5 * before


def test_instruction_loss_falls_over_a_few_steps():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", dropout=0.0, vocab_size=1000)  # a small vocabulary: fast
    # two "records": (token ids of prompt + response, prompt length)
    records = [(torch.randint(0, 999, (20,)).tolist(), 12), (torch.randint(0, 999, (14,)).tolist(), 9)]
    batch = collate_instructions(records, pad_id=999, mask_prompt=True)
    model.eval()
    before = instruction_loss(model, batch).item()
    take_steps(model.train(), batch, instruction_loss, steps=12, lr=3e-3)
    model.eval()
    after = instruction_loss(model, batch).item()
    assert after < before - 2.0


# ------------------------------------------------------------------------------------ commands, end to end

FAST = ["--preset", "tiny", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def test_classifier_command_end_to_end_then_classify(tmp_path, capsys):
    out = tmp_path / "cls"
    assert main(["finetune-classifier", *FAST, "--limit", "20", "--out", str(out), "--lr", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert "train/val/test 14/2/4" in text and "trainable parameters" in text
    assert "train loss" in text and "val loss" in text and "test loss" in text
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["labels"] == ["ham", "spam"] and len(meta["history"]) == 1
    assert {"train_accuracy", "val_accuracy", "test_accuracy"} <= set(meta["history"][0])

    assert main(["classify", "--checkpoint", str(out), "WIN a FREE prize now!!"]) == 0
    label, prob = capsys.readouterr().out.split()
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0


def test_classifier_stopped_by_max_steps_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path, capsys):
    # issue 14's case: a resume used to record the stopped epoch as done and skip the rest of it
    args = ["finetune-classifier", "--preset", "tiny", "--limit", "20", "--batch-size", "2", "--lr", "1e-3",
            "--eval-batches", "1", "--dropout", "0.1", "--device", "cpu"]  # 7 steps an epoch
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--max-steps", "3", "--out", str(tmp_path / "part")]) == 0  # (one or the other: issue 27)
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume", str(tmp_path / "part"), "--out", str(tmp_path / "part")]) == 0
    printed = capsys.readouterr().out
    assert "resumed at step 3" in printed and "epoch 1/2 (step 7)" in printed and "epoch 2/2 (step 14)" in printed
    whole, meta = load_finetuned(tmp_path / "whole")
    resumed, resumed_meta = load_finetuned(tmp_path / "part")
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert [r["step"] for r in resumed_meta["history"]] == [3, 7, 14]  # the stop's evaluation, then as whole

    def evaluated(r):  # the running loss covers the steps since the previous evaluation: here since step 3
        return {k: v for k, v in r.items() if k not in ("time", "speed", "running_train_loss")}

    assert list(map(evaluated, resumed_meta["history"][1:])) == list(map(evaluated, meta["history"]))


def test_instruct_stopped_by_max_steps_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path):
    kw = dict(preset="tiny", limit=10, batch_size=2, lr=1e-3, dropout=0.1, max_new_tokens=2, device="cpu")
    whole = finetune_instruct(FinetuneConfig(**kw, epochs=2, out=str(tmp_path / "whole")))  # 4 steps an epoch
    finetune_instruct(FinetuneConfig(**kw, max_steps=3, out=str(tmp_path / "part")))
    resumed = finetune_instruct(FinetuneConfig(resume=str(tmp_path / "part"), epochs=2))
    assert resumed.step == whole.step == 8 and resumed.losses == whole.losses[3:]
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for key in ("val_loss", "test_loss", "test_rouge_l_f1"):  # (train_loss: the mean since the last evaluation)
        assert resumed.metrics[key] == whole.metrics[key], key


def test_python_api_finetunes_without_argparse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = finetune_classifier(FinetuneConfig(preset="tiny", limit=20, batch_size=4, max_steps=2, device="cpu"))
    assert result.out_dir.parent == Path("runs") and result.out_dir.name.startswith("classifier-")
    assert result.step == 2 and len(result.losses) == 2
    assert {"train_accuracy", "val_accuracy", "test_accuracy", "val_loss"} <= set(result.metrics)
    model, meta = load_finetuned(result.out_dir)
    assert isinstance(model, GPTClassifier) and meta["labels"] == ["ham", "spam"]


def test_finetuning_accumulates_clips_and_autocasts_through_the_engine(tmp_path, monkeypatch, capsys):
    base = dict(preset="tiny", limit=20, max_steps=3, eval_batches=1, lr=1e-3, device="cpu", trainable="all")
    big = finetune_classifier(FinetuneConfig(**base, batch_size=4, out=str(tmp_path / "big")))
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: clipped.append(m) or clip(p, m))
    acc = finetune_classifier(FinetuneConfig(**base, batch_size=2, examples_per_step=4, grad_clip=50.0,
                                             out=str(tmp_path / "acc")))
    assert clipped == [50.0] * 3  # a norm this large clips nothing, so the curves below must agree
    assert "4 examples per step = 2 per batch x 2 accumulation" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(big.losses), rtol=0, atol=1e-5)
    bf16 = finetune_classifier(FinetuneConfig(**base, batch_size=4, dtype="bfloat16", out=str(tmp_path / "bf16")))
    assert "bfloat16 on cpu" in capsys.readouterr().out
    assert all(math.isfinite(x) for x in bf16.losses) and bf16.losses != big.losses  # autocast changed the math
    assert bf16.losses == pytest.approx(big.losses, abs=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("job", ["classifier", "instruct"])
def test_finetuning_on_cuda_with_float16_and_a_grad_scaler(tmp_path, job):
    fn = finetune_classifier if job == "classifier" else finetune_instruct
    result = fn(FinetuneConfig(preset="tiny", limit=20, batch_size=4, max_steps=4, lr=1e-3, device="cuda",
                               dtype="float16", max_new_tokens=2, out=str(tmp_path / "run")))
    assert all(math.isfinite(x) for x in result.losses)
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)
    assert state["scaler"] is not None and all(g["fused"] for g in state["optimizer"]["param_groups"])


def test_classifier_from_csv_with_lora_and_merge(tmp_path, capsys):
    texts, labels = read_sms_spam()
    rows = [(t, lab) for t, lab in zip(texts, labels)]
    picked = [r for r in rows if r[1] == "spam"][:6] + [r for r in rows if r[1] == "ham"][:6]
    data = tmp_path / "msgs.txt"  # no .csv/.tsv extension: the delimiter is sniffed
    data.write_text("id;message;kind\n" + "".join(f"{i};{t.replace(';', ',')};{lab}\n"
                                                  for i, (t, lab) in enumerate(picked)))
    ck = tmp_path / "base"
    save_checkpoint(GPT.from_preset("tiny"), ck)
    out = tmp_path / "lora"
    argv = ["finetune-classifier", "--checkpoint", str(ck), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--data", str(data), "--text-column", "message", "--label-column", "kind", "--lora-rank", "2",
            "--lora-alpha", "4", "--merge", "--out", str(out)]
    assert main(argv) == 0
    assert "LoRA rank 2" in capsys.readouterr().out
    assert (out / "adapters.safetensors").exists() and not (out / "model.safetensors").exists()
    model, meta = load_finetuned(out)
    merged, _ = load_finetuned(out / "merged")
    ids, lengths, _ = collate_classification([([1, 2, 3], 0), ([4, 5], 1)])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, lengths), model(ids, lengths), rtol=1e-5, atol=1e-5)
    assert main(["lora-merge", "--checkpoint", str(out), "--out", str(tmp_path / "m2")]) == 0


def test_classifier_from_a_hugging_face_gpt2(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    argv = ["finetune-classifier", "--hf", str(tmp_path / "hf"), "--limit", "20", "--epochs", "1", "--device",
            "cpu", "--out", str(tmp_path / "out"), "--max-length", "32"]
    assert main(argv) == 0
    assert "GPT-2 weights from" in capsys.readouterr().out


def test_instruct_command_end_to_end_then_chat(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ins"
    argv = ["finetune-instruct", *FAST, "--limit", "10", "--max-new-tokens", "3", "--mask-prompt", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "train/val/test 8/1/1" in text and "test loss" in text and "ROUGE-L F1" in text
    responses = json.loads((out / "test-responses.json").read_text())
    assert len(responses) == 1 and {"instruction", "output", "model_response", "rouge_l_f1"} <= set(responses[0])
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["mask_prompt"] and "test_rouge_l_f1" in meta and "test_loss" in meta

    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\n\nWhat is 2 + 2?\n"))
    assert main(["chat", "--checkpoint", str(out), "--max-new-tokens", "3"]) == 0
    answers = capsys.readouterr().out.split("\n")
    assert len(answers) == 4 and answers[1] == answers[3] == ""  # a line for every line read, the empty one empty


def test_instruct_with_lora_saves_only_adapters(tmp_path, capsys):
    out = tmp_path / "ins"
    argv = ["finetune-instruct", "--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--limit", "10",
            "--max-new-tokens", "2", "--trainable", "lora", "--max-steps", "1", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "adapters.safetensors").exists() and (out / "base" / "model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    assert main(["lora-merge", "--checkpoint", str(out), "--out", str(tmp_path / "merged")]) == 0
    # the merged model is an ordinary checkpoint: gpt generate reads it
    assert main(["generate", "--checkpoint", str(tmp_path / "merged"), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0


def test_instruct_pads_the_head_of_gpt2_weights_and_the_padding_never_reaches_the_loss(tmp_path):
    """On CUDA an instruction run pads a GPT-2 or fresh model's head to 50,304 rows (64 x 786, as gpt train
    does; asked for here on the CPU): the same losses as unpadded; LoRA adapters find their base padded
    again (chat, merge); the run records the padding and a resume keeps it. A classifier, which replaces the
    head, is not padded; a checkpoint keeps its own padding."""
    transformers = pytest.importorskip("transformers")
    from gpt.weights import vocab_padding

    on_gpu = {"pad_vocab_multiple": 64}
    assert vocab_padding("hf", None, "cuda") == vocab_padding("preset", None, torch.device("cuda", 1)) == on_gpu
    assert vocab_padding("hf", None, "cpu") == {"pad_vocab_multiple": 1}
    assert vocab_padding("checkpoint", None, "cuda") == {}  # a checkpoint keeps its own
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    common = dict(hf=str(tmp_path / "hf"), limit=10, batch_size=4, max_steps=2, eval_batches=1, max_new_tokens=2,
                  lora_rank=2, lr=1e-3, device="cpu")
    runs = {pad: finetune_instruct(FinetuneConfig(**common, pad_vocab_multiple=pad, out=str(tmp_path / f"pad{pad}")))
            for pad in (1, 64)}
    torch.testing.assert_close(torch.tensor(runs[64].losses), torch.tensor(runs[1].losses), rtol=1e-5, atol=1e-6)
    model, meta = load_finetuned(tmp_path / "pad64")
    assert model.config.pad_vocab_multiple == 64 and model.tok_emb.weight.shape == (50304, 32)
    assert meta["config"]["pad_vocab_multiple"] == 64
    x = torch.randint(0, 50257, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_finetuned(tmp_path / "pad1")[0](x), rtol=1e-5, atol=1e-5)
    assert main(["lora-merge", "--checkpoint", str(tmp_path / "pad64"), "--out", str(tmp_path / "merged")]) == 0
    assert load_finetuned(tmp_path / "merged")[0].tok_emb.weight.shape == (50304, 32)
    state = torch.load(tmp_path / "pad64" / STATE_FILE, weights_only=True)
    assert state["train_config"]["pad_vocab_multiple"] == 64
    with pytest.raises(ValueError, match="resume .* with --pad-vocab-multiple 1: .* with --pad-vocab-multiple 64"):
        finetune_instruct(FinetuneConfig(resume=str(tmp_path / "pad64"), pad_vocab_multiple=1, max_steps=3))
    with pytest.raises(ValueError, match="--pad-vocab-multiple pads the output head, which .* does not use"):
        finetune_classifier(FinetuneConfig(**{**common, "lora_rank": None}, pad_vocab_multiple=64,
                                           out=str(tmp_path / "clf")))
    with pytest.raises(ValueError, match="--pad-vocab-multiple 1: the model in .* padded to a multiple of 64"):
        finetune_instruct(FinetuneConfig(checkpoint=str(tmp_path / "merged"), limit=10, device="cpu",
                                         pad_vocab_multiple=1, out=str(tmp_path / "again")))


# --------------------------------------------------------------------------------------------- bad input


def test_table_errors(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,category\nhello,a\nbye,b\n")
    with pytest.raises(ValueError, match="no column 'label'.*--label-column"):
        read_table(f)
    assert read_table(f, label_column="category") == (["hello", "bye"], ["a", "b"])
    with pytest.raises(ValueError, match="only one class"):
        class_names(["ham", "ham"], "d.csv")
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="too few"):
        split_examples([("x", "a")] * 5)


def test_instruction_data_errors(tmp_path):
    for bad, match in [({"instruction": "x"}, "must be a JSON list"), ([], "empty list"),
                       (["text"], "record 0 is a str"), ([{"instruction": "x"}], "record 0 has no 'output'"),
                       ([{"instruction": "x", "output": 3}], "non-text 'output'")]:
        with pytest.raises(ValueError, match=match):
            validate_instruction_data(bad)
    f = tmp_path / "bad.json"
    f.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_instruction_data(f)
    with pytest.raises(ValueError, match="longer than the maximum length of 10 tokens"):
        InstructionDataset(load_instruction_data()[:3], max_length=10)
    assert len(ClassificationDataset([("hi there", "a")], ["a", "b"], max_length=1)[0][0]) == 1


@pytest.mark.parametrize("extra, match", [
    (["finetune-instruct", "--max-length", "20"], "longer than the maximum length of 20"),
    (["finetune-instruct", "--max-length", "65"], "between 1 and the model's context length 64"),
    (["finetune-classifier", "--label-column", "nope", "--data", "{csv}"], "no column 'nope'"),
    (["finetune-classifier", "--data", "{one_class}"], "only one class"),
    (["finetune-instruct", "--data", "{not_records}"], "must be a JSON list"),
    (["finetune-classifier", "--trainable", "all", "--lora-rank", "4"], "go with --trainable lora"),
    (["finetune-classifier", "--limit", "1"], "fewer than one example per class"),
    (["classify", "--checkpoint", "/no/such/dir", "x"], "does not exist"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, extra, match):
    (tmp_path / "d.csv").write_text("text,label\nhi,a\nyo,b\n")
    (tmp_path / "one.csv").write_text("text,label\nhi,a\nyo,a\n")
    (tmp_path / "nr.json").write_text('{"instruction": "x", "output": "y"}')
    files = {"csv": tmp_path / "d.csv", "one_class": tmp_path / "one.csv", "not_records": tmp_path / "nr.json"}
    argv = [a.format(**files) for a in extra]
    if argv[0].startswith("finetune"):
        argv += ["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out")]
        if "--limit" not in argv:
            argv += ["--limit", "20"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
