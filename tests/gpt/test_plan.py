"""gpt.plan: the activation-memory estimate against the measured peak of a real step, and ``gpt plan``.

The measurement: one forward and backward of a small model on the CPU (torch backend), its peak allocated
bytes above what was held before (``bench.common.cpu_peak_memory``: every allocation and free torch's CPU
allocator reports to the profiler, summed in time order), after a first step so that every parameter's
gradient exists, as in any step but the first. The estimate must be within 15% of it, for each
recomputation mode, at shapes where different moments of the step hold the peak (the loss's backward, the
last block's backward, the forward's end) and different terms dominate (the blocks' activations, the
vocabulary-sized loss tensors, the head's weight gradients, autocast's weight copies).

Attention dropout is off in the measured model: on the CPU, torch's attention with dropout takes its math
path, which keeps the (T x T) probabilities; the Triton kernel the estimate describes keeps none (its mask
comes from a seed). The residual and embedding dropouts stay on where a case says so.
"""

import pytest
import torch

from bench.common import cpu_peak_memory
from gpt import GPT
from gpt.cli import main
from gpt.config import GPTConfig
from gpt.flops import PEAKS, flops_per_token
from gpt.model import RECOMPUTE, CausalSelfAttention
from gpt.optim import make_optimizer
from gpt.plan import GPUS, PlanConfig, activation_bytes, plan

# (preset, overrides, batch, length, autocast dtype or None)
CASES = {
    "tiny-v256-b8": ("tiny", dict(vocab_size=256, dropout=0.0), 8, 64, None),
    "tiny-v256-b16-dropout": ("tiny", dict(vocab_size=256, dropout=0.1), 16, 64, None),
    "tiny-gpt2-vocab": ("tiny", dict(dropout=0.1), 2, 64, None),
    "mini-v1000-untied-odd": ("mini", dict(vocab_size=1000, tie_weights=False, dropout=0.1), 3, 51, None),
    "mini-v512-bf16-autocast": ("mini", dict(vocab_size=512, dropout=0.1), 2, 128, torch.bfloat16),
    "mini-gpt2-vocab-b1": ("mini", dict(dropout=0.1), 1, 64, None),  # the head's (V, C) gradients dominate
}


def _measured_peak(preset, overrides, B, T, amp, recompute) -> tuple[int, GPTConfig]:
    torch.manual_seed(0)
    model = GPT.from_preset(preset, kernel_backend="torch", recompute=recompute, **overrides).train()
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.dropout = 0.0  # see the module's doc
    V = model.config.vocab_size
    idx, tgt = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def step():
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            _, loss = model(idx, tgt)
        loss.backward()

    step()  # every gradient exists from here on
    return cpu_peak_memory(step), model.config


def _estimate(cfg, B, T, amp, recompute) -> dict:
    return activation_bytes(cfg, B, T, recompute, dtype="float32" if amp is None else "bfloat16", kernels="torch",
                            device="cpu")


@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("case", CASES)
def test_activation_estimate_is_within_15_percent_of_the_measured_peak(case, recompute):
    preset, overrides, B, T, amp = CASES[case]
    measured, cfg = _measured_peak(preset, overrides, B, T, amp, recompute)
    estimate = _estimate(cfg, B, T, amp, recompute)
    assert abs(estimate["peak"] - measured) <= 0.15 * measured, (estimate, measured)


def test_the_measured_cases_put_the_peak_at_each_moment_of_the_step():
    """The cases above exercise each part of the estimate: each moment holds the peak in some of them."""
    moments = set()
    for preset, overrides, B, T, amp in CASES.values():
        cfg = GPTConfig.from_preset(preset, **overrides)
        for mode in RECOMPUTE:
            est = _estimate(cfg, B, T, amp, mode)
            moments.add(max((v, k) for k, v in est.items() if k != "peak")[1])
    assert moments >= {"forward end", "loss backward", "last block backward", "head backward"}


def test_recomputation_saves_what_the_formula_says_at_gpt2_shapes():
    cfg = GPTConfig.from_preset("gpt2-small")
    est = {m: activation_bytes(cfg, 8, 1024, m)["peak"] for m in RECOMPUTE}
    assert est["blocks"] < est["attention"] < est["none"]
    per_layer_token = 38 * 768 + 4 * 12 + 16  # bf16 on CUDA with dropout: 2r C + 14a C + 4H + 16 + 2C
    assert est["none"] > 12 * 8 * 1024 * per_layer_token > est["none"] * 0.8  # the blocks are most of it


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_activation_estimate_on_the_gpu_within_15_percent(recompute):
    """The GPU's run: Triton kernels, bf16 autocast, CUDA's allocator statistics."""
    torch.manual_seed(0)
    model = GPT.from_preset("gpt2-small", recompute=recompute).cuda().train()
    B, T = 4, 1024
    idx = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    estimate = activation_bytes(model.config, B, T, recompute, "bfloat16", "triton", "cuda")["peak"]
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


