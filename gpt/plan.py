"""A training step's memory and time per GPU, worked out before running it (``gpt plan``).

**Weights, gradients, optimizer.** The trainer keeps fp32 weights (autocast casts them per matmul: they
are the master copy), fp32 gradients, and AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes per parameter
(ZeRO's 16Ψ), all on every GPU under DDP (plus DDP's gradient buckets, another 4 bytes per parameter:
``gradient_as_bucket_view`` is off), one N-th of each under FSDP, which also all-gathers a block's weights
(in fp32, as :func:`gpt.parallel.mixed_precision` has it; autocast then casts them per matmul as it does
alone) for its forward and backward: two blocks at a time (the one running and the one prefetched) plus the
root's (embedding tables, final norm), and holds two blocks' unsharded fp32 gradients before their
reduce-scatter.

**Activations** (after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.1, adapted to this model's fused ops). Per layer and token, what the forward keeps for
the backward with no recomputation, in bytes, with ``a`` the bytes of autocast's dtype (2 for bf16/fp16,
4 in fp32), ``r = 4`` (the residual stream stays fp32 under autocast), ``m`` a dropout mask element (1
byte on CUDA, a bool; on the CPU torch keeps the mask in the tensor's dtype, ``a``) and ``d`` = 1 if
dropout is on::

    x, the block's input (kept by ln1)              r C      ln1's mean and rstd        8
    ln1's output (the q/k/v matmul's input)         a C      q, k, v (one tensor)       3a C
    attention output o                              a C      its log-sum-exp            4 H
    dropout mask after the attention projection     d m C
    s = x + attention branch (kept by add + ln2)    r C      ln2's mean and rstd        8
    h = ln2(s) (the MLP's input)                    a C      fc output (GELU's input)   4a C
    GELU output (the projection's input)            4a C     dropout mask after the MLP d m C

    A = 2r C + 14a C + 4 H + 16 + 2 d m C         (bf16 on CUDA: 38 C + 4 H + 16 with dropout)

Korthikanti et al. count 34 C + 5 H T per token (16-bit): the same 11 C for attention and 19 C for the
MLP, but 4 C for the norms' inputs where the fp32 residual stream here costs 8 C, and 5 H T for the
(T x T) scores, softmax and dropout mask, which FlashAttention never keeps (it recomputes the scores in
the backward; its dropout mask is regenerated from a seed). Under autocast, the matmuls also keep the
bf16 copies of their weights (autocast caches them during the forward): 2 x 12 C² bytes per layer.

Recomputation keeps less per layer and token: ``blocks`` only the block's input (``r C``); ``attention``
the block's input, s with its norm statistics, and h (``2r C + a C + 8``). It then rebuilds one layer at a
time in the backward: ``A - r C`` (the whole block) or the larger branch, the MLP's ``8a C + d m C``.

**Peak.** The largest of four moments (five with ``torch``), each the kept tensors of every layer plus what
is in flight then:

- the forward's end, at the loss: the kept tensors, the loss's own (below), autocast's weight copies;
- the loss's backward: the same, with the loss's backward buffers;
- the last block's backward: its rebuilt tensors, the incoming gradient (``r C``) and the MLP's hidden
  gradient (``4a C``, GELU's input and output gradients alive together, its saved output freed), one
  weight's fresh gradient before it is added to ``.grad`` (``16 C²``), and with tied weights the output
  head's gradient (``V C`` fp32), which autograd holds until the embedding's part arrives at the end;
- the embedding's backward: the held head gradient and the embedding's own;
- with ``torch`` (below), the head's backward: every layer's kept tensors, the head's weight gradient
  and the copy of it that the backward of the head's slice to the V classes makes (``(V + Vp) C`` fp32).

The loss, with the fused kernels (``triton``): it never builds the (tokens x V) logits; it computes its
gradients in the forward, one chunk of tokens at a time, and keeps those (``a C`` per token and ``a V C``)
instead of its inputs; in the backward autograd hands it zeros of both sizes (the gradients of those
outputs) and it scales both into new tensors. With ``torch`` (the CPU's ops, and the baseline): the
logits, and F.cross_entropy keeps the fp32 log-probabilities (``4 V`` per token) and builds two more of
that size in its backward.

These bytes are held against a measured peak in ``tests/gpt/test_plan.py`` (the CPU's allocator, through
torch's profiler, with every parameter's gradient already allocated, as in any step but the first).

**Time.** A step's model FLOPs (:func:`gpt.flops.flops_per_token`) plus what recomputation adds (one more
forward of the blocks: ``2 N_blocks + 4 L H Q T`` per token for either mode), at an assumed share of the
GPU's dense peak (:data:`gpt.flops.PEAKS`), 40% by default: well-tuned GPT-2 training reaches 40-55% on
A100/H100. Communication is assumed hidden behind compute (DDP and FSDP overlap it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import GPTConfig
from .errors import UserError
from .flops import PEAKS, flops_per_token, matmul_kind, matmul_params
from .model import RECOMPUTE

PARALLEL = ("none", "ddp", "fsdp")
DTYPES = ("bfloat16", "float16", "float32")
ASSUMED_MFU = 0.4
USABLE = 0.9  # of a card's memory for tensors: the CUDA context, cuBLAS workspaces, the caching allocator's
# fragmentation take the rest
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    card: str  # the gpt.flops.PEAKS key
    memory_gib: float  # the datasheet's GB, which for HBM and GDDR cards is GiB


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("A100 SXM", 40), "a100": GPU("A100 SXM", 80), "a100-pcie": GPU("A100 PCIe", 80),
    "h100": GPU("H100 SXM", 80), "h100-pcie": GPU("H100 PCIe", 80), "h100-nvl": GPU("H100 NVL", 94),
    "h200": GPU("H200 SXM", 141), "h200-nvl": GPU("H200 NVL", 141), "gh200": GPU("GH200", 96),
    "l4": GPU("L4", 24), "l40s": GPU("L40S", 48), "l40": GPU("L40", 48), "a10": GPU("A10", 24),
    "a10g": GPU("A10G", 24), "rtx3090": GPU("RTX 3090", 24), "rtx4090": GPU("RTX 4090", 24),
    "rtx5090": GPU("RTX 5090", 32),
}


def _loss_bytes(cfg: GPTConfig, n: int, a: int, kernels: str) -> tuple[int, int, int]:
    """(kept, forward in-flight, backward in-flight) bytes of the final norm, head and loss for n tokens."""
    C, V, Vp = cfg.emb_dim, cfg.vocab_size, cfg.padded_vocab_size
    amp = a < 4
    kept = n * (4 * C + 8 + 8)  # the final norm's fp32 input and statistics; the token ids (embedding)
    if kernels == "triton":  # gradients made in the forward, kept instead of inputs (gpt_kernels.fused_cross_entropy)
        rows = min(n, max(64, (128 * 2**20 // (Vp * a)) // 64 * 64))  # tokens per chunk of logits
        kept += n * a * C + Vp * C * a  # d_hidden, d_weight
        forward = n * a * C + amp * Vp * C * a + rows * Vp * a  # final-norm output, the head's cast, one chunk
        # autograd hands the op zeros for its two kept-gradient outputs, then both are scaled into new
        # tensors; under autocast the head's is cast to fp32
        backward = 2 * (n * a * C + Vp * C * a) + amp * Vp * C * 4
    else:  # torch: F.linear then F.cross_entropy on the (n, V) logits
        kept += n * (a * C + 4 * V + 8) + amp * V * C * a  # head input, fp32 log-probabilities, targets, cast head
        forward = n * V * a + amp * n * V * 4  # the logits (and their fp32 cast under autocast)
        backward = 8 * n * V  # nll_loss's gradient and log_softmax's, fp32
    return kept, forward, backward


def activation_bytes(cfg: GPTConfig, batch_size: int, seq_len: int, recompute: str = "none",
                     dtype: str = "bfloat16", kernels: str = "triton", device: str = "cuda",
                     dropout: float | None = None, weight_copies: bool = True) -> dict[str, int]:
    """Bytes in flight at each of the step's peak moments (see the module's doc) beyond weights, gradients
    and optimizer state, for ``batch_size`` rows of ``seq_len`` tokens on one device: a dict of the four
    moments and ``"peak"``, their largest. ``kernels``: "triton" (the fused kernels) or "torch" (PyTorch's
    ops, the CPU's); ``device``: "cuda" or "cpu" (where dropout masks differ); ``dropout``: the residual
    dropout rate (None: the config's); ``weight_copies``: autocast casts fp32 weights to its dtype (False
    where the weights are in that dtype already, e.g. FSDP with a bf16 ``param_dtype``, which the trainer
    does not use)."""
    if recompute not in RECOMPUTE:
        raise UserError(f"unknown recompute mode {recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    C, H, L, Vp = cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.padded_vocab_size
    a, r = (4 if dtype == "float32" else 2), 4
    d = int((cfg.dropout if dropout is None else dropout) > 0)
    m = 1 if device == "cuda" else a  # bytes of a dropout-mask element
    n = batch_size * seq_len
    full = 2 * r * C + 14 * a * C + 4 * H + 16 + 2 * d * m * C  # A: kept per layer and token, no recompute
    kept = {"none": full, "blocks": r * C, "attention": 2 * r * C + a * C + 8}[recompute]
    rebuilt = {"none": 0, "blocks": full - r * C, "attention": 8 * a * C + d * m * C}[recompute]
    copies = 24 * C * C if a < 4 and weight_copies else 0  # autocast's bf16 copies of one layer's matmul weights
    held_copies = copies * (L if recompute == "none" else 0)  # past the forward, kept only by saved tensors
    loss_kept, loss_fwd, loss_bwd = _loss_bytes(cfg, n, a, kernels)
    head_grad = Vp * C * 4 if cfg.tie_weights else 0
    fresh_grad = 4 * C * C * (4 + (a if a < 4 else 0))  # an MLP weight's new gradient (and its bf16 one)
    layers = n * L * kept
    moments = {
        "forward end": layers + loss_kept + loss_fwd + copies * L,
        "loss backward": layers + loss_kept + loss_bwd + held_copies,
        "last block backward": (layers + n * (rebuilt + r * C + 4 * a * C) + fresh_grad + head_grad
                                + (held_copies if recompute == "none" else copies)),
        "embedding backward": n * (kept + r * C) + head_grad + Vp * C * 4,
    }
    if kernels == "torch":  # linear_cross_entropy slices the head to its V classes (a view, the whole of it too):
        # F.linear's (V, C) weight gradient, then slice_backward's copy of it into a new (Vp, C) tensor
        moments["head backward"] = layers + n * (8 * C + 16) + (cfg.vocab_size + Vp) * C * 4 + held_copies
    return {**moments, "peak": max(moments.values())}


@dataclass(frozen=True)
class PlanConfig:
    preset: str = "gpt2-small"
    batch_size: int = 8  # sequences per GPU per forward
    seq_len: int | None = None  # None: the preset's context length
    parallel: str = "none"  # none, ddp, fsdp
    gpus: int = 1
    gpu: str = "h100"  # a GPUS key
    recompute: str = "none"
    dtype: str = "bfloat16"  # the training dtype (autocast's; float32: TF32 matmuls)
    mfu: float = ASSUMED_MFU  # the share of the dense peak the step is assumed to reach

    def check(self) -> None:
        if self.gpu not in GPUS:
            raise UserError(f"unknown GPU {self.gpu!r}: choose one of {', '.join(GPUS)}")
        if self.parallel not in PARALLEL:
            raise UserError(f"unknown --parallel {self.parallel!r}: choose one of {', '.join(PARALLEL)}")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.recompute not in RECOMPUTE:
            raise UserError(f"unknown recompute mode {self.recompute!r}: choose one of {', '.join(RECOMPUTE)}")
        for name in ("batch_size", "gpus"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus > 1 and self.parallel == "none":
            raise UserError(f"{self.gpus} GPUs need --parallel ddp or fsdp (none is one GPU)")
        if not 0 < self.mfu <= 1:
            raise UserError(f"the assumed MFU must be in (0, 1], got {self.mfu}")


@dataclass
class Plan:
    config: PlanConfig
    model: GPTConfig
    seq_len: int
    params: int
    memory: dict[str, int]  # per GPU: weights, gradients, optimizer, and the parallelism's own buffers
    activations: dict[str, int]  # peak activation bytes per recompute mode
    step_seconds: dict[str, float]  # per recompute mode
    flops_per_token: int
    notes: list[str] = field(default_factory=list)

    def total(self, recompute: str) -> int:
        return sum(self.memory.values()) + self.activations[recompute]


def _state_bytes(cfg: PlanConfig, model: GPTConfig, params: int) -> dict[str, int]:
    """Per GPU: fp32 weights, fp32 gradients, AdamW's two fp32 moments, and DDP's or FSDP's buffers."""
    shard = cfg.gpus if cfg.parallel == "fsdp" else 1
    out = {"weights (fp32)": 4 * params // shard, "gradients (fp32)": 4 * params // shard,
           "optimizer (AdamW, 2 x fp32)": 8 * params // shard}
    if cfg.parallel == "ddp":
        out["DDP gradient buckets (fp32)"] = 4 * params
    elif cfg.parallel == "fsdp":
        C = model.emb_dim
        block = 12 * C * C + 13 * C  # one block's parameters
        root = (model.padded_vocab_size + model.context_length) * C + 2 * C
        # gathered in fp32 as the trainer does (gpt.parallel.mixed_precision): autocast casts per matmul
        out["FSDP unsharded: 2 blocks + root (fp32), 2 blocks' fp32 grads"] = 4 * (2 * block + root) + 4 * 2 * block
    return out


def plan(cfg: PlanConfig) -> Plan:
    """Memory per GPU and step time for ``cfg`` (see the module's doc)."""
    cfg.check()
    model = GPTConfig.from_preset(cfg.preset)
    T = model.context_length if cfg.seq_len is None else cfg.seq_len
    if not 1 <= T <= model.context_length:
        raise UserError(f"--seq-len {T} is outside the {cfg.preset} model's context of 1 to "
                         f"{model.context_length} tokens")
    params = matmul_params(model) + (model.context_length + (0 if model.tie_weights else model.padded_vocab_size)) \
        * model.emb_dim
    gpu = GPUS[cfg.gpu]
    kind = matmul_kind(cfg.dtype) if cfg.dtype != "float32" else "tf32"  # the trainer allows TF32 on CUDA
    peak = PEAKS[gpu.card][kind]
    per_token = flops_per_token(model, T)
    recompute_extra = 2 * matmul_params(model, lm_head=False) + 4 * model.n_layers * model.emb_dim * T
    tokens = cfg.batch_size * T
    seconds = {mode: tokens * (per_token + (recompute_extra if mode != "none" else 0)) / (cfg.mfu * peak)
               for mode in RECOMPUTE}
    # autocast's weight copies under FSDP too: its gathers are fp32 (gpt.parallel.mixed_precision)
    activations = {mode: activation_bytes(model, cfg.batch_size, T, mode, cfg.dtype)["peak"]
                   for mode in RECOMPUTE}
    notes = [f"{gpu.card}: {peak / 1e12:.1f} TFLOP/s dense {kind} (gpt.flops.PEAKS), {gpu.memory_gib:g} GiB"]
    return Plan(cfg, model, T, params, _state_bytes(cfg, model, params), activations, seconds, per_token, notes)


def format_plan(p: Plan) -> str:
    """The plan as ``gpt plan`` prints it: a column per recompute mode, the chosen one starred."""
    c, gpu = p.config, GPUS[p.config.gpu]
    par = "one GPU" if c.parallel == "none" else f"{c.parallel.upper()} over {c.gpus} GPUs"
    modes = [m + ("*" if m == c.recompute else "") for m in RECOMPUTE]
    label = max(max(len(k) for k in p.memory), 34) + 2

    def row(name, cells):
        return f"  {name:<{label}}" + "".join(f"{cell:>12}" for cell in cells)

    def gib(n):
        return f"{n / GIB:,.2f}"

    lines = [f"{c.preset}: {p.params / 1e6:,.1f}M parameters, {c.batch_size} x {p.seq_len} tokens per GPU per step, "
             f"{par}, {c.dtype}{' autocast' if c.dtype != 'float32' else ' (TF32 matmuls)'}, {gpu.card}", "",
             row("memory per GPU (GiB); recompute:", modes)]
    lines += [row(k, [gib(v)] * len(RECOMPUTE)) for k, v in p.memory.items()]
    lines.append(row("activations (peak in the step)", [gib(p.activations[m]) for m in RECOMPUTE]))
    lines.append(row("total", [gib(p.total(m)) for m in RECOMPUTE]))
    usable = USABLE * gpu.memory_gib * GIB
    lines.append(row(f"fits in {USABLE:.0%} of {gpu.memory_gib:g} GiB", ["yes" if p.total(m) <= usable else "NO"
                                                                        for m in RECOMPUTE]))
    tokens = c.batch_size * p.seq_len * c.gpus
    lines += ["", row(f"time per step at {c.mfu:.0%} of the peak (ms)",
                      [f"{p.step_seconds[m] * 1e3:,.1f}" for m in RECOMPUTE]),
              row("tokens/s (all GPUs)", [f"{tokens / p.step_seconds[m]:,.0f}" for m in RECOMPUTE]), "",
              f"* = --recompute. Peak: {p.notes[0]}; model FLOPs per token {p.flops_per_token:,} (6N + 12LHQT, "
              f"gpt.flops);", "recomputation adds one forward of the blocks; communication is assumed overlapped "
              "(formulas: gpt/plan.py)"]
    return "\n".join(lines)
