import json

import pytest
import torch

from gpt import GPT, CheckpointError, load_checkpoint, load_hf, save_checkpoint

transformers = pytest.importorskip("transformers")


def _hf_model(vocab=1000, tie=True):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_own_checkpoint_round_trip(tmp_path):
    model = GPT.from_preset("tiny").eval()
    save_checkpoint(model, tmp_path / "ck")
    rng = torch.random.get_rng_state()
    again = load_checkpoint(tmp_path / "ck").eval()
    assert torch.equal(torch.random.get_rng_state(), rng)  # no random initialisation before the weights come in
    assert again.config == model.config
    idx = torch.randint(0, 50257, (2, 6))
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
    assert again.head.weight is again.tok_emb.weight  # still tied after loading


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_gpt2_logits_match(tmp_path, fmt):
    hf = _hf_model()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_hf(tmp_path).eval()
    idx = torch.randint(0, 1000, (3, 17))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_hf_untied_and_padded_vocab(tmp_path):
    hf = _hf_model(tie=False)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, pad_vocab_multiple=64).eval()
    assert ours.tok_emb.weight.shape[0] == 1024
    idx = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_missing_and_wrong_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path / "empty")
    _hf_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="use load_hf"):
        load_checkpoint(tmp_path / "hf")


def test_truncated_and_mismatched_checkpoints(tmp_path):
    model = GPT.from_preset("tiny")
    save_checkpoint(model, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(model, tmp_path / "ck2")
    meta = json.loads((tmp_path / "ck2" / "config.json").read_text())
    meta["config"]["emb_dim"] = 128
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has shape .* another configuration"):
        load_checkpoint(tmp_path / "ck2")


def test_pickled_code_in_a_bin_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _hf_model().config.save_pretrained(tmp_path)
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could not read .* safely"):
        load_hf(tmp_path)
