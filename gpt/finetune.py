"""What the finetuning jobs share: their settings, which weights train, and finetuned models on disk.

The two tasks live beside it: :mod:`gpt.classify` (chapter 6 of "Build a Large Language Model (From
Scratch)": spam classification) and :mod:`gpt.instruct` (chapter 7: instruction following); LoRA
(appendix E) is in :mod:`gpt.lora`. Both train through the one engine (:mod:`gpt.engine`), so finetuning
has what pretraining has: mixed precision, clipping, accumulation, DDP, exact resume at any step, Ctrl-C.

A finetuned model is a directory with ``finetune.json`` (the task, the base model's config, the labels,
the LoRA settings, the evaluations so far) and its weights:

- full finetuning: ``config.json`` + ``model.safetensors``, a normal checkpoint of the (finetuned) GPT,
  which ``gpt generate --checkpoint DIR`` and ``load_checkpoint`` read as they read any other;
- LoRA: only ``adapters.safetensors``; ``finetune.json`` names the base model they go on (a checkpoint or
  Hugging Face directory, or ``base/`` inside the run when the base was a fresh preset);
- a classifier adds ``classifier_head.safetensors`` (its new output layer) to either.

A finetuning run directory also holds the engine's ``trainer_state.pt`` (for ``--resume``), ``log.jsonl``
and ``loss.png``: the loss per epoch and, for a classifier, the accuracy beside it (as the book plots them).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch.nn as nn
from safetensors.torch import save_file

from .checks import check_positive
from .engine import Task, Trainer
from .errors import UserError
from .lora import (
    DEFAULT_TARGETS,
    apply_lora,
    check_lora_settings,
    count_parameters,
    has_lora,
    load_lora_state,
    lora_state_dict,
    merge_lora,
    strip_lora,
)
from .model import GPT, GPTClassifier
from .plot import plot_finetuning
from .rundir import atomic_write, need
from .runtime import Processes
from .settings import RunConfig
from .trainer_state import check_new_run_dir, claim_run_dir
from .weights import (
    ADAPTERS_FILE,
    CheckpointError,
    check_vocab_padding,
    describe_source,
    load_checkpoint,
    load_model,
    load_safetensors,
    model_source,
    save_checkpoint,
    vocab_padding,
)

FINETUNE_FILE = "finetune.json"
PLOT_FILE = "loss.png"  # the loss (and a classifier's accuracy) per epoch, as the book's chapters 6 and 7 plot
HEAD_FILE = "classifier_head.safetensors"
BASE_DIR = "base"  # inside a LoRA run: the fresh preset model the adapters were trained on
TRAINABLE_CHOICES = ("last-block", "all", "lora")
TASK_NAMES = {"classifier": "a classifier", "instruct": "an instruction-following model"}
DEFAULT_LORA_RANK = 16  # appendix E's rank and alpha
DEFAULT_LORA_ALPHA = 16.0


@dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """Everything a finetuning run depends on: the shared settings of :class:`gpt.engine.RunConfig`, with
    the defaults of the book's chapters 6 and 7 (AdamW at a constant 5e-5, batch 8, no dropout, no
    clipping, an evaluation and a checkpoint after each epoch), and these. One config serves both tasks;
    a few settings belong to one of them (marked)."""

    dropout: float | None = 0.0  # the book finetunes without dropout
    epochs: int | None = None  # None: the task's (5 for a classifier, 2 for instructions, as the book)
    batch_size: int = 8
    lr: float = 5e-5
    grad_clip: float | None = None  # the book does not clip
    eval_every: int | None = None  # None: after each epoch
    eval_batches: int | None = None  # None: every example of each split
    save_every: int | None = None  # None: after each epoch
    # the data
    data: str | None = None  # None: the bundled data set (SMS Spam Collection; the book's instruction data)
    limit: int | None = None  # use only this many examples (a quick run on a slice of the data)
    max_length: int | None = None  # truncate every example to this many tokens (None: up to the context)
    examples_per_step: int | None = None  # examples per optimizer step, reached by gradient accumulation;
    # None: one batch per process (recorded as that number: a resume with other processes accumulates to it)
    # which weights train
    trainable: str | None = None  # last-block, all or lora; None: the task's ("lora" with lora_rank/alpha)
    lora_rank: int | None = None  # None with LoRA: 16
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None with LoRA: 16
    merge: bool = False  # with LoRA: also write the model with the adapters merged in, to OUT/merged
    # the classifier's
    text_column: str = "text"  # with a CSV/TSV data file: the column holding the text...
    label_column: str = "label"  # ... and the one holding the label
    # the instruction model's
    mask_prompt: bool = False  # the loss on the response tokens only
    pad_vocab_multiple: int | None = None  # as gpt train's: the output head's rows of a fresh or GPT-2 model
    # rounded up to a multiple of this; None: 64 on CUDA, 1 elsewhere. A checkpoint keeps its own
    max_new_tokens: int = 256  # longest generated response for the test set

    warmup_share: float = 0.0  # a constant learning rate unless told otherwise, as the book: no warm-up...
    min_lr_share: float = 1.0  # ... and no decay

    RESUME_MAY_CHANGE: ClassVar[frozenset] = RunConfig.RESUME_MAY_CHANGE | {"merge", "max_new_tokens"}

    def check(self) -> None:
        super().check()
        for name in ("limit", "max_length", "examples_per_step", "pad_vocab_multiple"):
            check_positive(self, name, allow_none=True)
        if self.trainable is not None and self.trainable not in TRAINABLE_CHOICES:
            raise UserError(f"unknown --trainable {self.trainable!r}: choose one of {', '.join(TRAINABLE_CHOICES)}")
        if self.lora_rank is not None or self.lora_alpha is not None:
            check_lora_settings(self.lora_rank or DEFAULT_LORA_RANK, self.lora_alpha or DEFAULT_LORA_ALPHA)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens!r}")


def resolve_trainable(cfg: FinetuneConfig, default: str) -> tuple[str, dict | None]:
    """The trainable mode and, for LoRA, {"rank", "alpha", "targets"}."""
    lora_given = cfg.lora_rank is not None or cfg.lora_alpha is not None
    mode = cfg.trainable or ("lora" if lora_given else default)
    if lora_given and mode != "lora":
        raise UserError(f"--lora-rank/--lora-alpha go with --trainable lora, not --trainable {mode}")
    if mode != "lora":
        if cfg.merge:
            raise UserError("--merge merges LoRA adapters: it needs --trainable lora (or --lora-rank R)")
        return mode, None
    rank = DEFAULT_LORA_RANK if cfg.lora_rank is None else cfg.lora_rank
    alpha = DEFAULT_LORA_ALPHA if cfg.lora_alpha is None else cfg.lora_alpha
    return mode, {"rank": rank, "alpha": float(alpha), "targets": list(DEFAULT_TARGETS)}


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
            raise UserError("--trainable lora needs LoRA settings (rank, alpha)")
        apply_lora(gpt, lora["rank"], lora["alpha"], lora.get("targets", DEFAULT_TARGETS))  # freezes the rest
    else:
        raise UserError(f"unknown --trainable {mode!r}: choose one of {', '.join(TRAINABLE_CHOICES)}")
    for m in new_modules:
        m.requires_grad_(True)


def describe_parameters(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)"


def fmt_loss(x: float | None) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


# ------------------------------------------------------------------------------------------ the task


class FinetuneTask(Task):
    """What both finetuning tasks do alike: the model (a base, or the run being resumed), which weights
    train, the checkpoint's files, the merge at the end. A subclass adds the data, the loss and the
    evaluation, and sets ``name``, ``kind`` (the task in finetune.json) and ``default_trainable``."""

    kind: str
    default_trainable: str
    trains_head: bool = False  # whether the loss goes through the GPT's output head (its rows then padded on CUDA)

    def __init__(self, cfg: FinetuneConfig, env: Processes, saved: dict | None):
        self.env, self.lines, self.epochs = env, [], cfg.epochs
        self.load_data(cfg)  # the data first: its errors come before a model is loaded
        mode, lora = resolve_trainable(cfg, self.default_trainable)
        if saved is not None:
            model, meta = load_finetuned(cfg.resume, env.device)
            self.meta = {k: v for k, v in meta.items() if k not in ("format", "config", "history", "step")}
            self.lines.append(f"model: the {self.kind} run {cfg.resume}")
        else:
            gpt, base = self._base_model(cfg, lora, env)
            model = self.wrap(gpt)
            self.meta = {"task": self.kind, "trainable": mode, "lora": lora, "base": base,
                         "data": self.source, "seed": cfg.seed}
        gpt = model.gpt if isinstance(model, GPTClassifier) else model
        gpt.kernel_backend = cfg.kernels
        gpt.set_dropout(cfg.dropout)
        set_trainable(gpt, mode, new_modules=[model.head] if isinstance(model, GPTClassifier) else [], lora=lora)
        self.model, self.gpt = model.to(env.device), gpt
        self.examples_per_step = cfg.examples_per_step or cfg.batch_size * env.world  # (recorded: a resume with
        # another number of processes accumulates to the same step)
        self.lines.append(f"finetuning: --trainable {mode}" + (f" (LoRA rank {lora['rank']}, alpha "
                                                               f"{lora['alpha']:g})" if lora else "")
                          + f"; {describe_parameters(self.model)}; dropout {cfg.dropout:g}")
        self.found = {"trainable": mode, "lora_rank": lora and lora["rank"], "lora_alpha": lora and lora["alpha"],
                      "examples_per_step": self.examples_per_step,
                      "max_length": self.setup(cfg)}  # the datasets, now that the model's context length is known
        if self.trains_head:
            self.found["pad_vocab_multiple"] = gpt.config.pad_vocab_multiple

    def _base_model(self, cfg: FinetuneConfig, lora: dict | None, env: Processes) -> tuple[GPT, dict]:
        """The GPT to finetune and where it came from (recorded so that LoRA adapters find it again)."""
        kind, source = model_source(cfg.checkpoint, cfg.hf, cfg.preset)
        if cfg.pad_vocab_multiple is not None and not self.trains_head:
            raise UserError(f"--pad-vocab-multiple pads the output head, which {self.name} does not use: leave "
                            f"it out")
        padding = vocab_padding(kind, cfg.pad_vocab_multiple, env.device) if self.trains_head else {}
        gpt = load_model(source, env.device, kind=kind, **padding)  # a LoRA run is refused with a hint to merge
        check_vocab_padding(gpt, cfg.pad_vocab_multiple, source)
        self.lines.append(f"model: {describe_source(kind, source)}")
        if kind == "preset":
            self.lines.append("note: finetuning an untrained model only tries the command out: start from a "
                              "pretrained one with --checkpoint DIR (a run of gpt train) or --hf DIR (GPT-2)")
            # a fresh model exists nowhere else: a LoRA run keeps it beside the adapters
            return gpt, {"checkpoint": BASE_DIR} if lora else {"preset": source}
        return gpt, {kind: str(Path(source).resolve())}

    def wrap(self, gpt: GPT) -> nn.Module:
        """The model to train around the GPT (a classifier adds its head)."""
        return gpt

    def load_data(self, cfg: FinetuneConfig) -> None:
        """Read and split the data; set ``source`` (what to record as the data) and add a line to ``lines``."""
        raise NotImplementedError

    def setup(self, cfg: FinetuneConfig) -> int:
        """Make the datasets (``train_set``...), now that the model is known; returns the length examples are
        cut to (``max_length``, worked out when not given)."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        return self.lines

    def epoch_label(self, record: dict) -> str:
        return f"epoch {max(1, math.ceil(record['epoch']))}/{self.epochs} (step {record['step']})"

    def save(self, run: Trainer, model: nn.Module, directory: Path) -> None:
        if self.meta.get("base") == {"checkpoint": BASE_DIR} and not (run.run_dir / BASE_DIR).exists():
            # a LoRA run on a fresh preset keeps that base model in base/, with its first checkpoint
            save_checkpoint(strip_lora(_split(model)[0]), directory / BASE_DIR)
        save_finetuned(directory, model, {**self.meta, "step": run.step, "history": run.evals})
        seen = [{**r, "examples": r["step"] * run.per_step} for r in run.evals]
        plot_finetuning(seen, directory / PLOT_FILE, title=f"{run.run_dir.name}: {self.kind} finetuning")

    def finish(self, run: Trainer) -> dict:
        if run.config.merge and self.env.main:
            merged = merge_finetuned(run.run_dir, run.run_dir / "merged", replace=True)
            run.say(f"merged the LoRA adapters into the base weights: {merged}")
        return {}


