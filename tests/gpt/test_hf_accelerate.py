"""gpt.accelerate_hf: a transformers GPT-2 on our kernels computes what the unpatched one computes.

The oracle is the unpatched transformers model: the accelerated one in float32 (Triton kernels, in the
interpreter on the CPU) must be as close to the unpatched model run in float64 as the unpatched float32 model
is, give or take gpt_kernels.testing's rule (2x its error + 1e-5). Every test also records which ops ran
(a TorchDispatchMode sees each torch.ops.gpt_triton custom op), so equal outputs from a path that skipped
the kernels fail.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt import accelerate_hf
from gpt_kernels.testing import assert_close_to_ref, max_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels in the interpreter
V = 101  # a prime vocabulary
KERNELS = {"attention", "attention_backward", "layer_norm", "layer_norm_backward", "bias_gelu", "bias_gelu_backward"}


class OpsRun(TorchDispatchMode):
    """Records the names of the torch.ops.gpt_triton ops that run inside the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = str(func.name()).partition("::")
        if namespace == "gpt_triton":
            self.ops.add(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def _config(dropout=0.0, **overrides):
    cfg = dict(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=dropout, embd_pdrop=dropout,
               attn_pdrop=dropout, pad_token_id=V - 1)
    cfg.update(overrides)
    return transformers.GPT2Config(**cfg)


def _models(cls=transformers.GPT2LMHeadModel, **overrides):
    """(plain float32, accelerated float32 on the Triton kernels, plain float64): the same weights."""
    plain = cls(_config(**overrides)).to(DEVICE)
    acc = copy.deepcopy(plain)
    accelerate_hf(acc, kernel_backend="triton")
    return plain, acc, copy.deepcopy(plain).double()


def _run(model, idx, kind, train):
    """The outputs and the parameter gradients of one forward + backward."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    if kind == "base":
        h = model(idx).last_hidden_state  # (B, T, C)
        r = torch.linspace(-1, 1, h.numel(), device=DEVICE, dtype=h.dtype).view_as(h)
        outs, loss = {"hidden": h}, (h * r).sum()
    elif kind == "classifier":
        out = model(idx, labels=torch.tensor([1, 0], device=DEVICE))
        outs, loss = {"scores": out.logits, "loss": out.loss}, out.loss
    else:
        out = model(idx, labels=idx)
        outs, loss = {"loss": out.loss, **({} if out.logits is None else {"logits": out.logits})}, out.loss
    loss.backward()
    return outs, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}


CASES = {"lm-eval": (transformers.GPT2LMHeadModel, "lm", False),
         "lm-train-fused-loss": (transformers.GPT2LMHeadModel, "lm", True),
         "base-model": (transformers.GPT2Model, "base", False),
         "classifier": (transformers.GPT2ForSequenceClassification, "classifier", False)}


@pytest.mark.parametrize("case", list(CASES))
def test_accelerated_equals_unpatched_by_the_float64_rule(case):
    cls, kind, train = CASES[case]
    plain, acc, ref = _models(cls, num_labels=3)
    idx = torch.randint(0, V - 1, (2, 13), device=DEVICE)  # 13: no block size divides it
    with OpsRun() as run:
        got, got_grads = _run(acc, idx, kind, train)
    base, base_grads = _run(plain, idx, kind, train)
    want, want_grads = _run(ref, idx, kind, train)
    assert KERNELS <= run.ops, run.ops
    if case == "lm-train-fused-loss":
        assert "linear_cross_entropy" in run.ops and "logits" not in got  # no (tokens x V) logits
    else:
        assert "linear_cross_entropy" not in run.ops
    for name, ref_value in {**want, **want_grads}.items():
        if name == "logits" and train:
            continue  # the unpatched model's training mode builds them; the fused loss does not
        out, b = {**got, **got_grads}[name], {**base, **base_grads}[name]
        assert out.dtype == torch.float32
        assert_close_to_ref(name, out, ref_value, base=b)


def test_padded_batches_go_to_sdpa_and_generation_uses_the_kernel():
    plain, acc, _ = _models()
    plain.eval()
    acc.eval()
    idx = torch.randint(0, V - 1, (2, 9), device=DEVICE)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0  # left padding: a mask the causal kernel cannot apply
    with torch.no_grad(), OpsRun() as run:
        got = acc(idx, attention_mask=mask).logits
    assert "layer_norm" in run.ops and "attention" not in run.ops  # transformers' SDPA took the masked batch
    torch.testing.assert_close(got[mask.bool()], plain(idx, attention_mask=mask).logits[mask.bool()],
                               atol=1e-5, rtol=1e-5)
    prompt = idx[:1]
    with torch.no_grad(), OpsRun() as run:
        new = acc.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=V - 1)
    assert "attention" in run.ops  # the prompt, then one query over the cache per new token
    assert torch.equal(new, plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=V - 1))


def test_train_mode_dropout_is_statistically_the_same():
    """With attention dropout 0.25 (a multiple of 1/256: the kernel's step) and no other dropout, the two
    models' training-mode logits have the same distribution: the mean over draws agrees (z-scores of the
    difference ~ N(0, 1)) and so does the spread around the eval-mode logits."""
    plain, acc, _ = _models(attn_pdrop=0.25)
    idx = torch.randint(0, V - 1, (1, 8), device=DEVICE).expand(48, 8)  # 48 draws: each row its own masks
    with torch.no_grad():
        clean = plain.eval()(idx[:1]).logits  # (1, T, V)
        draws = {}
        for name, model in (("plain", plain), ("accelerated", acc)):
            draws[name] = model.train()(idx).logits  # (N, T, V)
    a, b = draws["accelerated"], draws["plain"]
    assert not torch.equal(a[0], a[1])  # fresh masks each call
    z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / a.shape[0]).sqrt()
    assert z.pow(2).mean().sqrt() < 1.5, f"rms z {z.pow(2).mean().sqrt():.2f}"
    spread_a, spread_b = (a - clean).pow(2).mean(), (b - clean).pow(2).mean()
    assert 0.7 < spread_a / spread_b < 1.4, (spread_a, spread_b)


def test_under_autocast_bf16():
    """The accelerated and the unpatched model under CPU autocast (bf16 matmuls, fp32 weights): the accelerated
    run's distance to the float32 run may be twice the unpatched run's, plus 1e-2 relative (as
    tests/gpt/test_model_autocast.py allows our own GPT)."""
    plain, acc, _ = _models()
    idx = torch.randint(0, V - 1, (2, 13), device=DEVICE)
    exact, exact_grads = _run(plain, idx, "lm", True)
    runs = {}
    for name, model in (("plain", plain), ("accelerated", acc)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16), OpsRun() as ops:
            runs[name] = _run(model, idx, "lm", True)
        runs[name + " ops"] = ops.ops
    assert KERNELS | {"linear_cross_entropy"} <= runs["accelerated ops"]
    (got, got_grads), (base, base_grads) = runs["accelerated"], runs["plain"]
    assert got["loss"].dtype == torch.float32
    for name, want in {**exact, **exact_grads}.items():
        if name == "logits":
            continue  # the fused loss builds none
        out, b = {**got, **got_grads}[name], {**base, **base_grads}[name]
        allowed = 2 * max_err(b, want) + 1e-2 * want.abs().max().item()
        assert max_err(out, want) <= allowed, f"{name}: {max_err(out, want):.2e} > {allowed:.2e}"


def test_hugging_face_trainer_steps_equal_the_unpatched_ones(tmp_path):
    """transformers.Trainer, 2 steps of 2 accumulated batches with ignored labels (its num_items_in_batch rule):
    the same losses and the same weights after, and the fused loss ran."""
    examples = []
    for i in range(8):
        ids = torch.randint(0, V - 1, (9,))
        labels = ids.clone()
        labels[: i % 4] = -100  # a different number of counted tokens in each batch
        examples.append({"input_ids": ids, "labels": labels})
    trained = {}
    for name in ("plain", "accelerated"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(_config())
        if name == "accelerated":
            accelerate_hf(model, kernel_backend="triton")
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, learning_rate=1e-3,
                                              per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                              seed=0, dataloader_num_workers=0, optim="sgd")  # Adam would
        # magnify rounding: a near-zero gradient's update is +-lr whatever its size
        trainer = transformers.Trainer(model=model, args=args, train_dataset=examples)
        with OpsRun() as run:
            trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        trained[name] = (model, losses, run.ops)
    (acc, acc_losses, ops), (plain, plain_losses, _) = trained["accelerated"], trained["plain"]
    assert "linear_cross_entropy" in ops and KERNELS <= ops
    assert len(acc_losses) == 2
    torch.testing.assert_close(torch.tensor(acc_losses), torch.tensor(plain_losses), atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(acc.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_torch_compile_traces_the_kernels_without_a_graph_break():
    """fullgraph=True: one graph or an error. AOT autograd's forward and backward graphs (run eagerly, as
    aot_eager does) must call our custom ops."""
    from torch._dynamo.backends.common import aot_autograd

    calls = set()

    def record(graph, example_inputs):
        calls.update(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
        return graph

    torch._dynamo.reset()
    _, acc, _ = _models()
    idx = torch.randint(0, V - 1, (2, 13), device=DEVICE)
    compiled = torch.compile(acc, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    got, got_grads = _run(compiled, idx, "lm", True)
    want, want_grads = _run(acc, idx, "lm", True)
    torch._dynamo.reset()
    ops = {c.split(".")[1] for c in calls if c.startswith("gpt_triton.")}
    assert KERNELS | {"linear_cross_entropy"} <= ops, calls
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_what_it_cannot_serve_is_refused_in_one_line():
    for overrides, match in (({"add_cross_attention": True}, "cross-attention"),
                             ({"activation_function": "relu"}, "activation_function='relu'"),
                             ({"n_embd": 40, "n_head": 5}, "head size 8")):
        with pytest.raises(ValueError, match=match) as e:
            accelerate_hf(transformers.GPT2LMHeadModel(_config(**overrides)))
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        accelerate_hf(torch.nn.Linear(2, 2))
    _, acc, _ = _models()
    idx = torch.randint(0, V - 1, (1, 5), device=DEVICE)
    with pytest.raises(ValueError, match="output_attentions"):
        acc(idx, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        acc.config.output_attentions = True  # transformers 5 refuses it here, for any but eager attention
        acc(idx)  # 4.x: our forward refuses it


def test_a_second_call_changes_nothing_and_a_wrapped_projection_keeps_its_forward():
    plain, acc, _ = _models()
    first = acc._gpt_triton_accelerated
    assert accelerate_hf(acc) == first
    twin = copy.deepcopy(acc)  # its own weights, its own forward
    with torch.no_grad():
        twin.transformer.ln_f.bias.add_(1.0)
        idx = torch.randint(0, V - 1, (1, 5), device=DEVICE)
        assert not torch.allclose(twin.eval()(idx).logits, acc.eval()(idx).logits)
    assert sum(v == "layer_norm" for v in first.values()) == 5 and first["transformer.h.1.mlp"] == "bias_gelu"

    class Delta(torch.nn.Module):  # what PEFT's LoRA does to a layer: its own forward around the original
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Linear(64, 256, bias=False)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    for model in (plain, acc):
        torch.manual_seed(1)
        model.transformer.h[0].mlp.c_fc = Delta(model.transformer.h[0].mlp.c_fc).to(DEVICE)
    idx = torch.randint(0, V - 1, (2, 7), device=DEVICE)
    with torch.no_grad(), OpsRun() as run:
        got = acc.eval()(idx).logits
    assert {"gelu", "bias_gelu"} <= run.ops  # the wrapped layer's GELU alone, the other layer's fused
    torch.testing.assert_close(got, plain.eval()(idx).logits, atol=1e-5, rtol=1e-5)
