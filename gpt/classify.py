"""Finetuning for classification (chapter 6 of "Build a Large Language Model (From Scratch)").

The recipe: take a pretrained GPT, put a new small output layer (emb_dim -> number of classes) on the
final-normed state of each text's *last* token (the only position that has attended to the whole text),
freeze all but the last transformer block, the final LayerNorm and the new layer, and train with
cross-entropy on the class labels.

The bundled data is the SMS Spam Collection (``ham``/``spam``, tab-separated). As in the book, the classes
are balanced by undersampling ``ham`` to the number of ``spam`` messages, and the messages are split
70/10/20 into train/validation/test with a seed. Messages are padded with <|endoftext|> (50256) to the
longest in their batch; the classifier reads the last *real* token of each row, so the padding changes
nothing (a causal model's earlier positions never see later ones).

    gpt finetune-classifier --hf gpt2/ --out runs/spam
    gpt classify --checkpoint runs/spam "You are a winner! Claim your prize now"
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kernels.backend import use_backend

from .cli import pick_device
from .finetune import (
    add_finetune_args,
    check_training_args,
    describe_parameters,
    fmt_loss,
    load_base_model,
    load_finetuned,
    load_train_state,
    make_optimizer,
    merge_finetuned,
    resolve_trainable,
    run_dir,
    save_finetuned,
    save_train_state,
    set_trainable,
    task_name,
    train_epochs,
    write_log,
)
from .tokenizer import EOT_ID, asset_path, encode
from .weights import save_checkpoint

# ---------------------------------------------------------------------------------------------------- data


def read_sms_spam(path=None) -> tuple[list[str], list[str]]:
    """(texts, labels) of the SMS Spam Collection: one ``label<TAB>text`` line per message, no header."""
    path = path or asset_path("SMSSpamCollection")
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab:
                raise ValueError(f"{path}, line {n}: no tab between the label and the text")
            if text.strip():
                texts.append(text)
                labels.append(label.strip())
    return texts, labels


def detect_delimiter(path, sample: str) -> str:
    """Tab for .tsv/.tab, comma for .csv; otherwise guessed from the first lines."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        raise ValueError(f"could not tell how the columns of {path} are separated: name it .csv (commas) or "
                         f".tsv (tabs)") from None


def read_table(path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV/TSV file whose first row names the columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist: check the path")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        sample = f.read(64 * 1024)
        f.seek(0)
        if not sample.strip():
            raise ValueError(f"{path} is empty: give a CSV/TSV file with a header row and some rows")
        rows = csv.reader(f, delimiter=detect_delimiter(path, sample))
        header = [h.strip() for h in next(rows)]
        for name, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if name not in header:
                raise ValueError(f"{path} has no column {name!r} (its columns: {header}): name the right one "
                                 f"with {flag}")
        ti, li = header.index(text_column), header.index(label_column)
        texts, labels = [], []
        for n, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(ti, li):
                raise ValueError(f"{path}, row {n}: has {len(row)} columns, the header has {len(header)}")
            text, label = row[ti], row[li].strip()
            if not label:
                raise ValueError(f"{path}, row {n}: the label (column {label_column!r}) is empty")
            if text.strip():
                texts.append(text)
                labels.append(label)
    return texts, labels


def class_names(labels, source: str = "the data") -> list[str]:
    """The distinct labels, sorted (so ``ham`` = 0 and ``spam`` = 1, as in the book)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"{source} has only one class ({names[0] if names else 'no rows at all'!r}): a "
                         f"classifier needs examples of at least two labels")
    return names


def balance_classes(texts, labels, seed: int = 123, limit: int | None = None) -> list[tuple[str, str]]:
    """Undersample every class to the size of the smallest one (and to ``limit // classes`` with a limit).

    Returns (text, label) pairs, class by class; :func:`split_examples` shuffles them.
    """
    by_class: dict[str, list[str]] = {}
    for text, label in zip(texts, labels):
        by_class.setdefault(label, []).append(text)
    per_class = min(len(v) for v in by_class.values())
    if limit is not None:
        if limit < len(by_class):
            raise ValueError(f"--limit {limit} is fewer than one example per class ({len(by_class)} classes)")
        per_class = min(per_class, limit // len(by_class))
    rng = random.Random(seed)
    return [(t, label) for label in sorted(by_class) for t in rng.sample(by_class[label], per_class)]


def split_examples(examples, seed: int = 123, train_frac: float = 0.7, val_frac: float = 0.1):
    """Shuffle with ``seed`` and cut into train/validation/test (70/10/20 by default)."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_train, n_val = int(len(examples) * train_frac), int(len(examples) * val_frac)
    train, val, test = examples[:n_train], examples[n_train:n_train + n_val], examples[n_train + n_val:]
    if not train or not val or not test:
        raise ValueError(f"{len(examples)} examples are too few for a {train_frac:.0%}/{val_frac:.0%}/"
                         f"{1 - train_frac - val_frac:.0%} split (one of the parts would be empty): use at "
                         f"least 10 examples (a larger --limit)")
    return train, val, test


class ClassificationDataset(Dataset):
    """(token ids, class index) per example, each text truncated to ``max_length`` tokens."""

    def __init__(self, examples, label_names: list[str], max_length: int | None = None):
        index = {name: i for i, name in enumerate(label_names)}
        self.items = []
        for text, label in examples:
            if label not in index:
                raise ValueError(f"label {label!r} is not one of the classifier's labels {label_names}")
            ids = encode(text, allow_special=False)  # "<|endoftext|>" in a message stays plain text
            self.items.append((ids[:max_length] if max_length else ids, index[label]))

    def longest(self) -> int:
        return max(len(ids) for ids, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_classification(batch, pad_id: int = EOT_ID):
    """Pad a batch of (ids, label) to its longest text with ``pad_id``.

    Returns ids (B, T), lengths (B,) (the number of real tokens per row) and labels (B,).
    """
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    for row, (seq, _) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq, _ in batch], dtype=torch.long)  # (B,)
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)  # (B,)
    return ids, lengths, labels


