"""gpt export / export_hf: transformers loads the directory and computes what our model computes.

The oracle is transformers itself (GPT2LMHeadModel, GPT2ForSequenceClassification, AutoTokenizer), loading
offline from the exported directory; the models are the tiny runs of tests/gpt/conftest.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from gpt import GPT, GPTClassifier, export_hf, load_checkpoint, load_hf, load_hf_classifier
from gpt.cli import main
from gpt.finetune import load_finetuned
from gpt.hf_export import export_run
from gpt.lora import apply_lora, has_lora
from gpt.tokenizer import encode

transformers = pytest.importorskip("transformers")

VARIED_TEXT = ("Every effort moves you.\n\n  Two spaces,\ttabs,   three spaces; don't we'll I'd\r\n"
               "Ünïcödé: naïve café, 日本語のテキスト, 🙂👍🏽, Ελληνικά, emoji🙂glued, 3.14159 and 1,000,000!\n \n"
               "Spaces before marks , . ! ? 's n't are kept .")


def _hf_lm(directory):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _ids(n=2, t=11):
    return torch.randint(0, 50257, (n, t))


def test_pretraining_run_round_trip(tiny_runs, tmp_path):
    out, what = export_run(tiny_runs / "pretraining", tmp_path / "hf")
    assert "GPT2LMHeadModel" in what
    ours = load_checkpoint(tiny_runs / "pretraining").eval()
    hf = _hf_lm(out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied again
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # and stored once
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-5)
    back = load_hf(out).eval()  # our loader gives back the same model: config and every tensor
    assert back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_lora_instruction_run_exports_merged(tiny_runs, tmp_path):
    adapters, meta = load_finetuned(tiny_runs / "lora")
    assert has_lora(adapters) and meta["task"] == "instruct"
    with torch.no_grad():  # the adapters' B starts at zero: move it, so the merge has something to add
        for name, p in adapters.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    out = export_hf(adapters, tmp_path / "hf")
    assert has_lora(adapters)  # merged on a copy
    hf = _hf_lm(out)
    idx = _ids()
    with torch.no_grad():
        ref = adapters(idx)
        torch.testing.assert_close(hf(idx).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_hf(out).eval()(idx), ref, rtol=0, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256


def test_lora_run_through_the_command_line(tiny_runs, tmp_path, capsys):
    assert main(["export", str(tiny_runs / "lora"), "--to", str(tmp_path / "hf")]) == 0
    assert "LoRA adapters merged" in capsys.readouterr().out
    ours, _ = load_finetuned(tiny_runs / "lora")
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_hf_lm(tmp_path / "hf")(idx).logits, ours(idx), rtol=0, atol=1e-5)


def test_classifier_run_exports_its_labels_and_scores(tiny_runs, tmp_path):
    out, what = export_run(tiny_runs / "classifier", tmp_path / "hf")
    ours, meta = load_finetuned(tiny_runs / "classifier")
    assert meta["labels"][0] in what
    with torch.no_grad():
        ours.head.bias.normal_()  # a bias far from zero: it must move into ln_f exactly
    out = export_hf(ours, tmp_path / "hf2", labels=meta["labels"])
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    assert [hf.config.id2label[i] for i in range(len(meta["labels"]))] == meta["labels"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["Free entry in a weekly competition!", "ok see you at home later then"]
    batch = tok(texts, padding=True, return_tensors="pt")  # right-padded with <|endoftext|>, as ours
    lengths = batch["attention_mask"].sum(1)
    with torch.no_grad():
        scores = hf(**batch).logits
        ref = ours(batch["input_ids"], lengths)
        torch.testing.assert_close(scores, ref, rtol=0, atol=1e-5)
        back, labels = load_hf_classifier(out)
        torch.testing.assert_close(back.eval()(batch["input_ids"], lengths), ref, rtol=0, atol=1e-5)
    assert labels == meta["labels"]


def test_hf_tokenizer_gives_our_ids(tmp_path):
    export_hf(GPT.from_preset("tiny"), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(VARIED_TEXT)["input_ids"]
    assert ids == encode(VARIED_TEXT) and len(ids) > 50
    assert tok.decode(ids) == VARIED_TEXT
    assert tok("a<|endoftext|>b")["input_ids"] == encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.eos_token_id == 50256 and tok.model_max_length == 64


def test_untied_padded_model_with_qkv_bias(tmp_path):
    model = GPT.from_preset("tiny", tie_weights=False, pad_vocab_multiple=64, qkv_bias=True).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_()
    export_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert state["lm_head.weight"].shape == state["transformer.wte.weight"].shape == (50257, 64)  # padding cut
    hf = _hf_lm(tmp_path)
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)
        back = load_hf(tmp_path).eval()
        assert back.config == model.config
        torch.testing.assert_close(back(idx), model(idx), rtol=0, atol=0)


def test_a_directory_that_is_not_empty_is_refused_unless_forced(tiny_runs, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer.json").write_text("{}")  # another save's: transformers would read it before vocab.json
    assert main(["export", str(tiny_runs / "pretraining"), "--to", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tokenizer.json"]  # nothing written
    assert main(["export", str(tiny_runs / "pretraining"), "--to", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "tokenizer.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(out)("hi there")["input_ids"] == encode("hi there")
    with pytest.raises(ValueError, match="the run itself"):
        export_run(tiny_runs / "pretraining", tiny_runs / "pretraining", force=True)


def test_what_hf_gpt2_cannot_hold_is_refused(tmp_path):
    model = GPT.from_preset("tiny")
    model.blocks[0].extra = torch.nn.Linear(4, 4)  # a layer HF's GPT-2 has no place for
    with pytest.raises(ValueError, match="no place for.*blocks.0.extra"):
        export_hf(model, tmp_path / "a")
    classifier = GPTClassifier(GPT.from_preset("tiny"), 2)
    with torch.no_grad():  # two equal rows with different biases: no ln_f bias can give both
        classifier.head.weight[1] = classifier.head.weight[0]
        classifier.head.bias.copy_(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="cannot be moved into the final LayerNorm"):
        export_hf(classifier, tmp_path / "b")
    with pytest.raises(ValueError, match="2 classes"):
        export_hf(GPTClassifier(GPT.from_preset("tiny"), 2), tmp_path / "c", labels=["one"])
    with pytest.raises(ValueError, match="tokenizer=False"):
        export_hf(GPT.from_preset("tiny", vocab_size=503), tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before writing anything
    export_hf(GPT.from_preset("tiny", vocab_size=503), tmp_path / "e", tokenizer=False)
    assert not (tmp_path / "e" / "vocab.json").exists()


def test_load_hf_refuses_settings_our_model_lacks(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  activation_function="relu")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function.*relu"):
        load_hf(tmp_path)


def test_exported_lora_model_with_adapters_still_trains_after(tmp_path):
    """export_hf merges a copy: the model being trained keeps its adapters and its trainable set."""
    model = GPT.from_preset("tiny")
    apply_lora(model, 2, 2.0)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    export_hf(model, tmp_path)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before and before
