"""Training throughput's yardsticks: model FLOPs per token and the device's peak FLOP/s (for the MFU that
:class:`gpt.clock.Throughput` puts in the progress bar and the log).

**Model FLOPs per token** (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's ``estimate_mfu``)::

    6 N + 12 L H Q T

``6 N``: a token's matmuls against N weights cost 2 N FLOPs (a multiply and an add) in the forward and twice
that in the backward (the gradients of the inputs and of the weights). **N here** counts every weight a
token is multiplied by: the blocks (q/k/v, attention output, MLP in and out, with their biases and the two
norms' weights, which are noise beside C²) and the final norm, plus the output head's V x C (V padded as the
model pads it: the GEMM runs over those rows) when the loss runs through the head. The embedding tables
are left out: a lookup multiplies nothing. For a model with tied weights that is exactly nanoGPT's
``get_num_params()`` (every parameter but the position table: the token table is counted as the head);
for an untied one, every parameter but both tables.

``12 L H Q T``: attention's two matmuls (scores q·k and the weighted sum of v) cost 2·2·T·Q FLOPs per head
per token forward, three times that with the backward, in each of L layers of H heads of size Q over T
positions. As in PaLM, T is the full sequence length: the causal mask's skipped half is not subtracted.

These are *model* FLOPs, the work the model needs: what activation recomputation or FlashAttention's
backward compute again is not counted, so MFU does not reward recomputation (that would be hardware
FLOPs utilisation, HFU). A finetuning that freezes weights (LoRA, last block) is counted the same way.

**Peak FLOP/s**: :data:`PEAKS`, dense (no 2:4 sparsity) tensor-core rates of the training's matmul dtype,
with fp32 accumulation (what cuBLAS uses for bf16/fp16 training: GeForce cards do fp16-accumulate at twice
the rate, which training does not use); fp32 training counts TF32 when torch allows it for matmuls (the
trainer does on CUDA). Cards are found by :data:`CARDS`, patterns on ``torch.cuda.get_device_name``. An
unknown card's peak is measured: the rate of a large matmul in the training dtype, a lower bound of the
real peak (so an MFU against it reads high; the source says so). On the CPU there is no peak: FLOP/s only.

MFU = model FLOPs per second / peak FLOP/s, per device (:class:`gpt.clock.Throughput`).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import GPTConfig

KINDS = ("bf16", "fp16", "tf32", "fp32")  # the matmul precisions of the table


def matmul_params(cfg: GPTConfig, lm_head: bool = True) -> int:
    """N of 6N: the weights a token's matmuls use (see the module's doc); the head only if ``lm_head``."""
    C = cfg.emb_dim
    per_layer = (3 * C * C + (3 * C if cfg.qkv_bias else 0)  # q, k, v
                 + C * C + C  # attention output projection
                 + 4 * C * C + 4 * C  # MLP in
                 + 4 * C * C + C  # MLP out
                 + 2 * 2 * C)  # two LayerNorms' weight and bias
    return cfg.n_layers * per_layer + 2 * C + (cfg.padded_vocab_size * C if lm_head else 0)


def flops_per_token(cfg: GPTConfig, seq_len: int, lm_head: bool = True) -> int:
    """Training FLOPs (forward + backward) per token of a sequence of ``seq_len``: 6N + 12·L·H·Q·T."""
    return 6 * matmul_params(cfg, lm_head) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# Dense peak FLOP/s per matmul precision (bf16/fp16 with fp32 accumulation); sources beside each card.
# Datasheets print the 2:4-sparsity figure with a "*": the dense rate is half of it.
PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web): the same rates for
    # the 40 GB and 80 GB cards, SXM and PCIe: BF16/FP16 312 (624*), TF32 156 (312*), FP32 19.5 TFLOPS
    "A100 SXM": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A100 PCIe": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    # NVIDIA H100 Tensor Core GPU datasheet: SXM BF16/FP16 1,979*, TF32 989*, FP32 67; PCIe 1,513*, 756*, 51;
    # NVL 1,671*, 835*, 60 TFLOPS (* with sparsity)
    "H100 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the GPU's BF16/FP16 1,979*, TF32 989*, FP32 67 TFLOPS
    "GH200": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    # NVIDIA H200 Tensor Core GPU datasheet: SXM BF16/FP16 1,979*, TF32 989*, FP32 67; NVL 1,671*, 835*, 60 TFLOPS
    "H200 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    # NVIDIA L4 Tensor Core GPU datasheet: BF16/FP16 242*, TF32 120*, FP32 30.3 TFLOPS
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    # NVIDIA L40S GPU datasheet: BF16/FP16 362.05 (733*), TF32 183 (366*), FP32 91.6 TFLOPS
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    # NVIDIA L40 GPU datasheet: BF16/FP16 181.05 (362.1*), TF32 90.5 (181*), FP32 90.5 TFLOPS
    "L40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    # NVIDIA A10 Tensor Core GPU datasheet: BF16/FP16 125 (250*), TF32 62.5 (125*), FP32 31.2 TFLOPS
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # A10G (AWS G5): NVIDIA publishes no datasheet for it; the A10's figures (the same GA102 chip), as
    # Lightning's throughput utility takes them. Measure (bench) if it matters.
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A, GeForce RTX 3090: FP16/BF16 tensor with FP32
    # accumulate 71 (142*), TF32 35.6 (71*), FP32 35.6 TFLOPS
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    # NVIDIA Ada GPU architecture whitepaper, appendix A, GeForce RTX 4090: FP16/BF16 tensor with FP32
    # accumulate 165.2 (330.4*), TF32 82.6 (165.2*), FP32 82.6 TFLOPS
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    # NVIDIA RTX Blackwell GPU architecture whitepaper, appendix A, GeForce RTX 5090: FP16/BF16 tensor with
    # FP32 accumulate 209.5 (419*), TF32 104.8 (209.5*), FP32 104.8 TFLOPS
    "RTX 5090": {"bf16": 209.5e12, "fp16": 209.5e12, "tf32": 104.8e12, "fp32": 104.8e12},
}

# torch.cuda.get_device_name patterns -> PEAKS key, the first match wins (e.g. "NVIDIA H100 80GB HBM3" is the
# SXM card, "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090"; "... RTX 4090 D" and laptop parts are not
# these cards, and get measured)
CARDS: list[tuple[str, str]] = [
    (r"\bA100\b.*\bPCIe\b", "A100 PCIe"),
    (r"\bA100\b", "A100 SXM"),
    (r"\bGH200\b", "GH200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bRTX 3090$", "RTX 3090"),
    (r"\bRTX 4090$", "RTX 4090"),
    (r"\bRTX 5090$", "RTX 5090"),
]


def card(device_name: str) -> str | None:
    """The :data:`PEAKS` key of a ``torch.cuda.get_device_name``, or None for a card not in the table."""
    name = device_name.strip()
    return next((key for pattern, key in CARDS if re.search(pattern, name, re.IGNORECASE)), None)


def matmul_kind(dtype) -> str:
    """The matmul precision of a training dtype (``"bfloat16"``, ``torch.float16``, ...): bf16, fp16, or for
    float32 tf32 when torch lets CUDA matmuls use TF32 (the trainer does), else fp32."""
    name = str(dtype).removeprefix("torch.")
    kinds = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    if name not in kinds:
        raise ValueError(f"no matmul peak for dtype {dtype!r}: use bfloat16, float16 or float32")
    if name == "float32" and torch.get_float32_matmul_precision() != "highest":  # TF32 allowed
        return "tf32"
    return kinds[name]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # where the number comes from, for the log


def measure_matmul_flops(device, dtype, n: int = 4096, min_seconds: float = 0.2) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` on ``device`` (2 n³ FLOPs each), timed after a warm-up
    over at least ``min_seconds``."""
    device = torch.device(device)
    dtype = getattr(torch, str(dtype).removeprefix("torch."))
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(2):
        a @ b
    sync(device)
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < min_seconds:
        a @ b
        runs += 1
        if runs % 4 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def peak_for(device_name: str, kind: str, measure: Callable[[], float]) -> Peak:
    """The peak of the named card at matmul precision ``kind`` (:data:`KINDS`), from the table; for a card
    not in it, ``measure()`` (a matmul's measured rate)."""
    key = card(device_name)
    if key is not None and kind in PEAKS[key]:
        return Peak(PEAKS[key][kind], f"{key} datasheet, dense {kind}")
    return Peak(measure(), f"measured: {device_name} is not in gpt.flops.PEAKS; the rate of a {kind} matmul, "
                           f"below the true peak, so MFU reads high")


@functools.cache
def device_peak(device, dtype) -> Peak | None:
    """The peak FLOP/s of a CUDA ``device`` for training in ``dtype``; None on the CPU (no MFU there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    kind = matmul_kind(dtype)
    matmul_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(kind, "float32")
    return peak_for(torch.cuda.get_device_name(device), kind, lambda: measure_matmul_flops(device, matmul_dtype))
