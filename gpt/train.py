"""Pretraining: chapter 5's training loop of "Build a Large Language Model (From Scratch)", grown up.

    from gpt.train import TrainConfig, train
    result = train(TrainConfig(epochs=10))        # what `gpt train` runs: The Verdict, the "mini" preset
    result.model, result.out_dir, result.losses

The loop is the book's ``train_model_simple`` (batches of sliding windows, AdamW with weight decay 0.1,
a train/validation loss every few steps, a sample from "Every effort moves you" after each epoch) plus
what a long run needs:

- a learning rate that warms up linearly, then follows a cosine down to ``min_lr`` (the book's appendix D),
  gradient clipping, and gradient accumulation up to a target number of tokens per optimizer step;
- bf16 autocast (or fp16 with a gradient scaler), TF32 matmuls, fused AdamW and ``torch.compile`` on CUDA;
  the model's fused ops run on the backend set by ``kernels`` (Triton on CUDA by default);
- checkpoints that a run can be resumed from exactly, written so that a crash or a full disk during a
  save never destroys the checkpoint before it; Ctrl-C finishes the step, saves, then exits;
- DistributedDataParallel when started by ``torchrun``: each process takes its share of every batch.

A run directory (``--out``, default ``runs/<date-time>``) holds:

    config.json, model.safetensors   the latest weights: ``gpt.weights.load_checkpoint(run_dir)`` loads them
    trainer_state.pt                 optimizer, scheduler, step, data position and RNG states (for --resume)
    log.jsonl                        one JSON line per evaluation and per generated sample
    loss.png                         training and validation loss against tokens seen

**Which windows a step sees.** Each epoch shuffles the training windows with a generator seeded by
(seed, epoch). Optimizer step ``s`` of the epoch takes the next ``G`` windows of that order, where
``G = batch_size * accumulation * processes``; micro-step ``m`` takes ``batch_size * processes`` of them and
process ``r`` its ``r``-th ``batch_size``. So the set of windows behind each step depends only on ``G``: one
process with batch 8, or two with batch 4, or one with batch 2 and 4 accumulation steps all follow the
same loss curve (up to float rounding), and a checkpoint's data position is just (epoch, step in epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import GPTConfig
from .data import SlidingWindowDataset, default_text_path, load_tokens, split_tokens
from .generate import generate
from .model import GPT
from .tokenizer import decode, encode
from .weights import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, load_hf, save_checkpoint

DEFAULT_PRESET = "mini"  # trains on The Verdict in minutes on a laptop CPU
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
STATE_FORMAT = "gpt-triton-trainer-1"


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "work it out" (see each comment).

    The defaults are chapter 5's run, on the small ``mini`` model instead of GPT-2 small.
    """

    # the model
    preset: str | None = None  # architecture of a fresh model; None: "mini" (ignored with checkpoint/hf)
    checkpoint: str | None = None  # start from the weights of one of our checkpoint directories instead
    hf: str | None = None  # ... or from a Hugging Face GPT-2 directory
    dropout: float | None = None  # None: the model's own (0.1 for the presets)
    book_init: bool = False  # a fresh model as the book's chapter 5 builds it: PyTorch's default init and an
    # untied output head (GPT-2's init, std 0.02 and tied, memorises The Verdict far more slowly)
    kernels: str = "auto"  # kernel backend of the model's fused ops: auto, triton, torch, reference
    # the data
    data: str | None = None  # a text file or a directory of .txt files; None: The Verdict (bundled)
    val_ratio: float = 0.1  # the last 10% of the tokens are the validation split, as in the book
    context_length: int | None = None  # tokens per window; None: the model's context length
    stride: int | None = None  # tokens between window starts; None: context_length (no overlap)
    batch_size: int = 2  # windows per forward pass per process (the book's 2)
    # the optimisation
    epochs: int = 10  # passes over the training windows (the book's 10)
    max_steps: int | None = None  # stop after this many optimizer steps; takes precedence over epochs
    lr: float = 4e-4  # peak learning rate (the book's 0.0004)
    min_lr: float | None = None  # where the cosine ends; None: lr / 10
    warmup_steps: int | None = None  # linear warm-up steps; None: 5% of the run's steps
    weight_decay: float = 0.1  # AdamW's, on matmul and embedding weights only (not biases, not LayerNorm)
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None or 0: no clipping
    tokens_per_step: int | None = None  # tokens per optimizer step (accumulating micro-batches to reach it);
    # None: one micro-batch per process
    # evaluation, logging, checkpoints
    eval_every: int = 5  # optimizer steps between train/val loss evaluations (the book's eval_freq)
    eval_batches: int = 5  # batches (of batch_size windows per process) per evaluation (the book's eval_iter)
    sample_prompt: str = "Every effort moves you"  # continued greedily after each epoch
    sample_tokens: int = 50
    save_every: int = 500  # optimizer steps between checkpoints (one is always written at the end)
    out: str | None = None  # run directory; None: runs/<date-time> (or the --resume directory)
    resume: str | None = None  # a run directory to continue
    # the machine
    seed: int = 123
    device: str = "auto"  # auto, cpu, cuda, cuda:1 (under torchrun: each process's own GPU)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16 (CUDA, grad scaler)
    compile: bool = False  # torch.compile the model