# --------------------------------------------------------------------------------------------------- model


class GPTClassifier(nn.Module):
    """A GPT and a new output layer that maps the last real token's final-normed state to class logits.

    The GPT's own language-model head stays in place (it is tied to the token embedding) but is not used.
    """

    def __init__(self, gpt: nn.Module, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.emb_dim, num_classes).to(gpt.device)

    @property
    def config(self):
        return self.gpt.config

    @property
    def device(self) -> torch.device:
        return self.gpt.device

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) for token ids (B, T); ``lengths`` (B,) marks where each row's
        real tokens end (the rest is padding); without it the last position is used."""
        with use_backend(self.gpt.kernel_backend):
            h = self.gpt.hidden_states(idx)  # (B, T, C)
        if lengths is None:
            last = h[:, -1, :]  # (B, C)
        else:
            if int(lengths.min()) < 1 or int(lengths.max()) > idx.shape[1]:
                raise ValueError(f"lengths must be in [1, {idx.shape[1]}], got {lengths.tolist()}")
            last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]  # (B, C)
        return self.head(last)  # (B, num_classes)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose highest logit is at the true label: logits (B, K), labels (B,)."""
    if labels.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def evaluate_classifier(model: GPTClassifier, loader, max_batches: int | None = None,
                        desc: str = "evaluating") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a loader's examples (the first ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for i, (ids, lengths, labels) in enumerate(tqdm(loader, total=total, desc=desc, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        labels = labels.to(model.device)
        logits = model(ids.to(model.device), lengths)  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        n += labels.numel()
    model.train(was_training)
    return (loss_sum / n, correct / n) if n else (float("nan"), float("nan"))


def classification_loss(model: GPTClassifier, batch) -> torch.Tensor:
    ids, lengths, labels = batch
    logits = model(ids.to(model.device), lengths)  # (B, K)
    return F.cross_entropy(logits, labels.to(model.device))


@torch.no_grad()
def predict(model: GPTClassifier, texts: list[str], max_length: int | None = None,
            batch_size: int = 16) -> torch.Tensor:
    """Class probabilities (N, K) for N texts (each truncated to ``max_length`` tokens)."""
    model.eval()
    limit = min(max_length or model.config.context_length, model.config.context_length)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = []
        for n, text in enumerate(texts[start:start + batch_size], start + 1):
            ids = encode(text, allow_special=False)[:limit]
            if not ids:
                raise ValueError(f"text {n} is empty: there is nothing to classify")
            batch.append((ids, 0))
        ids, lengths, _ = collate_classification(batch)
        out.append(torch.softmax(model(ids.to(model.device), lengths).float(), dim=-1).cpu())  # (b, K)
    return torch.cat(out)  # (N, K)


# ------------------------------------------------------------------------------------------------ commands


def load_examples(args) -> tuple[list[str], list[str], str]:
    if args.data:
        texts, labels = read_table(args.data, args.text_column, args.label_column)
        return texts, labels, args.data
    return *read_sms_spam(), "the bundled SMS Spam Collection"


