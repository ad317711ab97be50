"""The whole model on the Triton kernels (the interpreter on CPU) equals the model on PyTorch's ops."""

import pytest
import torch

from gpt import GPT
from gpt_kernels.testing import launched_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels in the interpreter on the CPU


def _run(model, backend, idx, tgt, train_mode):
    model.kernel_backend = backend
    model.train(train_mode)
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, tgt, return_logits=not train_mode)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits, loss.detach(), grads


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval-logits", "train-fused-loss"])
def test_tiny_gpt_triton_matches_torch(train_mode):
    # dropout 0 so both backends compute the same function; a prime vocabulary and a length that is not a
    # multiple of any block size; the training mode takes the chunked linear + cross-entropy path
    model = GPT.from_preset("tiny", dropout=0.0, vocab_size=503, qkv_bias=True).to(DEVICE)
    idx = torch.randint(0, 503, (2, 13), device=DEVICE)
    tgt = torch.randint(0, 503, (2, 13), device=DEVICE)
    tgt[1, :4] = -100
    with launched_kernels() as on_torch:
        lt, loss_t, grads_t = _run(model, "torch", idx, tgt, train_mode)
    with launched_kernels() as on_triton:
        lk, loss_k, grads_k = _run(model, "triton", idx, tgt, train_mode)
    # the two give the same answer, so check that each ran where it says: every fused op on its kernels
    assert on_torch == []
    assert set(on_triton) == {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_bias_gelu_fwd_kernel",
                              "_bias_gelu_bwd_kernel", "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv",
                              "_attn_bwd_dq", "_cross_entropy_kernel"}
    if not train_mode:
        torch.testing.assert_close(lk, lt, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss_k, loss_t, atol=2e-6, rtol=2e-6)
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_k[name], g, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_triton_training_with_attention_dropout_runs_and_differs_per_step():
    model = GPT.from_preset("tiny", dropout=0.2, vocab_size=503, kernel_backend="triton").to(DEVICE).train()
    idx = torch.randint(0, 503, (1, 9), device=DEVICE)
    _, a = model(idx, idx)
    _, b = model(idx, idx)
    assert torch.isfinite(a) and torch.isfinite(b) and a.item() != b.item()  # fresh dropout masks
    model.eval()
    _, c = model(idx, idx)
    _, d = model(idx, idx)
    assert c.item() == d.item()  # no dropout in eval
