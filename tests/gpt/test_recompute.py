"""Activation recomputation (``GPT.recompute``): the same loss and gradients as keeping every activation, with
the recomputation seen to happen in the backward.

Every comparison runs in training mode with dropout on (the masks, and the attention kernel's dropout seed,
must be drawn again identically when a block or branch runs a second time), on the Triton kernels (the
interpreter on the CPU) and on the torch backend, in float32 and under bf16 autocast, eager and compiled.
Recomputing the same ops on the same inputs gives the same numbers, so the tolerance is the float noise
of another order of gradient accumulation at most (1e-6); on the CPU they come out equal.

Which ops run in the backward is watched with a dispatch mode (eager) or by counting the attention
launcher's calls (compiled, where the backward is the compiled graph's): with ``none`` no forward op runs
in the backward; with ``blocks`` each block's whole forward does (both norms); with ``attention`` the two
branches do (the first norm, attention, GELU) but not the residual add + second norm between them.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gpt_kernels.flash_attention as flash_attention
from gpt import GPT, GPTClassifier
from gpt.model import RECOMPUTE, set_recompute

pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels in the interpreter
V, LAYERS = 97, 2
# forward ops by kernel backend: (layer norms, attention, GELU), as the dispatcher names them
FORWARD_OPS = {
    "triton": ({"gpt_triton.layer_norm", "gpt_triton.add_layer_norm"}, {"gpt_triton.attention"},
               {"gpt_triton.bias_gelu"}),
    "torch": ({"aten.native_layer_norm"}, {"aten._safe_softmax", "aten._scaled_dot_product_flash_attention_for_cpu",
                                           "aten._scaled_dot_product_efficient_attention",
                                           "aten._scaled_dot_product_flash_attention"}, {"aten.gelu"}),
}


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active (by name, e.g. ``aten.gelu``) and keeps what ``randint`` drew."""

    def __init__(self):
        super().__init__()
        self.counts, self.drawn = collections.Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if name == "aten.randint":
            self.drawn.append(out.clone())
        return out

    def count(self, names: set) -> int:
        return sum(self.counts[n] for n in names)


def _model(backend: str, recompute: str, dropout: float = 0.1) -> GPT:
    torch.manual_seed(0)  # the same weights for every mode
    return GPT.from_preset("tiny", kernel_backend=backend, recompute=recompute, dropout=dropout, vocab_size=V,
                           n_layers=LAYERS).to(DEVICE).train()


def _step(model, idx, tgt, amp=None, forward_ops=None):
    """Loss and gradients of one seeded training step, and the ops (an OpCounter) its backward ran; the
    forward's ops go into ``forward_ops`` if given."""
    torch.manual_seed(7)  # the same dropout masks and attention seeds for every mode
    with torch.autocast(DEVICE, dtype=amp, enabled=amp is not None), forward_ops or OpCounter():
        _, loss = model(idx, tgt)
    with OpCounter() as ops:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ops


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def _batch():
    g = torch.Generator().manual_seed(3)
    idx, tgt = torch.randint(0, V, (2, 13), generator=g), torch.randint(0, V, (2, 13), generator=g)
    tgt[1, :3] = -100
    return idx.to(DEVICE), tgt.to(DEVICE)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_recompute_gives_the_same_loss_and_gradients_and_recomputes_in_the_backward(backend, amp):
    idx, tgt = _batch()
    loss, grads, ops = _step(_model(backend, "none"), idx, tgt, amp)
    norms, attention, gelu = FORWARD_OPS[backend]
    assert ops.count(norms) == ops.count(attention) == ops.count(gelu) == 0  # no forward op in the backward
    expected = {"blocks": 2 * LAYERS, "attention": LAYERS}  # norms run again: both, or the first only
    for mode in ("blocks", "attention"):
        loss_r, grads_r, ops = _step(_model(backend, mode), idx, tgt, amp)
        _assert_same((loss_r, grads_r), (loss, grads))
        assert ops.count(attention) == ops.count(gelu) == LAYERS, (mode, ops.counts)
        assert ops.count(norms) == expected[mode], (mode, ops.counts)
        assert loss_r.dtype == torch.float32