def cmd_finetune_classifier(args) -> int:
    check_training_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    texts, labels, source = load_examples(args)
    names = class_names(labels, source)
    examples = balance_classes(texts, labels, seed=args.seed, limit=args.limit)
    train, val, test = split_examples(examples, seed=args.seed)
    counts = {name: sum(1 for _, label in examples if label == name) for name in names}
    print(f"data: {source}, {len(texts):,} examples, balanced to {counts}; "
          f"train/val/test {len(train)}/{len(val)}/{len(test)}")

    out = run_dir(args, "classifier")
    if args.resume:
        model, meta = load_finetuned(out, device)
        if meta.get("task") != "classifier":
            raise ValueError(f"--resume {out}: that run made {task_name(meta)}, not a classifier")
        if meta["labels"] != names:
            raise ValueError(f"--resume {out}: that run's labels {meta['labels']} differ from the data's {names}")
        mode, lora, max_length = meta["trainable"], meta["lora"], meta["max_length"]
        state = load_train_state(out)
        start_epoch, step, history = state["epoch"] + 1, state["step"], meta.get("history", [])
        model.gpt.set_dropout(args.dropout)
        print(f"resuming {out} after epoch {start_epoch} (step {step})")
    else:
        mode, lora = resolve_trainable(args)
        gpt, what, base = load_base_model(args, device)
        print(f"model: {what}")
        ctx = gpt.config.context_length
        if args.max_length is not None and not 1 <= args.max_length <= ctx:
            raise ValueError(f"--max-length {args.max_length} must be between 1 and the model's context length "
                             f"{ctx}")
        max_length = args.max_length or min(ClassificationDataset(train, names).longest(), ctx)
        if lora and "preset" in base:  # a fresh model exists nowhere else: keep it beside the adapters
            save_checkpoint(gpt, out / "base")
            base = {"checkpoint": "base"}
        model = GPTClassifier(gpt, len(names)).to(device)
        meta = {"task": "classifier", "labels": names, "max_length": max_length, "trainable": mode,
                "lora": lora, "base": base, "data": source, "seed": args.seed}
        start_epoch, step, history, state = 0, 0, [], None
    set_trainable(model.gpt, mode, new_modules=[model.head], lora=lora)
    print(f"finetuning: --trainable {mode}" + (f" (LoRA rank {lora['rank']}, alpha {lora['alpha']:g})"
                                               if lora else "") + f"; {describe_parameters(model)}")
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    datasets = [ClassificationDataset(part, names, max_length) for part in (train, val, test)]
    print(f"texts truncated to {max_length} tokens and padded with <|endoftext|> to the longest in each batch")
    train_loader = DataLoader(datasets[0], batch_size=args.batch_size, shuffle=True, generator=torch.Generator(),
                              collate_fn=collate_classification)
    eval_loaders = [DataLoader(ds, batch_size=args.batch_size, collate_fn=collate_classification)
                    for ds in datasets]

    def on_epoch_end(epoch, step, running_loss):
        metrics = {"epoch": epoch + 1, "step": step, "running_train_loss": running_loss}
        for split, loader in zip(("train", "val", "test"), eval_loaders):
            loss, acc = evaluate_classifier(model, loader, args.eval_batches, desc=f"evaluating {split}")
            metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = loss, acc
        print(f"epoch {epoch + 1}/{args.epochs} (step {step}): " + " | ".join(
            f"{s} loss {fmt_loss(metrics[f'{s}_loss'])} acc {100 * metrics[f'{s}_accuracy']:.1f}%"
            for s in ("train", "val", "test")))
        history.append(metrics)
        write_log(out, metrics)
        save_finetuned(out, model, {**meta, "history": history})
        save_train_state(out, optimizer, epoch, step)

    out.mkdir(parents=True, exist_ok=True)
    if start_epoch >= args.epochs or (args.max_steps is not None and step >= args.max_steps):
        print(f"{out} has already trained {start_epoch} epochs ({step} steps): raise --epochs or --max-steps "
              f"to train more")
        return 0
    train_epochs(model, train_loader, classification_loss, optimizer, epochs=args.epochs, seed=args.seed,
                 start_epoch=start_epoch, step=step, max_steps=args.max_steps, on_epoch_end=on_epoch_end)
    print(f"saved the classifier to {out}; try: gpt classify --checkpoint {out} \"some text\"")
    if lora and args.merge:
        print(f"merged the LoRA adapters into the base weights: {merge_finetuned(out, out / 'merged')}")
    return 0


def cmd_classify(args) -> int:
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no text to classify: give it as an argument (gpt classify --checkpoint DIR \"text\") "
                         "or one per line on stdin")
    device = pick_device(args.device)
    model, meta = load_finetuned(args.checkpoint, device)
    if meta.get("task") != "classifier":
        raise ValueError(f"{args.checkpoint} holds {task_name(meta)}, not a classifier: finetune one "
                         f"with `gpt finetune-classifier`")
    probs = predict(model, texts, meta.get("max_length"))  # (N, K)
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        print(f"{meta['labels'][k]}\t{p[k].item():.3f}" + (f"\t{text}" if len(texts) > 1 else ""))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("finetune-classifier", help="finetune a GPT as a text classifier (default: SMS spam)")
    add_finetune_args(p, trainable="last-block", epochs=5, lr=5e-5)
    p.add_argument("--text-column", default="text", help="with --data: the column holding the text")
    p.add_argument("--label-column", default="label", help="with --data: the column holding the label")
    p.set_defaults(func=cmd_finetune_classifier)

    c = sub.add_parser("classify", help="label texts with a classifier from gpt finetune-classifier")
    c.add_argument("text", nargs="*", help="the texts to classify (default: one per line from stdin)")
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="the classifier's directory")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    c.set_defaults(func=cmd_classify)