# ----------------------------------------------------------------------------- saving and loading runs


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the GPT, the classifier head or None)."""
    if isinstance(model, GPTClassifier):
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
        atomic_write(directory / ADAPTERS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    else:
        save_checkpoint(gpt, directory, extra_config={"finetune": meta["task"]})
    if head is not None:
        hstate = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        atomic_write(directory / HEAD_FILE, lambda p: save_file(hstate, str(p), metadata={"format": "pt"}))
    full = {"format": "gpt-triton-finetune", "config": gpt.config.to_dict(), **meta}
    atomic_write(directory / FINETUNE_FILE, lambda p: p.write_text(json.dumps(full, indent=2)))
    return directory


def task_name(meta: dict) -> str:
    return TASK_NAMES.get(meta.get("task"), f"a {meta.get('task')!r} model")


def read_finetune_meta(directory) -> dict:
    directory = need(directory, "directory", "finetuned model directory",
                     "give the run directory that gpt finetune-classifier or gpt finetune-instruct wrote")
    path = directory / FINETUNE_FILE
    if not path.exists():
        raise UserError(f"{directory} holds no {FINETUNE_FILE}: it is not a finetuned model. Make one with "
                        f"`gpt finetune-classifier` or `gpt finetune-instruct`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the run directory is corrupt") from None


def update_finetune_meta(directory, updates: dict) -> None:
    """Add entries (final metrics) to a saved run's ``finetune.json``."""
    meta = {**read_finetune_meta(directory), **updates}
    atomic_write(Path(directory) / FINETUNE_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))


