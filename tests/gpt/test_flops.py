"""gpt.flops: model FLOPs per token by hand, the peak table's lookups, the measured fallback, MFU only on a GPU."""

import pytest
import torch

from gpt import GPT
from gpt import flops as F
from gpt.clock import Throughput
from gpt.config import GPTConfig
from gpt.flops import PEAKS


def test_gpt2_small_flops_per_token_by_hand_and_nanogpts_convention():
    cfg = GPTConfig.from_preset("gpt2-small")  # C 768, 12 layers of 12 heads of 64, V 50,257, no q/k/v bias
    C, L, V = 768, 12, 50257
    per_layer = 3 * C * C + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C  # = 12 C² + 10 C
    N = L * per_layer + 2 * C + V * C
    assert N == 123_625_728
    assert F.matmul_params(cfg) == N
    assert F.flops_per_token(cfg, 1024) == 6 * N + 12 * L * 12 * 64 * 1024 == 855_000_576
    assert F.flops_per_token(cfg, 1) == 6 * N + 12 * L * 12 * 64  # the attention term scales with T
    # nanoGPT's estimate_mfu: N = get_num_params() = every parameter but the position table (tied head)
    model = GPT(cfg)
    assert F.matmul_params(cfg) == model.num_parameters() - model.pos_emb.weight.numel()


def test_matmul_params_count_the_model_as_built_untied_padded_biased_and_without_head():
    cfg = GPTConfig.from_preset("tiny", tie_weights=False, pad_vocab_multiple=64, qkv_bias=True, vocab_size=1000)
    model = GPT(cfg)
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    assert F.matmul_params(cfg) == model.num_parameters() - embeddings  # the padded head's 1,024 rows included
    assert F.matmul_params(cfg, lm_head=False) == F.matmul_params(cfg) - 1024 * 64


@pytest.mark.parametrize("name, key, bf16", [
    ("NVIDIA A100-SXM4-40GB", "A100 SXM", 312e12),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312e12),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12),
    ("NVIDIA H200", "H200 SXM", 989.5e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", "GH200", 989.5e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA L40S", "L40S", 362.05e12),
    ("NVIDIA L40", "L40", 181.05e12),
    ("NVIDIA A10G", "A10G", 125e12),
    ("NVIDIA A10", "A10", 125e12),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71e12),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 5090", "RTX 5090", 209.5e12),
])
def test_device_names_find_their_card_and_its_dense_peak(name, key, bf16):
    assert F.card(name) == key
    peak = F.peak_for(name, "bf16", measure=lambda: pytest.fail("a card in the table is not measured"))
    assert peak.flops == bf16 and key in peak.source
    for kind in F.KINDS:
        assert F.PEAKS[key][kind] > 0
    assert F.PEAKS[key]["tf32"] <= F.PEAKS[key]["bf16"] == F.PEAKS[key]["fp16"]


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
                                  "NVIDIA GeForce RTX 3090 Ti", "NVIDIA A100X", "NVIDIA H800", "Tesla T4", ""])
def test_other_cards_are_not_taken_for_a_card_of_the_table(name):
    assert F.card(name) is None


def test_matmul_kind_follows_the_dtype_and_torchs_tf32_setting():
    assert F.matmul_kind("bfloat16") == "bf16" and F.matmul_kind(torch.float16) == "fp16"
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # what gpt.runtime.Precision sets on CUDA
        assert F.matmul_kind("float32") == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert F.matmul_kind("float32") == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    with pytest.raises(ValueError, match="no matmul peak for dtype 'int8'"):
        F.matmul_kind("int8")


