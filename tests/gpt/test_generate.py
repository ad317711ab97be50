import pytest
import torch

from gpt import GPT, generate
from gpt.generate import sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", dropout=0.0).eval()


def test_greedy_is_argmax_and_deterministic(model):
    idx = torch.tensor([[464, 3290, 318]])
    out = generate(model, idx, 5)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], idx)
    seq = idx
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_seeded_sampling_repeats_and_differs_across_seeds(model):
    idx = torch.tensor([464, 3290])
    a = generate(model, idx, 8, temperature=1.5, top_k=100, seed=1)
    b = generate(model, idx, 8, temperature=1.5, top_k=100, seed=1)
    c = generate(model, idx, 8, temperature=1.5, top_k=100, seed=2)
    assert a.dim() == 1 and torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(k2.unique().tolist()) == {1, 2}
    probs = torch.softmax(logits[0], -1)  # 0.66, 0.24, 0.09, ...
    p = sample_next(logits, temperature=1.0, top_p=float(probs[1] + 0.01), generator=g)
    assert set(p.unique().tolist()) == {1, 2}
    assert sample_next(logits[:1], temperature=1.0, top_p=0.1, generator=g).item() == 1


def test_stops_at_eos_and_crops_the_context(model):
    idx = torch.randint(0, 50257, (1, 60))
    first = generate(model, idx, 1)[0, -1].item()
    out = generate(model, idx, 10, eos_id=first)
    assert out.shape[1] == 61  # stopped right after the end-of-text id
    long = generate(model, idx, 10)  # grows past the 64-token context: the window slides
    assert long.shape[1] == 70


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=3, temperature=-0.5), "temperature"),
    (dict(max_new_tokens=3, top_k=0), "top_k"),
    (dict(max_new_tokens=3, top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([1, 2]), **kwargs)


def test_empty_or_too_long_prompt(model):
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="context length is 64"):
        generate(model, torch.randint(0, 100, (70,)), 3)
