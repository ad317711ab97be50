import math

import pytest
import torch

import gpt_kernels
from gpt import GPT, GPTClassifier, GPTConfig
from gpt.config import PRESETS
from gpt_kernels.backend import get_backend


def _count(cfg):
    with torch.device("meta"):
        return GPT(cfg).num_parameters()


def test_gpt2_small_parameter_counts_tied_and_untied():
    assert _count(GPTConfig.from_preset("gpt2-small", tie_weights=False)) == 163_009_536
    assert _count(GPTConfig.from_preset("gpt2-small", tie_weights=True)) == 124_412_160


def test_presets_and_unknown_preset():
    assert set(PRESETS) >= {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"}
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-small"):
        GPT.from_preset("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=10, n_heads=3)


def test_forward_shapes_and_loss_matches_cross_entropy():
    model = GPT.from_preset("tiny", dropout=0.0).eval()
    idx = torch.randint(0, 50257, (2, 9))
    tgt = torch.randint(0, 50257, (2, 9))
    logits = model(idx)
    assert logits.shape == (2, 9, 50257)
    lg, loss = model(idx, tgt)
    assert torch.equal(lg, logits)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), tgt.reshape(-1))
    torch.testing.assert_close(loss, ref)
    # an untrained model's loss is about ln(V): the init is right
    assert abs(loss.item() - math.log(50257)) < 0.5


def test_training_mode_uses_the_fused_loss_and_ignores_minus_100():
    model = GPT.from_preset("tiny", dropout=0.0)
    idx = torch.randint(0, 50257, (2, 7))
    tgt = torch.randint(0, 50257, (2, 7))
    tgt[0, :3] = -100
    logits_none, loss_train = model.train()(idx, tgt)
    assert logits_none is None
    logits, loss_eval = model.eval()(idx, tgt)
    keep = tgt.reshape(-1) != -100
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257)[keep], tgt.reshape(-1)[keep])
    torch.testing.assert_close(loss_train, ref)
    torch.testing.assert_close(loss_eval, ref)


def test_the_model_runs_its_fused_ops(monkeypatch):
    """The fusions give the same answer as the plain ops they replace, so count the calls: each block's
    attention, residual add + LayerNorm and bias + GELU, the final norm, and in training the linear +
    cross-entropy that never builds the logits (in evaluation, the logits' cross-entropy)."""
    model = GPT.from_preset("tiny", dropout=0.0)
    calls = []
    for name in ("layer_norm", "add_layer_norm", "bias_gelu", "attention", "linear_cross_entropy", "cross_entropy"):
        real = getattr(gpt_kernels, name)
        monkeypatch.setattr(gpt_kernels, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    idx = torch.randint(0, 50257, (2, 7))
    n = model.config.n_layers
    model.train()(idx, idx)
    assert sorted(calls) == sorted(["layer_norm"] * (n + 1) + ["add_layer_norm", "bias_gelu", "attention"] * n
                                   + ["linear_cross_entropy"])
    calls.clear()
    model.eval()(idx, idx)
    assert calls.count("cross_entropy") == 1 and "linear_cross_entropy" not in calls


def test_attention_weights_get_dropout_in_training(monkeypatch):
    """The config's dropout reaches the attention weights (gpt_kernels.attention's dropout_p), not only the
    residual branches: with every nn.Dropout turned off, two training forwards still differ, evaluation
    ones do not, and attention is asked for exactly the config's rate in training and 0 in evaluation."""
    model = GPT.from_preset("tiny", dropout=0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # only the attention dropout is left
    rates = []
    real = gpt_kernels.attention
    monkeypatch.setattr(gpt_kernels, "attention", lambda *a, **k: rates.append(k["dropout_p"]) or real(*a, **k))
    idx = torch.randint(0, 50257, (2, 9))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    assert rates == [0.3] * (2 * model.config.n_layers)
    model.eval()
    assert torch.equal(model(idx), model(idx))
    assert rates[2 * model.config.n_layers:] == [0.0] * (2 * model.config.n_layers)


def test_causality_future_tokens_do_not_change_the_past():
    model = GPT.from_preset("tiny", dropout=0.0).eval()
    a = torch.randint(0, 50257, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(0, 50257, (4,))
    torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8])


def test_padded_vocabulary_never_reaches_logits_or_loss():
    torch.manual_seed(0)
    plain = GPT.from_preset("tiny", dropout=0.0, vocab_size=1000).eval()
    padded = GPT.from_preset("tiny", dropout=0.0, vocab_size=1000, pad_vocab_multiple=64).eval()
    assert padded.tok_emb.weight.shape[0] == 1024
    with torch.no_grad():
        padded.tok_emb.weight[:1000] = plain.tok_emb.weight
        padded.tok_emb.weight[1000:] = 100.0  # would dominate any logit it reached
        sd = {k: v for k, v in plain.state_dict().items() if not k.startswith(("tok_emb", "head"))}
        padded.load_state_dict(sd, strict=False)
    idx = torch.randint(0, 1000, (2, 5))
    tgt = torch.randint(0, 1000, (2, 5))
    assert padded(idx).shape[-1] == 1000
    torch.testing.assert_close(padded(idx), plain(idx))
    torch.testing.assert_close(padded.train()(idx, tgt)[1], plain.train()(idx, tgt)[1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        padded(torch.tensor([[1000]]))


def test_init_follows_gpt2():
    model = GPT.from_preset("gpt2-small", n_layers=4)
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert model.blocks[0].mlp.fc.bias.abs().max().item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, 2.0]]), "int64 or int32"),
    (torch.tensor([1, 2]), r"shape \(batch, time\)"),
    (torch.randint(0, 100, (1, 65)), "exceeds the model's context length 64"),
    (torch.tensor([[5, 50257]]), "token id 50257 is outside"),
    (torch.tensor([[-1, 3]]), "token id -1 is outside"),
])
def test_bad_input_is_a_clear_error(bad, match):
    model = GPT.from_preset("tiny")
    with pytest.raises((ValueError, TypeError), match=match):
        model(bad)


def test_backward_reaches_every_parameter():
    model = GPT.from_preset("tiny")
    idx = torch.randint(0, 50257, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_backends_agree_on_the_model():
    model = GPT.from_preset("tiny", dropout=0.0).eval()
    idx = torch.randint(0, 50257, (2, 10))
    out_torch = GPT.forward(model, idx)
    model.kernel_backend = "reference"
    torch.testing.assert_close(model(idx), out_torch, atol=1e-4, rtol=1e-4)


def test_book_init_keeps_pytorch_defaults():
    model = GPT.from_preset("tiny", init="torch", tie_weights=False)
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.05  # nn.Embedding's N(0, 1), as the book's model
    assert model.head.weight is not model.tok_emb.weight
    with pytest.raises(ValueError, match="init must be"):
        GPTConfig(init="xavier")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hidden_states_and_the_classifier_run_on_the_models_kernel_backend(backend):
    model = GPT.from_preset("tiny", kernel_backend=backend).eval()
    seen = []
    model.final_norm.register_forward_hook(lambda *_: seen.append(get_backend()))
    idx = torch.randint(0, 50257, (2, 5))
    model.hidden_states(idx)
    GPTClassifier(model, 2)(idx)
    assert seen == [backend, backend]