def _load_base(meta: dict, directory: Path) -> GPT:
    """The base model LoRA adapters were trained on, checked against the config recorded with them."""
    base = meta.get("base") or {}
    if not ("checkpoint" in base or "hf" in base):
        raise CheckpointError(f"{directory / FINETUNE_FILE} does not say where the adapters' base model is")
    kind = "checkpoint" if "checkpoint" in base else "hf"
    path = Path(base[kind])
    path = path if path.is_absolute() else directory / path
    what = f"the base model of the LoRA adapters in {directory}"
    if not path.is_dir():
        raise CheckpointError(f"{what} is gone: {directory / FINETUNE_FILE} names {str(path)!r}, which "
                              f"{'is not a directory' if path.exists() else 'does not exist'}. Put that model back "
                              f"there, or write where it is now into 'base' in that file")
    try:
        padding = {"pad_vocab_multiple": meta["config"].get("pad_vocab_multiple", 1)} if kind == "hf" else {}
        gpt = load_model(path, kind=kind, **padding)  # (GPT-2 weights padded as they were for the adapters)
    except CheckpointError as e:
        raise CheckpointError(f"{what}, {path}: {e}") from None
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
        load_lora_state(gpt, load_safetensors(directory / ADAPTERS_FILE), str(directory / ADAPTERS_FILE))
    else:
        gpt = load_checkpoint(directory)
    model = gpt
    if meta["task"] == "classifier":
        model = GPTClassifier(gpt, len(meta["labels"]))
        model.head.load_state_dict(load_safetensors(directory / HEAD_FILE))
    return model.to(device).eval(), meta


def merge_finetuned(src, out, replace: bool = False) -> Path:
    """Load LoRA adapters with their base, merge them into the weights and save a full model to ``out``,
    which must be a new or empty directory (``replace``: a run's own ``merged/`` is rewritten)."""
    if not replace:
        check_new_run_dir(out)
    model, meta = load_finetuned(src)
    gpt, _ = _split(model)
    if not has_lora(gpt):
        raise UserError(f"{src} holds a full model, not LoRA adapters: there is nothing to merge")
    merge_lora(gpt)
    merged = {**{k: v for k, v in meta.items() if k not in ("format", "config", "base")}, "lora": None,
              "merged_from": {"adapters": str(Path(src).resolve()), "lora": meta["lora"], "base": meta["base"]}}
    with contextlib.nullcontext() if replace else claim_run_dir(out, new=True):  # (a run's merged/: its run holds it)
        return save_finetuned(out, model, merged)