# Settings a resumed run may change; every other setting comes from the checkpoint (changing the data,
# the batch or the schedule would make the resumed run something other than a continuation).
RESUME_MAY_CHANGE = {"epochs", "max_steps", "out", "resume", "device", "dtype", "compile", "kernels", "eval_every",
                     "eval_batches", "sample_prompt", "sample_tokens", "save_every"}


@dataclass
class TrainResult:
    model: GPT  # the trained model (not wrapped in DDP or torch.compile)
    out_dir: Path | None  # the run directory (None on ranks other than 0)
    step: int  # optimizer steps done in total (including those before a resume)
    tokens_seen: int
    losses: list[float] = field(default_factory=list)  # the training loss of every step this call ran
    evals: list[dict] = field(default_factory=list)  # every evaluation of the run (also in log.jsonl)


# ------------------------------------------------------------------------------------- learning rate


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (linear and embedding weights) and none on biases and
    LayerNorm parameters, as GPT-2 and nanoGPT do (the book decays everything; on a run this short the
    difference is small). A tied head and embedding is one parameter and appears once."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def optimizer_step(optimizer, scheduler, scaler, model: nn.Module, grad_clip: float | None) -> float:
    """Clip the gradients' global norm, update the weights, clear the gradients, advance the schedule.
    Returns the learning rate this step used."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # fp16: the gradients were scaled up; clip the true ones
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped if a gradient overflowed; the scale then shrinks
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr


# ------------------------------------------------------------------------------------------ processes


class _Processes:
    """One process, or one of several started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK)."""

    def __init__(self, device_name: str):
        from .cli import pick_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        device = pick_device(device_name)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)  # one GPU per process
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns_group:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    """This process's random generators, as plain tensors and numbers (loadable with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                              "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(s["python"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled window indices of ``epoch``, (num_windows,): the same for every process and resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_windows, generator=g)


# ------------------------------------------------------------------------------------------ the run dir


def _fresh_run_dir() -> Path:
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _prepare_run_dir(path: Path) -> None:
    """Create the run directory and check that it is writable now, not after an hour of training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the run directory {str(path)!r} ({e.strerror or e}): "
                      f"choose another --out") from None


def save_training_state(run_dir: Path, model: GPT, state: dict, train_config: dict) -> None:
    """Write the weights (config.json + model.safetensors) and ``trainer_state.pt`` into ``run_dir``.

    Every file is first written whole into ``run_dir/.saving``; only when all three are written are they
    renamed over the previous ones (a rename needs no space and cannot half-happen). A full disk or a
    permission error therefore leaves the previous checkpoint as it was, and raises a clear OSError.
    """
    staging = run_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_checkpoint(model, staging, extra_config={"step": state["step"], "train": train_config})
        torch.save(state, staging / STATE_FILE)
        for name in (STATE_FILE, WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / name, run_dir / name)
    except OSError as e:
        raise OSError(f"could not save the checkpoint of step {state['step']} in {run_dir} "
                      f"({e.strerror or e}); the previous checkpoint there is intact. Free some disk space or "
                      f"fix the permissions, then continue with --resume {run_dir}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_training_state(run_dir) -> dict:
    """Read ``trainer_state.pt`` of a run directory, with clear errors for what can be wrong with it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: {str(run_dir)!r} is not a directory (give the run directory "
                              f"that `gpt train` wrote)")
    path = run_dir / STATE_FILE
    if not path.exists():
        hint = (f" It holds model weights only: start a new run from them with --checkpoint {run_dir}"
                if (run_dir / CONFIG_FILE).exists() else "")
        raise CheckpointError(f"cannot resume from {run_dir}: it has no {STATE_FILE}.{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or something the safe loader refuses
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]}): the file is truncated "
                              f"or corrupt; no run can be resumed from it") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a trainer state written by this version of `gpt train`")
    return state