def test_recompute_replays_the_attention_kernels_dropout_seed():
    """The attention kernel draws its dropout seed from torch's generator (``randint`` on the device): the
    recomputation must draw the very same seed, or the backward would use another mask than the forward.
    With the other dropouts off, only the kernel's mask is random here."""
    idx, tgt = _batch()
    runs = []
    for mode in ("none", "blocks"):
        model = _model("triton", mode)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        forward = OpCounter()
        loss, grads, backward = _step(model, idx, tgt, forward_ops=forward)
        runs.append(((loss, grads), [int(s) for s in forward.drawn], [int(s) for s in backward.drawn]))
    (reference, seeds, none_again), (result, seeds_r, again) = runs
    assert len(seeds) == LAYERS and len(set(seeds)) == LAYERS  # one seed per layer, all different
    assert seeds_r == seeds and none_again == []
    assert again == seeds[::-1]  # the backward (last block first) drew each block's seed again
    _assert_same(result, reference)


@pytest.fixture
def attention_launches(monkeypatch):
    """Counts the Triton attention forward launcher's calls (what runs the kernel, compiled or not)."""
    calls = []
    forward = flash_attention._forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(flash_attention, "_forward", counted)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["blocks", "attention"])
def test_compiled_recompute_equals_compiled_none_and_recomputes(mode, attention_launches):
    """torch.compile(fullgraph=True) traces the checkpoints (no graph break); its backward graph runs the
    attention again, with the dropout replayed (the compiled graphs save and restore the generator's state)."""
    idx, tgt = _batch()

    def compiled_step(recompute):
        model = _model("triton", recompute)
        run = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.manual_seed(7)
        _, loss = run(idx, tgt)
        n_forward = len(attention_launches)
        loss.backward()
        return (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}), \
            len(attention_launches) - n_forward

    reference, in_backward = compiled_step("none")
    assert in_backward == 0
    result, in_backward = compiled_step(mode)
    assert in_backward == LAYERS
    _assert_same(result, reference)


def test_no_recompute_without_gradients_and_generation_works():
    model = _model("torch", "blocks").eval()
    idx, _ = _batch()
    with torch.no_grad(), OpCounter() as ops:
        logits = model(idx)
    assert logits.shape == (2, 13, V) and ops.counts["aten.native_layer_norm"] == 2 * LAYERS + 1  # once each
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        step = model(idx, cache=cache, last_only=True)
    torch.testing.assert_close(step[:, -1], logits[:, -1], rtol=1e-5, atol=1e-5)


def test_set_recompute_reaches_every_gpt_and_refuses_unknown_modes():
    clf = GPTClassifier(_model("torch", "none"), num_classes=2)
    assert set_recompute(clf, "attention") == 1 and clf.gpt.recompute == "attention"
    assert set(RECOMPUTE) == {"none", "blocks", "attention"}
    with pytest.raises(ValueError, match="unknown recompute mode 'layers': choose one of none, blocks, attention"):
        set_recompute(clf, "layers")
    with pytest.raises(ValueError, match="unknown recompute mode"):
        GPT.from_preset("tiny", recompute="all")


def test_training_commands_pass_recompute_to_the_model_and_a_resume_may_change_it(tmp_path):
    from gpt.cli import build_parser, config_from_args
    from gpt.pretrain import TrainConfig, train

    args = build_parser().parse_args(["train", "--recompute", "blocks"])
    assert config_from_args(TrainConfig, args).recompute == "blocks"
    common = dict(preset="tiny", eval_batches=1, device="cpu", context_length=32, sample_tokens=0)
    run = tmp_path / "run"
    first = train(TrainConfig(**common, max_steps=1, recompute="blocks", out=str(run)))
    assert first.model.recompute == "blocks"
    resumed = train(TrainConfig(max_steps=2, recompute="attention", resume=str(run)))
    assert resumed.step == 2 and resumed.model.recompute == "attention"