def test_plan_shards_state_under_fsdp_and_times_the_step_from_the_flops():
    fsdp = plan(PlanConfig(preset="gpt2-xl", batch_size=8, seq_len=1024, parallel="fsdp", gpus=8, gpu="h100"))
    ddp = plan(PlanConfig(preset="gpt2-xl", batch_size=8, seq_len=1024, parallel="ddp", gpus=8, gpu="h100"))
    P, C = fsdp.params, 1600
    assert P == 48 * (12 * C * C + 10 * C) + 2 * C + 50257 * C + 1024 * C == 1_557_380_800  # blocks, norm, tables
    assert fsdp.memory["weights (fp32)"] == 4 * P // 8 and ddp.memory["weights (fp32)"] == 4 * P
    assert fsdp.memory["optimizer (AdamW, 2 x fp32)"] == 8 * P // 8
    assert ddp.memory["DDP gradient buckets (fp32)"] == 4 * P
    assert fsdp.total("none") < ddp.total("none")
    tokens, peak = 8 * 1024, PEAKS["H100 SXM"]["bf16"]
    assert fsdp.step_seconds["none"] == pytest.approx(tokens * flops_per_token(fsdp.model, 1024) / (0.4 * peak))
    assert fsdp.step_seconds["blocks"] > fsdp.step_seconds["none"]  # recomputation costs time
    assert fsdp.activations["blocks"] < fsdp.activations["none"]


def test_fsdp_plan_gathers_and_casts_as_the_trainer_does():
    """The trainer's FSDP gathers weights in gpt.parallel.mixed_precision's dtype and autocast casts them per
    matmul as without FSDP: the plan counts the gathered blocks at that dtype, and the same activations
    (autocast's weight copies included) as a single GPU's."""
    from gpt.parallel import mixed_precision

    cfg = dict(preset="gpt2-xl", batch_size=8, seq_len=1024, gpu="h100")
    fsdp, one = plan(PlanConfig(**cfg, parallel="fsdp", gpus=8)), plan(PlanConfig(**cfg))
    C, V = 1600, fsdp.model.padded_vocab_size
    block, root = 12 * C * C + 13 * C, (V + 1024) * C + 2 * C
    gathered = mixed_precision().param_dtype.itemsize * (2 * block + root) + 4 * 2 * block
    assert [v for k, v in fsdp.memory.items() if k.startswith("FSDP unsharded")] == [gathered]
    assert fsdp.activations == one.activations


def test_plan_state_bytes_are_what_the_trainer_holds_after_a_step():
    """Weights, gradients and AdamW's moments, as the trainer makes them (gpt.optim.make_optimizer, fused as
    on CUDA and the CPU), counted tensor by tensor after one step: the plan's figures to the byte (AdamW's
    per-parameter step counters, a scalar each, are left out of both)."""
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", kernel_backend="torch")
    opt = make_optimizer(model, 1e-3, 0.1, fused=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    params = list(model.parameters())
    held = {"weights (fp32)": sum(p.nbytes for p in params), "gradients (fp32)": sum(p.grad.nbytes for p in params),
            "optimizer (AdamW, 2 x fp32)": sum(t.nbytes for st in opt.state.values() for k, t in st.items()
                                               if k != "step")}
    assert plan(PlanConfig(preset="tiny")).memory == held


def test_plan_counts_the_parameters_as_the_model_has_them():
    for preset in ("tiny", "mini"):
        assert plan(PlanConfig(preset=preset)).params == GPT.from_preset(preset).num_parameters()


def test_gpt_plan_prints_memory_and_time(capsys):
    assert main(["plan", "--preset", "gpt2-xl", "--batch-size", "8", "--seq-len", "1024", "--parallel", "fsdp",
                 "--gpus", "8", "--gpu", "h100", "--recompute", "blocks"]) == 0
    out = capsys.readouterr().out
    for text in ("gpt2-xl", "FSDP over 8 GPUs", "weights (fp32)", "optimizer (AdamW, 2 x fp32)", "activations",
                 "blocks*", "time per step at 40% of the peak", "H100 SXM: 989.5 TFLOP/s", "fits in 90% of 80 GiB"):
        assert text in out, text


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "2 GPUs need --parallel ddp or fsdp"),
    (["--seq-len", "2048"], "--seq-len 2048 is outside the gpt2-small model's context of 1 to 1024 tokens"),
    (["--seq-len", "0"], "--seq-len 0 is outside the gpt2-small model's context of 1 to 1024 tokens"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--gpus", "-1", "--parallel", "ddp"], "--gpus must be at least 1, got -1"),
    (["--mfu", "1.5"], "the assumed MFU must be in (0, 1]"),
])
def test_gpt_plan_refuses_bad_settings_in_one_line(args, message, capsys):
    assert main(["plan", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_gpu_of_the_planner_has_a_peak():
    for name, gpu in GPUS.items():
        assert gpu.card in PEAKS and gpu.memory_gib >= 24, name


@pytest.mark.parametrize("args, message, choice", [
    (["--gpu", "h300"], "argument --gpu: invalid choice: 'h300'", "'h100'"),
    (["--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'", "'gpt2-xl'"),
])
def test_gpt_plan_names_the_unknown_gpu_or_preset_and_the_choices(args, message, choice, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and choice in err and "Traceback" not in err
