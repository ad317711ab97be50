"""The GPU user's path on the CPU: mixed-precision training and generation on the Triton kernels.

fp32 master weights under ``torch.autocast("cpu", dtype)`` run the same dtype logic as CUDA autocast (the
matmuls in bf16/fp16, the residual stream in fp32), and the Triton kernels run in the interpreter. The
torch backend under the same autocast is the baseline.

Tolerance: the two backends run identical matmuls and differ only in how the fused ops round (one rounding
to bf16/fp16 of an fp32 computation against torch's own), so neither is exact. The rule is the kernels'
three-way rule at the model level: for the loss and every parameter gradient, the Triton run's distance to
the float32 run (no autocast) may be at most twice the torch backend's distance, plus a floor of 1e-2
relative (2.5 bf16 ulps): FlashAttention rounds the probabilities P and the score gradients dS to the
input dtype before its tile matmuls, which torch's CPU attention does not, so the attention weights'
gradients carry a few more bf16 roundings (measured: 1.5e-2 against torch's 0.7e-2 for the q/k/v weight
at bf16, both 1e-3 at fp16).
"""

import pytest
import torch

from gpt import GPT, generate

pytestmark = pytest.mark.gpu_path  # bench.gpu_check runs these on CUDA as well

AMP = [torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter; a GPU machine: CUDA autocast


def _model(**overrides):
    # a prime vocabulary padded to 512 rows (the padded head path), a length no block size divides
    cfg = dict(dropout=0.0, vocab_size=503, pad_vocab_multiple=16, qkv_bias=True)
    cfg.update(overrides)
    return GPT.from_preset("tiny", **cfg).to(DEVICE)


def _step(model, backend, amp, idx, tgt):
    """One training step's loss and gradients (fp32 masters), under autocast(amp) unless amp is None."""
    model.kernel_backend = backend
    model.train().zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=amp, enabled=amp is not None):
        _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_training_step_triton_matches_torch_under_autocast(amp):
    torch.manual_seed(0)
    model = _model()
    idx, tgt = torch.randint(0, 503, (2, 21), device=DEVICE), torch.randint(0, 503, (2, 21), device=DEVICE)
    tgt[0, :3] = -100
    loss32, grads32 = _step(model, "torch", None, idx, tgt)
    loss_t, grads_t = _step(model, "torch", amp, idx, tgt)
    loss_k, grads_k = _step(model, "triton", amp, idx, tgt)
    assert loss_k.dtype == loss_t.dtype == torch.float32
    assert abs(loss_k - loss32) <= 2 * abs(loss_t - loss32) + 2e-3, (loss_k, loss_t, loss32)
    for name, g32 in grads32.items():
        gk, gt = grads_k[name], grads_t[name]
        assert gk.dtype == torch.float32 and torch.isfinite(gk).all(), name
        assert _rel(gk, g32) <= 2 * _rel(gt, g32) + 1e-2, (name, _rel(gk, g32), _rel(gt, g32))
    # the padding rows of the head (tied to the embedding) get gradient only from the embedding lookup
    pad_rows = grads_k["tok_emb.weight"][503:]
    assert torch.equal(pad_rows, torch.zeros_like(pad_rows))


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_adamw_step_under_autocast_lowers_the_loss_on_both_backends(amp):
    """forward, backward, AdamW: the step the trainer takes, on the Triton kernels under autocast."""
    idx, tgt = torch.randint(0, 503, (2, 21), device=DEVICE), torch.randint(0, 503, (2, 21), device=DEVICE)
    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        model = _model(kernel_backend=backend).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(3):
            with torch.autocast(DEVICE, dtype=amp):
                _, loss = model(idx, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.setdefault(backend, []).append(loss.item())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses["triton"][-1] < losses["triton"][0]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=2e-2)


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_every_op_output_dtype_matches_the_torch_backend(amp):
    """Hooks on every module record the dtype each fused op's caller sees; the two backends agree."""
    idx = torch.randint(0, 503, (1, 9), device=DEVICE)

    def dtypes(backend):
        model = _model(kernel_backend=backend).eval()
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, name=n: seen.append(
            (name, tuple(t.dtype for t in (o if isinstance(o, tuple) else (o,)) if isinstance(t, torch.Tensor)))))
            for n, m in model.named_modules() if n]
        with torch.no_grad(), torch.autocast(DEVICE, dtype=amp):
            logits, loss = model(idx, idx)
        for h in hooks:
            h.remove()
        return seen, logits.dtype, loss.dtype

    assert dtypes("triton") == dtypes("torch")


@pytest.mark.parametrize("amp", AMP, ids=str)
def test_generation_with_kv_cache_under_autocast(amp):
    """Prefill + decode on the Triton kernels with the cache in autocast's dtype: the last logits match a
    full forward over the same tokens within the precision, and generation runs end to end."""
    torch.manual_seed(2)
    model = _model(kernel_backend="triton").eval()
    idx = torch.randint(0, 503, (1, 17), device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=amp):
        cache = model.new_kv_cache(1)
        assert cache.layers[0].k.dtype == amp
        model(idx[:, :16], cache=cache)
        step = model(idx[:, 16:], cache=cache, last_only=True)  # (1, 1, V)
        full = model(idx)[:, -1:]  # (1, 1, V)
        out = generate(model, idx, max_new_tokens=5, temperature=0.0)
    assert step.dtype == full.dtype == amp
    torch.testing.assert_close(step.float(), full.float(), rtol=0, atol=8 * torch.finfo(amp).eps * full.abs().max())
    assert out.shape == (1, 22) and torch.equal(out[:, :17], idx)


@pytest.mark.parametrize("job,trainable", [("classifier", "all"), ("instruct", "lora")])
def test_finetuning_steps_under_autocast_on_the_triton_backend(tmp_path, job, trainable):
    """The finetuning jobs' steps (the classifier head on the last token; instruction tuning with LoRA on
    the attention and feed-forward matmuls) under bf16 autocast on the kernels: finite, and the losses of
    the torch backend's identical run within bf16 noise."""
    from gpt import FinetuneConfig, finetune_classifier, finetune_instruct

    fn = finetune_classifier if job == "classifier" else finetune_instruct
    losses = {}
    for backend in ("torch", "triton"):
        cfg = FinetuneConfig(preset="tiny", limit=12, batch_size=2, max_steps=2, lr=1e-3, device=DEVICE,
                             dtype="bfloat16", kernels=backend, trainable=trainable, eval_batches=1,
                             max_new_tokens=2, out=str(tmp_path / backend))
        losses[backend] = fn(cfg).losses
    assert len(losses["triton"]) == 2 and all(torch.isfinite(torch.tensor(losses["triton"])))
    assert losses["triton"] == pytest.approx(losses["torch"], rel=2e-2)
