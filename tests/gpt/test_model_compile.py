"""torch.compile(fullgraph=True) traces the GPT on the Triton kernels, forward and backward, with no break.

``fullgraph=True`` turns any graph break into an error, so these tests fail if an op (or the model around
it) needs the host mid-graph: a ``.item()``, a ``.tolist()``, an untraceable Python branch. The
``aot_eager`` backend traces exactly what inductor would get (forward and backward graphs through AOT
autograd, every fused op kept as one opaque custom op) and then runs it eagerly, so on the CPU the
kernels run in the interpreter and the results must equal the eager model's. One test runs inductor
itself, the default backend, as GPU users do.
"""

import os
import subprocess
import sys

import pytest
import torch

from gpt import GPT

pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels in the interpreter


def _model(dropout=0.0):
    return GPT.from_preset("tiny", dropout=dropout, vocab_size=503, pad_vocab_multiple=16, qkv_bias=True,
                           kernel_backend="triton").to(DEVICE)


def _loss_and_grads(run, model, idx, tgt):
    """Loss and every parameter's gradient of ``run`` (the model or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    _, loss = run(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_equals_eager(fresh_dynamo):
    torch.manual_seed(0)
    model = _model().train()
    idx, tgt = torch.randint(0, 503, (2, 13), device=DEVICE), torch.randint(0, 503, (2, 13), device=DEVICE)
    tgt[1, :4] = -100
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = _loss_and_grads(compiled, model, idx, tgt)
    loss_e, grads_e = _loss_and_grads(model, model, idx, tgt)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_logits_equal_eager(fresh_dynamo):
    torch.manual_seed(1)
    model = _model().eval()
    idx = torch.randint(0, 503, (2, 13), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        logits_c, loss_c = compiled(idx, idx)
        logits_e, loss_e = model(idx, idx)
    assert logits_c.shape == (2, 13, 503)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)


def test_compiled_dropout_draws_the_same_masks_as_eager(fresh_dynamo):
    """Attention dropout under compile: the seed is drawn on the device inside the graph (no host sync), from
    the same generator as eager, so a seeded compiled step equals the seeded eager step."""
    model = _model(dropout=0.2).train()
    idx = torch.randint(0, 503, (2, 13), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    loss_c, grads_c = _loss_and_grads(compiled, model, idx, idx)
    torch.manual_seed(5)
    loss_e, grads_e = _loss_and_grads(model, model, idx, idx)
    torch.manual_seed(6)
    loss_other, _ = _loss_and_grads(model, model, idx, idx)
    assert loss_c == loss_e and loss_other != loss_e
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_under_autocast(fresh_dynamo):
    torch.manual_seed(2)
    model = _model().train()
    idx = torch.randint(0, 503, (2, 13), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss_c, _ = _loss_and_grads(compiled, model, idx, idx)
        loss_e, _ = _loss_and_grads(model, model, idx, idx)
    assert loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)


def test_inductor_keeps_the_kernels_and_equals_eager(fresh_dynamo):
    """Inductor, what a plain ``torch.compile`` gives GPU users, generates code around the fused ops (C++ on
    the CPU, Triton on CUDA): its forward and backward code must call our custom ops, not a decomposition,
    and the step must give eager's loss and gradients. Inductor's own fused code (the embedding sum, the
    bias adds, the residual stream) may round fp32 sums in another order, hence 1e-5, not aot_eager's 1e-6."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(3)
    model = _model().train()
    idx, tgt = torch.randint(0, 503, (2, 13), device=DEVICE), torch.randint(0, 503, (2, 13), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    (loss_c, grads_c), code = run_and_get_code(_loss_and_grads, compiled, model, idx, tgt)
    code = "\n".join(code)
    for op in ("attention", "attention_backward", "layer_norm", "add_layer_norm", "layer_norm_backward",
               "bias_gelu", "bias_gelu_backward", "linear_cross_entropy"):  # the loss: forward computes the grads
        assert f"gpt_triton.{op}.default(" in code, f"inductor's code does not call torch.ops.gpt_triton.{op}"
    loss_e, grads_e = _loss_and_grads(model, model, idx, tgt)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_gpt_train_compile_runs(tmp_path):
    """The command line's --compile (inductor, the default backend; on the CPU in CI): a few steps, a
    checkpoint."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--max-steps", "2",
                           "--compile", "--out", str(out)], capture_output=True, text=True, timeout=1200, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile" in proc.stdout + proc.stderr
    assert (out / "model.safetensors").exists()
