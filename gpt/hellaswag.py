"""HellaSwag, completion style: the yardstick that build-nanogpt and llm.c quote for GPT-2 124M.

    from gpt.hellaswag import EvalConfig, evaluate
    evaluate(EvalConfig(hellaswag="hellaswag_val.jsonl", hf="gpt2"))   # {"acc": ..., "acc_norm": ..., ...}

The data set is the file a user gives: ``hellaswag_val.jsonl`` (10,042 examples) from the HellaSwag
repository, https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl; nothing
is downloaded here. Each line is a JSON object with ``ctx`` (the context), ``endings`` (four candidate
endings), ``label`` (the right one's index) and fields this scoring does not use (``ind``,
``activity_label``, ``ctx_a``, ``ctx_b``, ``split``, ``split_type``, ``source_id``).

Scoring, as build-nanogpt's ``hellaswag.py`` and llm.c's do it: each ending is tokenized as
``" " + ending`` after the context's tokens; the model's loss on the ending's tokens alone is summed
(``acc``: the ending with the lowest sum is the prediction) and averaged over them (``acc_norm``: the
lowest mean). build-nanogpt reports, for OpenAI's GPT-2 124M on the 10,042 validation examples, acc
0.2859 and acc_norm 0.2955 this way.

The examples are scored in batches of ``batch_size`` (4 rows each, padded at the end) on the model's own
kernels: its hidden states, then the fused linear + cross-entropy with ``reduction="none"``, so on a GPU
the (rows, length, vocabulary) logits are never built. Under torchrun each process scores its share.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch

import gpt_kernels
from gpt_kernels.backend import use_backend

from .errors import UserError
from .rundir import need
from .tokenizer import get_tokenizer

ENDINGS = 4
DEFAULT_EVAL_PRESET = "gpt2-small"  # gpt eval with no model named: untrained, for trying the command out


@dataclass
class Example:
    line: int  # its line in the file (from 1)
    context: list[int]  # the context's tokens
    endings: list[list[int]]  # each ending's tokens (" " + ending)
    label: int


def read_hellaswag(path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag JSON-lines file (the first ``limit``), tokenized; a malformed line is
    refused with its number."""
    path = need(path, "file", "HellaSwag file", "give hellaswag_val.jsonl (see gpt.hellaswag)")
    enc = get_tokenizer()
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if raw.strip():
                out.append(_example(enc, raw, f"{path}:{n}", n))
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


def _example(enc, raw: bytes, where: str, line: int) -> Example:
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: a JSON {type(d).__name__}, not an object with ctx, endings and label")
    ctx, endings, label = d.get("ctx"), d.get("endings"), d.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r:.60}")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) and e for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {ENDINGS} non-empty strings, got {endings!r:.80}")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < ENDINGS:
        hint = " (the test split has no labels: use hellaswag_val.jsonl)" if label in (None, "") else ""
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {label!r}{hint}")
    return Example(line, enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + e) for e in endings], label)


@torch.no_grad()
def ending_losses(model, examples: list[Example], device, autocast=contextlib.nullcontext
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of the model's loss on each ending's tokens: two (len(examples), 4) float64 tensors.
    ``autocast()`` gives the precision's context (``gpt.runtime.Precision.autocast``)."""
    rows = [(ex.context + end, len(ex.context)) for ex in examples for end in ex.endings]
    limit = model.config.context_length
    for ex in examples:
        longest = len(ex.context) + max(map(len, ex.endings))
        if longest > limit:
            raise UserError(f"HellaSwag line {ex.line}: context and ending are {longest} tokens, more than the "
                            f"model's context of {limit}")
    L = max(len(r) for r, _ in rows)
    idx = torch.zeros(len(rows), L, dtype=torch.long)  # (4B, L), padded at the end
    targets = torch.full((len(rows), L - 1), -100, dtype=torch.long)  # (4B, L - 1): the ending's next tokens
    for i, (r, c) in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r)
        targets[i, c - 1:len(r) - 1] = idx[i, c:len(r)]  # position t predicts token t + 1
    idx, targets = idx.to(device), targets.to(device)
    with autocast(), use_backend(model.kernel_backend):
        h = model.hidden_states(idx)[:, :-1]  # (4B, L - 1, C)
        losses = gpt_kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head.weight, targets.reshape(-1),
                                                  reduction="none", num_classes=model.config.vocab_size)
    sums = losses.view(len(rows), L - 1).double().sum(1)  # (4B,): ignored positions count 0
    counts = (targets != -100).sum(1)  # (4B,)
    return sums.view(-1, ENDINGS).cpu(), (sums / counts).view(-1, ENDINGS).cpu()