def _read_log(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of a log.jsonl (those of steps <= ``up_to_step``); an unreadable line is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if up_to_step is None or r.get("step", 0) <= up_to_step:
            records.append(r)
    return records


# ------------------------------------------------------------------------------------------ settings


def _resolve_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The settings of a resumed run: the checkpoint's, with the few a resume may change taken from
    ``cfg``. A setting given in ``cfg`` (differing from the default) that contradicts the checkpoint is
    an error rather than silently ignored."""
    state = load_training_state(cfg.resume)
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known})
    merged = {}
    for f in dataclasses.fields(TrainConfig):
        mine, theirs, default = getattr(cfg, f.name), getattr(saved, f.name), getattr(defaults, f.name)
        if f.name in RESUME_MAY_CHANGE:
            merged[f.name] = mine if mine != default else theirs
        elif mine != default and mine != theirs:
            raise ValueError(f"cannot resume {cfg.resume} with {f.name}={mine!r}: that run was trained with "
                             f"{f.name}={theirs!r}. A resumed run keeps its settings: leave that option out, or start "
                             f"a new run from its weights with --checkpoint {cfg.resume}")
        else:
            merged[f.name] = theirs
    merged["resume"] = cfg.resume
    merged["out"] = cfg.out or cfg.resume
    return TrainConfig(**merged), state


def _check_config(cfg: TrainConfig) -> None:
    from kernels.backend import BACKENDS

    def positive(name, allow_none=False):
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")

    for name in ("batch_size", "epochs", "eval_every", "eval_batches", "save_every"):
        positive(name)
    for name in ("max_steps", "context_length", "stride", "tokens_per_step"):
        positive(name, allow_none=True)
    if not isinstance(cfg.sample_tokens, int) or cfg.sample_tokens < 0:
        raise ValueError(f"sample-tokens must be >= 0 (0: no samples), got {cfg.sample_tokens!r}")
    if not 0.0 <= cfg.val_ratio < 1.0:
        raise ValueError(f"val-ratio must be in [0, 1), got {cfg.val_ratio}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"min-lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise ValueError(f"warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise ValueError(f"grad-clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.kernels not in BACKENDS:
        raise ValueError(f"unknown kernel backend {cfg.kernels!r}: choose one of {', '.join(BACKENDS)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {cfg.dtype!r}: choose auto, float32, bfloat16 or float16")
    if cfg.checkpoint and cfg.hf:
        raise ValueError("give either a checkpoint or a Hugging Face directory to start from, not both")


def _build_model(cfg: TrainConfig) -> GPT:
    if cfg.checkpoint:
        model = load_checkpoint(cfg.checkpoint, kernel_backend=cfg.kernels)
    elif cfg.hf:
        model = load_hf(cfg.hf, kernel_backend=cfg.kernels)
    else:
        overrides = {"context_length": cfg.context_length} if cfg.context_length else {}
        if cfg.book_init:
            overrides.update(init="torch", tie_weights=False)
        model = GPT(GPTConfig.from_preset(cfg.preset or DEFAULT_PRESET, **overrides), kernel_backend=cfg.kernels)
    if cfg.context_length and cfg.context_length > model.config.context_length:
        raise ValueError(f"context length {cfg.context_length} is longer than the model's "
                         f"{model.config.context_length}: use --context-length {model.config.context_length} or less")
    if cfg.dropout is not None and cfg.dropout != model.config.dropout:
        model.set_dropout(cfg.dropout)
    return model


def _precision(device: torch.device, dtype: str):
    """(autocast context factory, GradScaler or None, the dtype's name) for this device and setting."""
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext, None, dtype
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("float16 training needs a CUDA GPU (it relies on a gradient scaler there): use "
                         "--dtype bfloat16 or float32 on the CPU")
    amp_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    return (lambda: torch.autocast(device.type, dtype=amp_dtype)), scaler, dtype


# ------------------------------------------------------------------------------------------ data


class _Data:
    """The token ids split 90/10 into training and validation windows, and the batches of a step."""

    def __init__(self, cfg: TrainConfig, context_length: int, procs: _Processes):
        source = cfg.data or default_text_path()
        self.source = source
        # A big corpus is tokenized once into a token file beside it. Under torchrun, process 0 does that
        # first, then the first process of each other machine (whose disk may not be shared), then the rest
        # read the file, so no two processes ever write the same file.
        tokens = None
        for my_turn in (procs.main, procs.local_rank == 0 and not procs.main, procs.local_rank != 0):
            if my_turn:
                tokens = load_tokens(source)
            procs.barrier()
        train_tokens, val_tokens = split_tokens(tokens, cfg.val_ratio)
        self.num_tokens, self.num_train_tokens, self.num_val_tokens = len(tokens), len(train_tokens), len(val_tokens)
        stride = cfg.stride or context_length
        try:
            self.train = SlidingWindowDataset(train_tokens, context_length, stride)
        except ValueError:
            raise ValueError(f"the training split of {source} has {len(train_tokens)} tokens, fewer than one "
                             f"window of {context_length} (+1 for the targets): use a longer text, a smaller "
                             f"--context-length or a smaller --val-ratio") from None
        self.val = None
        if cfg.val_ratio > 0:
            try:
                self.val = SlidingWindowDataset(val_tokens, context_length, context_length)
            except ValueError:
                raise ValueError(f"the validation split of {source} ({cfg.val_ratio:.0%} of it) has "
                                 f"{len(val_tokens)} tokens, fewer than one window of {context_length} "
                                 f"(+1 for the targets): use a longer text, a smaller --context-length, a larger "
                                 f"--val-ratio, or --val-ratio 0 to train without validation") from None

    @staticmethod
    def batch(ds: SlidingWindowDataset, windows, device: torch.device):
        """Inputs and targets of the given window indices, each (len(windows), T) int64 on ``device``."""
        pairs = [ds[int(i)] for i in windows]
        x = torch.stack([p[0] for p in pairs])  # (B, T)
        y = torch.stack([p[1] for p in pairs])  # (B, T)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y


@torch.no_grad()
def evaluate(model: nn.Module, ds: SlidingWindowDataset | None, num_windows: int, batch_size: int,
             procs: _Processes, autocast) -> float | None:
    """Mean loss over the first ``num_windows`` windows of ``ds`` (shared out among the processes)."""
    if ds is None:
        return None
    windows = list(range(min(num_windows, len(ds))))[procs.rank::procs.world]
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            x, y = _Data.batch(ds, chunk, procs.device)
            with autocast():
                _, loss = model(x, y, return_logits=False)
            total += loss.item() * len(chunk)  # every window has T tokens: the sum of per-window means
    finally:
        model.train(was_training)
    total, count = procs.sum([total, float(len(windows))])
    return total / count


# ------------------------------------------------------------------------------------------ Ctrl-C


class _StopOnSignal:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step; a second
    one stops at once. Signal handlers can only be set in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nstopping after this step to save a checkpoint (press Ctrl-C again to quit without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: TrainConfig | None = None, *, on_step=None, **settings) -> TrainResult:
    """Train a model as ``cfg`` says (or ``train(epochs=2, preset="tiny", ...)``); see :class:`TrainConfig`.

    ``on_step(step, loss)`` is called after every optimizer step (``step`` counts from 1).
    Raises ValueError/OSError for bad settings, data or checkpoints, and KeyboardInterrupt after saving a
    checkpoint when stopped by Ctrl-C.
    """
    cfg = dataclasses.replace(cfg or TrainConfig(), **settings)
    if cfg.data:  # absolute, so that a resume from another working directory finds the same data
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    _check_config(cfg)
    resumed = None
    if cfg.resume:
        cfg, resumed = _resolve_resume(cfg)
    procs = _Processes(cfg.device)
    try:
        return _run(cfg, resumed, procs, on_step)
    finally:
        procs.close()


def _run(cfg: TrainConfig, resumed: dict | None, procs: _Processes, on_step) -> TrainResult:
    device, say = procs.device, (tqdm.write if procs.main else (lambda *a, **k: None))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True

    # ---- the model (fresh, from a checkpoint, or the one being resumed), with identical weights everywhere
    _seed_all(cfg.seed)
    if resumed:
        model = load_checkpoint(cfg.resume, kernel_backend=cfg.kernels)
        saved_step = json.loads((Path(cfg.resume) / CONFIG_FILE).read_text()).get("step")
        if saved_step != resumed["step"]:
            raise CheckpointError(f"{cfg.resume} holds weights of step {saved_step} but a trainer state of step "
                                  f"{resumed['step']}: a save was cut short; it cannot be resumed exactly")
        if model.config.to_dict() != resumed["model_config"]:
            raise CheckpointError(f"the model in {cfg.resume} does not match its trainer state")
    else:
        model = _build_model(cfg)
    model.to(device)
    ctx = cfg.context_length or model.config.context_length

    # ---- the data, and how many windows make one optimizer step
    data = _Data(cfg, ctx, procs)
    per_micro = cfg.batch_size * procs.world  # windows per micro-step, all processes together
    accum = max(1, round((cfg.tokens_per_step or per_micro * ctx) / (per_micro * ctx)))
    per_step = per_micro * accum  # windows per optimizer step
    if resumed and per_step * ctx != resumed["train_config"]["tokens_per_step"]:
        raise ValueError(f"cannot resume {cfg.resume} with {procs.world} process(es) of batch {cfg.batch_size}: "
                         f"the run took {resumed['train_config']['tokens_per_step']} tokens per optimizer step, and "
                         f"micro-steps of {per_micro} windows of {ctx} tokens do not add up to that; resume with "
                         f"the number of processes it was saved with ({resumed['world_size']})")
    steps_per_epoch = len(data.train) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(data.train)} windows of {ctx} tokens, fewer than one "
                         f"optimizer step needs ({cfg.batch_size} per batch x {procs.world} process(es) x "
                         f"{accum} accumulation step(s) = {per_step}): lower --batch-size or --tokens-per-step, "
                         f"use a smaller --context-length or --stride, or more text")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    warmup = max(1, round(0.05 * total_steps)) if cfg.warmup_steps is None else cfg.warmup_steps
    # the settings as they were resolved: what a resume continues with, what config.json records
    cfg = dataclasses.replace(cfg, preset=cfg.preset or (None if cfg.checkpoint or cfg.hf else DEFAULT_PRESET),
                              context_length=ctx, stride=cfg.stride or ctx, min_lr=min_lr, warmup_steps=warmup,
                              tokens_per_step=per_step * ctx)
    saved_config = dataclasses.asdict(cfg)

    # ---- the run directory (the first process writes everything)
    run_dir = Path(cfg.out) if cfg.out else _fresh_run_dir()
    continues_in_place = bool(resumed) and run_dir.resolve() == Path(cfg.resume).resolve()
    if procs.main:
        if not continues_in_place and (run_dir / STATE_FILE).exists():
            raise ValueError(f"{run_dir} already holds a training run: continue it with --resume {run_dir}, "
                             f"or give another --out")
        _prepare_run_dir(run_dir)

    # ---- optimizer, schedule, precision, DDP, compile
    autocast, scaler, dtype_name = _precision(device, cfg.dtype)
    # fused AdamW: one kernel for the whole update (on a 2-core CPU 40x faster than the default for 16M
    # parameters, where the default's per-op passes over the weights took longer than the model's backward)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg.lr, min_lr, warmup, total_steps) / cfg.lr)
    step, epoch, batch_in_epoch = 0, 0, 0
    evals: list[dict] = []
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, epoch, batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch"]
        if resumed["world_size"] == procs.world:
            _set_rng_state(resumed["rng"][procs.rank])
        else:
            _seed_all(cfg.seed + procs.rank + step)
            say(f"note: the run was saved with {resumed['world_size']} process(es), not {procs.world}: the data "
                f"order continues exactly, the dropout masks do not")
        if procs.main:
            evals = [r for r in _read_log(Path(cfg.resume) / LOG_FILE, step) if r.get("event") == "eval"]
    else:
        _seed_all(cfg.seed + procs.rank)  # the same weights everywhere, different dropout masks per process
    raw_model = model
    fwd_model = torch.compile(model) if cfg.compile else model
    train_model = fwd_model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    tokens_per_step = per_step * ctx
    what = (f"from {cfg.checkpoint}" if cfg.checkpoint else f"from GPT-2 {cfg.hf}" if cfg.hf
            else f"preset {cfg.preset!r}")
    if procs.main:
        say(f"model: {what}, {raw_model.num_parameters() / 1e6:.1f}M parameters, context {ctx}, "
            f"dropout {raw_model.config.dropout}, kernels {cfg.kernels}, {dtype_name} on {device}"
            f"{' with torch.compile' if cfg.compile else ''}")
        say(f"data: {data.source}: {data.num_train_tokens:,} training / {data.num_val_tokens:,} validation tokens; "
            f"{len(data.train)} windows of {ctx}, {steps_per_epoch} steps per epoch, {tokens_per_step:,} tokens per "
            f"step ({cfg.batch_size} per batch x {accum} accumulation x {procs.world} process(es))")
        say(f"schedule: {total_steps} steps, lr {cfg.lr:g} after {warmup} warm-up steps, cosine down to {min_lr:g}; "
            f"run directory {run_dir}" + (f" (resumed at step {step})" if resumed else ""))

    # ---- bookkeeping shared by the periodic, final and Ctrl-C saves
    log_path = run_dir / LOG_FILE
    if procs.main and resumed:  # the run's log so far, without records of steps after the checkpoint
        kept = _read_log(Path(cfg.resume) / LOG_FILE, step)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(record: dict):
        if procs.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save():
        rng = procs.gather(_rng_state())  # every process's generators, so a resume continues them all
        if not procs.main:
            return
        state = {"format": STATE_FORMAT, "step": step, "epoch": epoch, "batch": batch_in_epoch,
                 "tokens_seen": step * tokens_per_step, "world_size": procs.world, "train_config": saved_config,
                 "model_config": raw_model.config.to_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "rng": rng}
        save_training_state(run_dir, raw_model, state, saved_config)
        write_plot()

    def write_plot():
        if procs.main:
            from .plot import plot_losses

            plot_losses(evals, run_dir / PLOT_FILE, title=f"{run_dir.name}: {what}")

    def run_eval():
        num = cfg.eval_batches * per_micro  # windows: eval_batches batches of all processes together
        train_loss = evaluate(fwd_model, data.train, num, cfg.batch_size, procs, autocast)
        val_loss = evaluate(fwd_model, data.val, num, cfg.batch_size, procs, autocast)
        record = {"event": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4),
                  "tokens": step * tokens_per_step, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": scheduler.get_last_lr()[0], "time": round(time.time() - t_start, 2)}
        evals.append(record)
        log(record)
        say(f"Ep {max(step - 1, 0) // steps_per_epoch + 1} (step {step:06d}): train loss {train_loss:.3f}"
            + (f", val loss {val_loss:.3f}" if val_loss is not None else ""))

    def run_sample():
        if procs.main and cfg.sample_prompt and cfg.sample_tokens:
            ids = encode(cfg.sample_prompt)[-ctx:]
            out = generate(raw_model, ids, cfg.sample_tokens)  # greedy, as the book's generate_and_print_sample
            text = decode(out.tolist()).replace("\n", " ")
            log({"event": "sample", "step": step, "epoch": round(step / steps_per_epoch, 4), "text": text})
            when = f"after epoch {epoch}" if batch_in_epoch == 0 else f"at step {step}"
            say(f"sample {when}: {text}")

    # ---- the loop
    t_start = time.time()
    losses: list[float] = []
    if step == 0:
        run_eval()  # the loss before training (about ln(50257) = 10.8 for a fresh model)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not procs.main)
    stopped_by_user = False
    with _StopOnSignal() as stop, bar:
        while step < total_steps:
            order = epoch_order(len(data.train), cfg.seed, epoch)  # (num_windows,)
            while batch_in_epoch < steps_per_epoch and step < total_steps:
                t0 = time.time()
                first = batch_in_epoch * per_step
                loss_sum = torch.zeros((), device=device)
                for m in range(accum):
                    start = first + m * per_micro + procs.rank * cfg.batch_size
                    x, y = _Data.batch(data.train, order[start:start + cfg.batch_size], device)  # (B, T) each
                    last = m == accum - 1
                    sync = contextlib.nullcontext() if last or procs.world == 1 else train_model.no_sync()
                    with sync:
                        with autocast():
                            _, loss = train_model(x, y)  # train mode: (None, mean loss over B*T tokens)
                        scaled = loss / accum
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    loss_sum += loss.detach().float()
                lr = optimizer_step(optimizer, scheduler, scaler, raw_model, cfg.grad_clip)
                step_loss = procs.sum([loss_sum.item() / accum])[0] / procs.world
                if not math.isfinite(step_loss):
                    raise RuntimeError(f"the training loss became {step_loss} at step {step + 1}: lower --lr or "
                                       f"use --dtype bfloat16/float32; the last checkpoint is untouched")
                step += 1
                batch_in_epoch += 1
                if batch_in_epoch == steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_step / max(time.time() - t0, 1e-9):,.0f}")
                if on_step is not None:
                    on_step(step, step_loss)
                if step % cfg.eval_every == 0 or step == total_steps:
                    run_eval()
                if batch_in_epoch == 0 or step == total_steps:
                    run_sample()
                saved = False
                if step % cfg.save_every == 0 and step < total_steps:
                    save()
                    saved = True
                if procs.sum([float(stop.requested)])[0] > 0:  # every process stops at the same step
                    if not saved:
                        save()
                    stopped_by_user = True
                    break
            if stopped_by_user:
                break
    if stopped_by_user:
        say(f"stopped at step {step}; checkpoint saved in {run_dir}. Continue with: gpt train --resume {run_dir}")
        raise KeyboardInterrupt(f"training stopped at step {step}; checkpoint in {run_dir}")
    save()
    elapsed = time.time() - t_start
    if procs.main:
        last = evals[-1] if evals else {}
        say(f"done: {step} steps, {step * tokens_per_step:,} tokens in {elapsed:.0f} s; train loss "
            f"{last.get('train_loss', float('nan')):.3f}, val loss {last.get('val_loss') or float('nan'):.3f}. "
            f"Checkpoint, log.jsonl and loss.png in {run_dir}; try: gpt generate --checkpoint {run_dir} "
            f"--prompt \"{cfg.sample_prompt}\"")
    return TrainResult(model=raw_model, out_dir=run_dir if procs.main else None, step=step,
                       tokens_seen=step * tokens_per_step, losses=losses, evals=evals)


