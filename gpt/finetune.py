"""What the finetuning commands share: which weights train, the epoch loop, and saving finetuned models.

The two tasks live beside it: :mod:`gpt.classify` (chapter 6 of "Build a Large Language Model (From
Scratch)": spam classification) and :mod:`gpt.instruct` (chapter 7: instruction following); LoRA
(appendix E) is in :mod:`gpt.lora`. This module also adds ``gpt lora-merge``.

A finetuned model is a directory with ``finetune.json`` (the task, the base model's config, the labels,
the LoRA settings, the per-epoch history) and its weights:

- full finetuning: ``config.json`` + ``model.safetensors``, a normal checkpoint of the (finetuned) GPT,
  which ``gpt generate --checkpoint DIR`` and ``load_checkpoint`` read as they read any other;
- LoRA: only ``adapters.safetensors``; ``finetune.json`` names the base model they go on (a checkpoint or
  Hugging Face directory, or ``base/`` inside the run when the base was a fresh ``--preset``);
- a classifier adds ``classifier_head.safetensors`` (its new output layer) to either.

``train_state.pt`` (optimizer state, epoch, step) lets ``--resume DIR`` go on after the last saved epoch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cli import add_common_training_args, load_model_from_args
from .lora import DEFAULT_TARGETS, apply_lora, count_parameters, has_lora, load_lora_state, lora_state_dict
from .lora import merge_lora as _merge_lora
from .weights import CheckpointError, _atomic_write, _load_safetensors, load_checkpoint, load_hf, save_checkpoint

FINETUNE_FILE = "finetune.json"
ADAPTERS_FILE = "adapters.safetensors"
HEAD_FILE = "classifier_head.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
TRAINABLE_CHOICES = ("last-block", "all", "lora")
TASK_NAMES = {"classifier": "a classifier", "instruct": "an instruction-following model"}
DEFAULT_LORA_RANK = 16  # appendix E's rank and alpha
DEFAULT_LORA_ALPHA = 16.0


# ------------------------------------------------------------------------------------------ command options


def add_finetune_args(p: argparse.ArgumentParser, *, trainable: str, epochs: int, lr: float) -> None:
    """The shared training options plus what both finetuning commands add."""
    add_common_training_args(p, default_preset="mini", epochs=epochs, batch_size=8, lr=lr)
    p.add_argument("--data", metavar="FILE", default=None, help="training data (default: the bundled data set)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only N examples (a quick run on a slice of the data)")
    p.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="truncate every example to L tokens (default: the longest, up to the context length)")
    p.add_argument("--trainable", choices=TRAINABLE_CHOICES, default=None,
                   help=f"which weights train (default: {trainable}; 'lora' when --lora-rank is given)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help=f"LoRA rank (implies --trainable lora; default with lora: {DEFAULT_LORA_RANK})")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help=f"LoRA alpha; the update is scaled by alpha / rank (default: {DEFAULT_LORA_ALPHA:g})")
    p.add_argument("--merge", action="store_true",
                   help="with LoRA: also write the model with the adapters merged in, to OUT/merged")
    p.add_argument("--eval-batches", type=int, default=None, metavar="N",
                   help="after each epoch, evaluate on the first N batches of each split only (default: all)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout while finetuning (default 0.0, as the book's chapters 6 and 7)")
    p.set_defaults(default_trainable=trainable)


def resolve_trainable(args) -> tuple[str, dict | None]:
    """The --trainable mode and, for LoRA, {"rank", "alpha", "targets"}."""
    mode = args.trainable
    lora_given = args.lora_rank is not None or args.lora_alpha is not None
    if mode is None:
        mode = "lora" if lora_given else args.default_trainable
    if lora_given and mode != "lora":
        raise ValueError(f"--lora-rank/--lora-alpha go with --trainable lora, not --trainable {mode}")
    if mode != "lora":
        if args.merge:
            raise ValueError("--merge merges LoRA adapters: it needs --trainable lora (or --lora-rank R)")
        return mode, None
    rank = DEFAULT_LORA_RANK if args.lora_rank is None else args.lora_rank
    alpha = DEFAULT_LORA_ALPHA if args.lora_alpha is None else args.lora_alpha
    return mode, {"rank": rank, "alpha": float(alpha), "targets": list(DEFAULT_TARGETS)}


def check_training_args(args) -> None:
    if args.resume and (args.checkpoint or args.hf):
        raise ValueError("--resume DIR continues a run with the model saved in DIR: leave out --checkpoint/--hf")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise ValueError(f"--eval-batches must be at least 1, got {args.eval_batches}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")


def run_dir(args, task: str) -> Path:
    """--resume DIR, else --out DIR, else a new runs/<task>-<time> folder."""
    if args.resume:
        return Path(args.resume)
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{task}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------------- the base model


def load_base_model(args, device) -> tuple[nn.Module, str, dict]:
    """The GPT to finetune (from --checkpoint, --hf or a fresh --preset), a description, and where it came
    from (recorded so that LoRA adapters can be put back on the same base later)."""
    if args.checkpoint:
        ck = Path(args.checkpoint)
        if (ck / FINETUNE_FILE).exists() and not (ck / "model.safetensors").exists():
            raise ValueError(f"{ck} holds LoRA adapters, not a whole model: merge them first with "
                             f"`gpt lora-merge --checkpoint {ck} --out DIR` and finetune from DIR")
    model, what = load_model_from_args(args, device)
    if args.checkpoint:
        source = {"checkpoint": str(Path(args.checkpoint).resolve())}
    elif args.hf:
        source = {"hf": str(Path(args.hf).resolve())}
    else:
        source = {"preset": args.preset}
    model.set_dropout(args.dropout)
    return model, what, source


def set_trainable(gpt: nn.Module, mode: str, new_modules=(), lora: dict | None = None) -> None:
    """Freeze all but what ``mode`` trains; ``new_modules`` (a classifier's new head) always train.

    - ``all``: every weight.
    - ``last-block``: the last transformer block and the final LayerNorm (chapter 6's choice).
    - ``lora``: LoRA adapters on the attention and feed-forward layers (appendix E); nothing else of the GPT.
    """
    if mode == "all":
        gpt.requires_grad_(True)
    elif mode == "last-block":
        gpt.requires_grad_(False)
        gpt.blocks[-1].requires_grad_(True)
        gpt.final_norm.requires_grad_(True)
    elif mode == "lora":
        if lora is None:
            raise ValueError("--trainable lora needs LoRA settings (rank, alpha)")
        apply_lora(gpt, lora["rank"], lora["alpha"], lora.get("targets", DEFAULT_TARGETS))  # freezes the rest
    else:
        raise ValueError(f"unknown --trainable {mode!r}: choose one of {', '.join(TRAINABLE_CHOICES)}")
    for m in new_modules:
        m.requires_grad_(True)


def describe_parameters(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)"


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the book's optimizer for chapters 6 and 7)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------ the epoch loop


def train_epochs(model: nn.Module, loader, loss_fn: Callable, optimizer: torch.optim.Optimizer, *, epochs: int,
                 seed: int, start_epoch: int = 0, step: int = 0, max_steps: int | None = None,
                 on_epoch_end: Callable | None = None) -> int:
    """The plain loop of chapters 5-7: for each epoch, for each batch, loss -> backward -> step.

    ``loss_fn(model, batch)`` returns the batch's mean loss. The shuffle order of epoch ``e`` depends only
    on ``seed`` and ``e``, so a resumed run sees the same batches. After each epoch (or when ``max_steps``
    is reached) ``on_epoch_end(epoch, step, mean_train_loss)`` evaluates, reports and saves. Returns the
    number of optimizer steps taken so far.
    """
    gen = getattr(loader, "generator", None)
    for epoch in range(start_epoch, epochs):
        if max_steps is not None and step >= max_steps:
            break
        if gen is not None:
            gen.manual_seed(seed + epoch)
        model.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss became {loss.item()} at step {step}: lower --lr")
            loss.backward()
            optimizer.step()
            step += 1
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{loss.item():.3f}", step=step)
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        if on_epoch_end is not None:
            on_epoch_end(epoch, step, total / max(n, 1))
    return step


# ----------------------------------------------------------------------------- saving and loading runs


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the GPT, the classifier head or None)."""
    if hasattr(model, "gpt"):
        return model.gpt, model.head
    return model, None


def save_finetuned(directory, model: nn.Module, meta: dict) -> Path:
    """Write a finetuned model (a GPT or a GPTClassifier) and its ``finetune.json``; see the module doc.

    ``meta`` holds at least ``task`` and ``lora`` (None or the LoRA settings) and, with LoRA, ``base``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gpt, head = _split(model)
    if meta.get("lora"):
        state = lora_state_dict(gpt)
        _atomic_write(directory / ADAPTERS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    else:
        save_checkpoint(gpt, directory, extra_config={"finetune": meta["task"]})
    if head is not None:
        hstate = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        _atomic_write(directory / HEAD_FILE, lambda p: save_file(hstate, str(p), metadata={"format": "pt"}))
    full = {"format": "gpt-triton-finetune", "config": gpt.config.to_dict(), **meta}
    _atomic_write(directory / FINETUNE_FILE, lambda p: p.write_text(json.dumps(full, indent=2)))
    return directory


def task_name(meta: dict) -> str:
    return TASK_NAMES.get(meta.get("task"), f"a {meta.get('task')!r} model")


def read_finetune_meta(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"finetuned model directory {str(directory)!r} does not exist: check the path")
    path = directory / FINETUNE_FILE
    if not path.exists():
        raise ValueError(f"{directory} holds no {FINETUNE_FILE}: it is not a finetuned model. Make one with "
                         f"`gpt finetune-classifier` or `gpt finetune-instruct`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the run directory is corrupt") from None


def _load_base(meta: dict, directory: Path) -> nn.Module:
    """The base model LoRA adapters were trained on, checked against the config recorded with them."""
    base = meta.get("base") or {}
    if "checkpoint" in base:
        path = Path(base["checkpoint"])
        gpt = load_checkpoint(path if path.is_absolute() else directory / path)
    elif "hf" in base:
        gpt = load_hf(base["hf"])
    else:
        raise CheckpointError(f"{directory / FINETUNE_FILE} does not say where the adapters' base model is")
    want = {k: v for k, v in meta["config"].items() if k != "dropout"}
    have = {k: v for k, v in gpt.config.to_dict().items() if k != "dropout"}
    if want != have:
        raise CheckpointError(f"the base model {base} is not the one the adapters in {directory} were trained "
                              f"on (its config differs): restore that base model")
    gpt.set_dropout(meta["config"].get("dropout", 0.0))
    return gpt


def load_finetuned(directory, device="cpu") -> tuple[nn.Module, dict]:
    """A model saved by :func:`save_finetuned`: (GPT or GPTClassifier in eval mode, its metadata)."""
    directory = Path(directory)
    meta = read_finetune_meta(directory)
    if meta.get("lora"):
        gpt = _load_base(meta, directory)
        lora = meta["lora"]
        apply_lora(gpt, lora["rank"], lora["alpha"], lora.get("targets", DEFAULT_TARGETS))
        load_lora_state(gpt, _load_safetensors(directory / ADAPTERS_FILE), str(directory / ADAPTERS_FILE))
    else:
        gpt = load_checkpoint(directory)
    model = gpt
    if meta["task"] == "classifier":
        from .classify import GPTClassifier  # here, not at the top: gpt.classify imports this module

        model = GPTClassifier(gpt, len(meta["labels"]))
        model.head.load_state_dict(_load_safetensors(directory / HEAD_FILE))
    return model.to(device).eval(), meta


def merge_finetuned(src, out) -> Path:
    """Load LoRA adapters with their base, merge them into the weights and save a full model to ``out``."""
    model, meta = load_finetuned(src)
    gpt, _ = _split(model)
    if not has_lora(gpt):
        raise ValueError(f"{src} holds a full model, not LoRA adapters: there is nothing to merge")
    _merge_lora(gpt)
    merged = {**{k: v for k, v in meta.items() if k not in ("format", "config")}, "lora": None,
              "merged_from": {"adapters": str(Path(src).resolve()), "lora": meta["lora"], "base": meta["base"]}}
    merged.pop("base", None)
    return save_finetuned(out, model, merged)


def update_finetune_meta(directory, updates: dict) -> None:
    """Add entries (final metrics) to a saved run's ``finetune.json``."""
    path = Path(directory) / FINETUNE_FILE
    meta = {**read_finetune_meta(directory), **updates}
    _atomic_write(path, lambda p: p.write_text(json.dumps(meta, indent=2)))


def save_train_state(directory, optimizer, epoch: int, step: int) -> None:
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step}
    _atomic_write(Path(directory) / TRAIN_STATE_FILE, lambda p: torch.save(state, p))


def load_train_state(directory) -> dict:
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a finetuning run that can resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"could not read {path} ({type(e).__name__}: {e}): start a new run") from None


def write_log(directory, record: dict) -> None:
    """Append one JSON line to ``log.jsonl`` in the run directory."""
    with open(Path(directory) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def fmt_loss(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


# -------------------------------------------------------------------------------------------- commands


def cmd_lora_merge(args) -> int:
    out = merge_finetuned(args.checkpoint, args.out)
    print(f"merged the LoRA adapters of {args.checkpoint} into the base weights: {out}")
    return 0


def add_commands(sub) -> None:
    from . import classify, instruct  # each adds its own commands; imported here to avoid an import cycle

    classify.add_commands(sub)
    instruct.add_commands(sub)
    m = sub.add_parser("lora-merge", help="merge a run's LoRA adapters into its base model's weights")
    m.add_argument("--checkpoint", required=True, metavar="DIR", help="a finetuning run trained with LoRA")
    m.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    m.set_defaults(func=cmd_lora_merge)


__all__ = ["add_finetune_args", "load_finetuned", "merge_finetuned", "save_finetuned", "set_trainable",
           "train_epochs"]
