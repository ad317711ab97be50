import pytest
import torch
import torch.nn as nn

from gpt import GPT
from gpt.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state,
    lora_state_dict,
    merge_lora,
)


def _tiny():
    return GPT.from_preset("tiny", dropout=0.0).eval()


def _randomize_adapters(model, std=0.05):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, std)


def test_lora_at_init_gives_exactly_the_base_logits():
    model = _tiny()
    idx = torch.randint(0, 50257, (2, 11))
    base = model(idx)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 4 * model.config.n_layers
    assert all(isinstance(m.lora_A, nn.Parameter) and m.lora_A.abs().sum() > 0 for m in model.modules()
               if isinstance(m, LoRALinear))  # A is Kaiming-initialised, B is zero
    assert torch.equal(model(idx), base)


def test_only_adapters_train_and_the_counts_add_up():
    model = _tiny()
    total_before = count_parameters(model)[1]
    apply_lora(model, rank=4, alpha=4)
    trainable, total = count_parameters(model)
    C, L, r = model.config.emb_dim, model.config.n_layers, 4
    # per block: qkv (C -> 3C), attn proj (C -> C), fc (C -> 4C), mlp proj (4C -> C); r * (in + out) each
    per_block = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert trainable == L * per_block
    assert total == total_before + trainable
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    # gradients reach the adapters and nothing else
    idx = torch.randint(0, 50257, (2, 8))
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_every_target_layer_is_really_used_including_the_fused_mlp_fc():
    """gpt/model.py calls the MLP's fc through F.linear + fused bias/GELU: the adapter must not be bypassed."""
    idx = torch.randint(0, 50257, (1, 9))
    for target in DEFAULT_TARGETS:
        model = _tiny()
        base = model(idx)
        apply_lora(model, rank=2, alpha=2, targets=[target])
        _randomize_adapters(model, std=0.5)
        assert not torch.allclose(model(idx), base), f"the LoRA term on {target} changes nothing"


def test_merge_gives_the_same_logits_and_a_plain_model():
    model = _tiny()
    base_keys = set(model.state_dict())
    base_count = count_parameters(model)[1]
    apply_lora(model, rank=4, alpha=16)
    _randomize_adapters(model)
    idx = torch.randint(0, 50257, (3, 13))
    with torch.no_grad():
        before = model(idx)
        merge_lora(model)
        after = model(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys and count_parameters(model)[1] == base_count
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_adapter_state_round_trip_and_mismatch_errors():
    torch.manual_seed(0)
    src = _tiny()
    apply_lora(src, rank=4, alpha=8)
    _randomize_adapters(src)
    state = lora_state_dict(src)
    assert state and all(k.endswith(("lora_A", "lora_B")) for k in state)

    dst = _tiny()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if "lora_" not in k}
                        | {k.replace(".linear.", "."): v for k, v in src.state_dict().items() if ".linear." in k},
                        strict=False)
    apply_lora(dst, rank=4, alpha=8)
    load_lora_state(dst, state)
    idx = torch.randint(0, 50257, (2, 7))
    torch.testing.assert_close(dst(idx), src(idx), rtol=0, atol=0)

    other = _tiny()
    apply_lora(other, rank=2, alpha=8)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(other, state)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(other, {})


def test_apply_twice_changes_nothing_and_bad_settings_are_clear():
    model = _tiny()
    first = apply_lora(model, rank=2, alpha=2)
    n = count_parameters(model)
    assert apply_lora(model, rank=2, alpha=2) == first and count_parameters(model) == n
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_tiny(), rank=0, alpha=1)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_tiny(), rank=2, alpha=0)
    with pytest.raises(ValueError, match="no Linear layer"):
        apply_lora(_tiny(), rank=2, alpha=2, targets=["nothing.here"])