# ------------------------------------------------------------------------------------------ command line


def add_commands(subparsers) -> None:
    from .cli import add_common_training_args

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="pretrain a GPT on text (default: the mini model on The Verdict, as in chapter 5)",
        description="Pretrain a GPT on text. With no options: the 'mini' preset on The Verdict for 10 epochs, "
                    "as chapter 5 of the book does. Under torchrun: DistributedDataParallel, with --batch-size "
                    "windows per process.")
    add_common_training_args(p, default_preset=DEFAULT_PRESET, epochs=d.epochs, batch_size=d.batch_size, lr=d.lr)
    p.set_defaults(preset=None)  # None = "mini", so that an explicit --preset can be checked against --resume
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE_OR_DIR", default=None,
                   help="a text file or a directory of .txt files (big ones are tokenized once into a memory-mapped "
                        "token file); default: The Verdict")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio,
                   help="share of the tokens (the last ones) kept for validation (default 0.1)")
    g.add_argument("--context-length", type=int, default=None, help="tokens per window (default: the model's)")
    g.add_argument("--stride", type=int, default=None, help="tokens between windows (default: the context length)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step, reached by gradient accumulation (default: one batch)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of the run)")
    o.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 = off (default 1.0)")
    o.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the model's)")
    o.add_argument("--book-init", action="store_true",
                   help="a fresh model initialised as the book's chapter 5 (PyTorch defaults, untied head)")
    r = p.add_argument_group("evaluation and checkpoints")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between evaluations ({d.eval_every})")
    r.add_argument("--eval-batches", type=int, default=d.eval_batches, help=f"batches per evaluation "
                                                                            f"({d.eval_batches})")
    r.add_argument("--save-every", type=int, default=d.save_every, help=f"steps between checkpoints ({d.save_every})")
    r.add_argument("--sample-prompt", default=d.sample_prompt, help="text continued after each epoch")
    r.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="tokens generated for the sample")
    s = p.add_argument_group("speed")
    s.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA, float32 on the CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--kernels", default=d.kernels, choices=["auto", "triton", "torch", "reference"],
                   help="implementation of the fused ops (auto: Triton on CUDA, PyTorch on the CPU)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    train(cfg)
    return 0
