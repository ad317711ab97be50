"""Checking a job's settings: errors that name the option a user typed (``--batch-size``), which a Python
caller reads the field's name in as easily (``batch_size``)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing

from .errors import UserError

_KINDS = {int: "an integer", float: "a number", str: "text (a path or a name)", bool: "True or False"}


def flag(name: str) -> str:
    """The command-line option of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_positive(cfg, name: str, allow_none: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"{flag(name)} must be a positive integer, got {v!r}")


def check_run_settings(cfg) -> None:
    """The checks of :meth:`gpt.settings.RunConfig.check`: the settings every training job shares."""
    from gpt_kernels.backend import BACKENDS

    from .runtime import DTYPES, PARALLEL_MODES

    check_types(cfg)
    check_positive(cfg, "batch_size")
    for name in ("epochs", "max_steps", "eval_every", "eval_batches", "save_every"):
        check_positive(cfg, name, allow_none=True)
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise UserError(f"--epochs {cfg.epochs} and --max-steps {cfg.max_steps} both set the run's length: give "
                        f"one of them")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.lr:
        raise UserError(f"--min-lr must be in [0, --lr {cfg.lr:g}], got {cfg.min_lr}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.warmup_share < 1:
        raise UserError(f"warmup_share must be in [0, 1), got {cfg.warmup_share}")
    if not 0 <= cfg.min_lr_share <= 1:
        raise UserError(f"min_lr_share must be in [0, 1], got {cfg.min_lr_share}")
    if cfg.beta2 is not None and not 0 <= cfg.beta2 < 1:
        raise UserError(f"--beta2 must be in [0, 1), got {cfg.beta2}")
    if cfg.weight_decay < 0:
        raise UserError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.kernels is not None and cfg.kernels not in BACKENDS:
        raise UserError(f"--kernels {cfg.kernels!r} is not a kernel backend: choose one of {', '.join(BACKENDS)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r} is not a training precision: choose one of {', '.join(DTYPES)}")
    if cfg.parallel is not None and cfg.parallel not in PARALLEL_MODES:
        raise UserError(f"--parallel {cfg.parallel!r} is not a way to train on several processes: choose one of "
                        f"{', '.join(PARALLEL_MODES)}")
    if cfg.checkpoint and cfg.hf:
        raise UserError("give either --checkpoint or --hf to start from, not both")


def check_types(cfg) -> None:
    """Every field of the dataclass ``cfg`` holds a value of its annotated type (an int where a float is
    wanted, a path where text is, never True/False for a number), else a ValueError naming the option: the
    other checks compare and compute with the values, and would raise a bare TypeError."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        allowed = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
        if (value is None and len(allowed) < (len(typing.get_args(hint)) if union else 1)) or any(
                _fits(value, t) for t in allowed):
            continue
        kinds = " or ".join(_KINDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)
        none = " (or None)" if union else ""
        raise UserError(f"{flag(f.name)} must be {kinds}{none}, got {value!r} ({type(value).__name__})")


def _fits(value, t) -> bool:
    if t is bool or isinstance(value, bool):
        return t is bool and isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float))
    if t is str:
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, t) if isinstance(t, type) else True