def test_an_unknown_card_falls_back_to_a_measured_matmul(monkeypatch):
    """A CUDA device whose name is not in the table (the name mocked: no GPU here): its peak is the measured
    rate of a matmul in the training's dtype; the measurement itself runs here on the CPU, small."""
    calls, real = [], F.measure_matmul_flops

    def measure(device, dtype, n=4096, min_seconds=0.2):
        calls.append((torch.device(device).type, dtype))
        return real("cpu", "float32", n=64, min_seconds=0.01)

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery 9000")
    monkeypatch.setattr(F, "measure_matmul_flops", measure)
    F.device_peak.cache_clear()
    try:
        peak = F.device_peak(torch.device("cuda:0"), "bfloat16")
    finally:
        F.device_peak.cache_clear()
    assert calls == [("cuda", "bfloat16")]
    assert 1e6 < peak.flops < 1e15 and "measured" in peak.source and "Mystery 9000" in peak.source


def test_throughput_gives_flops_per_second_per_device_and_mfu_only_with_a_peak():
    cpu = Throughput(peak=None, devices=2)
    rates = cpu.step(512, 16, 0.5, flops=3e9)  # all processes' tokens, examples and model FLOPs in 0.5 s
    assert rates == {"tokens_per_s": 1024.0, "examples_per_s": 32.0, "flops_per_s": 3e9}  # 3e9 / 2 devices / 0.5 s
    assert set(Throughput.postfix(rates)) == {"tok_s", "ex_s", "tflops"}
    cpu.step(64, 2, 1.5, flops=1e9)
    assert cpu.since_last()["flops_per_s"] == pytest.approx(4e9 / 2 / 2.0)  # the steps since the last call
    assert cpu.since_last() is None  # started over
    gpu = Throughput(peak=989.5e12)  # H100 SXM, bf16
    rates = gpu.step(8 * 1024, 8, 1.0, flops=8 * 1024 * 855_000_576)  # gpt2-small, 8 x 1024 tokens in 1 s
    assert rates["mfu"] == pytest.approx(8 * 1024 * 855_000_576 / 989.5e12, rel=1e-3)
    assert Throughput.postfix(rates)["mfu"] == f"{100 * rates['mfu']:.1f}%"


def test_gpu_peak_is_the_tables_for_a_known_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    F.device_peak.cache_clear()
    try:
        peak = F.device_peak(torch.device("cuda:0"), "bfloat16")
    finally:
        F.device_peak.cache_clear()
    assert peak.flops == PEAKS["H100 SXM"]["bf16"]
    assert F.device_peak(torch.device("cpu"), "float32") is None  # the CPU: FLOP/s, no MFU


@pytest.mark.parametrize("peak", [None, 2e12])
def test_the_training_log_and_bar_carry_model_flops_per_second_and_the_mfu(tmp_path, monkeypatch, capsys, peak):
    """A tiny pretraining run: each evaluation's "speed" holds the model FLOP/s of its steps, which is their
    tokens/s times the FLOPs per token (every window has the context's length), and the MFU against the
    device's peak where it has one (here a stand-in for a GPU's); the progress bar shows the MFU or TFLOP/s."""
    import gpt.engine
    from gpt.pretrain import TrainConfig, train

    monkeypatch.setattr(gpt.engine, "device_peak", lambda device, dtype: peak and F.Peak(peak, "a stand-in"))
    cfg = TrainConfig(preset="tiny", context_length=32, batch_size=2, max_steps=4, eval_every=2, eval_batches=1,
                      sample_tokens=2, device="cpu", out=str(tmp_path / "run"))
    result = train(cfg)
    speeds = [r["speed"] for r in result.evals if "speed" in r]
    assert len(speeds) == 2  # after steps 2 and 4
    per_token = F.flops_per_token(result.model.config, 32)
    for speed in speeds:
        assert speed["flops_per_s"] == pytest.approx(speed["tokens_per_s"] * per_token, rel=1e-3)
        assert ("mfu" in speed) == (peak is not None)
        if peak:
            assert speed["mfu"] == pytest.approx(speed["flops_per_s"] / peak, rel=1e-3, abs=1e-4)
    assert ("mfu=" if peak else "tflops=") in capsys.readouterr().err