def score(model, examples: list[Example], batch_size: int = 8, device=None, autocast=contextlib.nullcontext, rank=0,
          world: int = 1, progress: bool = False) -> dict:
    """Score this process's share of ``examples`` (every ``world``-th from ``rank``), in eval mode.

    Returns the counts (``n``, ``correct``, ``correct_norm``) to be summed over the processes, and this
    process's ``sum_losses``/``mean_losses`` ((n, 4)) and their example indices ``examples``."""
    from tqdm.auto import tqdm

    device = torch.device(device or next(model.parameters()).device)
    mine = list(range(rank, len(examples), world))
    was_training = model.training
    model.eval()
    sums, means = [], []
    try:
        for i in tqdm(range(0, len(mine), batch_size), desc="HellaSwag", unit="batch", disable=not progress,
                      leave=False):
            s, m = ending_losses(model, [examples[j] for j in mine[i:i + batch_size]], device, autocast)
            sums.append(s)
            means.append(m)
    finally:
        model.train(was_training)
    sums = torch.cat(sums) if sums else torch.zeros(0, ENDINGS, dtype=torch.float64)
    means = torch.cat(means) if means else torch.zeros(0, ENDINGS, dtype=torch.float64)
    labels = torch.tensor([examples[j].label for j in mine], dtype=torch.long)
    return {"n": len(mine), "correct": int((sums.argmin(1) == labels).sum()),
            "correct_norm": int((means.argmin(1) == labels).sum()), "sum_losses": sums, "mean_losses": means,
            "examples": mine}


# ------------------------------------------------------------------------------------------ gpt eval


@dataclass
class EvalConfig:
    """``gpt eval``: a model scored on a benchmark file."""

    hellaswag: str | None = None  # a HellaSwag JSON-lines file (hellaswag_val.jsonl)
    checkpoint: str | None = None  # the model: one of our checkpoint directories ...
    hf: str | None = None  # ... or a Hugging Face GPT-2 directory
    preset: str | None = None  # ... or an untrained preset (for trying the command out)
    batch_size: int = 8  # examples per forward pass (4 rows each)
    limit: int | None = None  # the first N examples only
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on the CPU
    kernels: str = "auto"


def evaluate(cfg: EvalConfig, say=print) -> dict:
    """Score ``cfg``'s model on ``cfg.hellaswag``; returns ``{"acc", "acc_norm", "n", ...}``."""
    from .runtime import Precision, check_backend, pick_device
    from .weights import describe_source, load_model, model_source

    if not cfg.hellaswag:
        raise UserError("give the benchmark to score: --hellaswag FILE.jsonl")
    for name in ("batch_size", "limit"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    examples = read_hellaswag(cfg.hellaswag, cfg.limit)
    device = pick_device(cfg.device)
    check_backend(cfg.kernels, device)
    precision = Precision(device, cfg.dtype)
    kind, source = model_source(cfg.checkpoint, cfg.hf, cfg.preset, DEFAULT_EVAL_PRESET)
    model = load_model(source, device, kind=kind, kernel_backend=cfg.kernels)
    say(f"model: {describe_source(kind, source)}; {len(examples):,} HellaSwag examples from {cfg.hellaswag}; "
        f"{precision.name} on {device}")
    r = score(model, examples, cfg.batch_size, device, precision.autocast, progress=True)
    result = {"n": r["n"], "acc": r["correct"] / r["n"], "acc_norm": r["correct_norm"] / r["n"]}
    say(f"HellaSwag: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} ({r['n']:,} examples)")
    return result
