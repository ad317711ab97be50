"""Finetuning for classification (chapter 6 of "Build a Large Language Model (From Scratch)").

The recipe: take a pretrained GPT, put a new small output layer (emb_dim -> number of classes) on the
final-normed state of each text's *last* token (the only position that has attended to the whole text;
:class:`gpt.model.GPTClassifier`), freeze all but the last transformer block, the final LayerNorm and the
new layer, and train with cross-entropy on the class labels.

The bundled data is the SMS Spam Collection (``ham``/``spam``, tab-separated). As in the book, the classes
are balanced by undersampling ``ham`` to the number of ``spam`` messages, and the messages are split
70/10/20 into train/validation/test with a seed. Messages are padded with <|endoftext|> (50256) to the
longest in their batch; the classifier reads the last *real* token of each row, so the padding changes
nothing (a causal model's earlier positions never see later ones).

    from gpt.classify import finetune_classifier
    from gpt.finetune import FinetuneConfig
    result = finetune_classifier(FinetuneConfig(hf="gpt2/", out="runs/spam"))   # gpt finetune-classifier
    result.metrics["test_accuracy"]
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .engine import RunResult, Trainer
from .errors import UserError
from .finetune import FinetuneConfig, FinetuneTask, fmt_loss
from .job import run
from .model import GPTClassifier
from .rundir import need
from .settings import configure
from .tokenizer import EOT_ID, asset_path, encode, read_utf8

DEFAULT_EPOCHS = 5  # chapter 6
DEFAULT_TRAINABLE = "last-block"
SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------------- data


def read_sms_spam(path=None) -> tuple[list[str], list[str]]:
    """(texts, labels) of the SMS Spam Collection: one ``label<TAB>text`` line per message, no header."""
    path = path or asset_path("SMSSpamCollection")
    texts, labels = [], []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise UserError(f"{path}, line {n}: no tab between the label and the text")
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
        raise UserError(f"could not tell how the columns of {path} are separated: name it .csv (commas) or "
                        f".tsv (tabs)") from None


def read_table(path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels) from a UTF-8 CSV/TSV file whose first row names the columns."""
    path = need(path, "file", "data file", "give a CSV or TSV file")
    text = read_utf8(path)
    if not text.strip():
        raise UserError(f"{path} is empty: give a CSV/TSV file with a header row and some rows")
    with io.StringIO(text, newline="") as f:
        rows = csv.reader(f, delimiter=detect_delimiter(path, text[:64 * 1024]))
        header = [h.strip() for h in next(rows)]
        for name, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if name not in header:
                raise UserError(f"{path} has no column {name!r} (its columns: {header}): name the right one "
                                f"with {flag}")
        ti, li = header.index(text_column), header.index(label_column)
        texts, labels = [], []
        for n, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(ti, li):
                raise UserError(f"{path}, row {n}: has {len(row)} columns, the header has {len(header)}")
            text, label = row[ti], row[li].strip()
            if not label:
                raise UserError(f"{path}, row {n}: the label (column {label_column!r}) is empty")
            if text.strip():
                texts.append(text)
                labels.append(label)
    return texts, labels


def class_names(labels, source: str = "the data") -> list[str]:
    """The distinct labels, sorted (so ``ham`` = 0 and ``spam`` = 1, as in the book)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise UserError(f"{source} has only one class ({names[0] if names else 'no rows at all'!r}): a "
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
            raise UserError(f"--limit {limit} is fewer than one example per class ({len(by_class)} classes)")
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
        raise UserError(f"{len(examples)} examples are too few for a {train_frac:.0%}/{val_frac:.0%}/"
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
                raise UserError(f"label {label!r} is not one of the classifier's labels {label_names}")
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


# ------------------------------------------------------------------------------------------ loss and use


def classification_loss(model, batch) -> torch.Tensor:
    """The mean cross-entropy of a batch (ids (B, T), lengths (B,), labels (B,)) on the model's device."""
    ids, lengths, labels = batch
    logits = model(ids, lengths)  # (B, K)
    return F.cross_entropy(logits, labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose highest logit is at the true label: logits (B, K), labels (B,)."""
    if labels.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def _eval_sums(model, batch):
    """Summed cross-entropy, correct predictions and examples of a batch."""
    ids, lengths, labels = batch
    logits = model(ids, lengths).float()  # (B, K)
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(dim=-1) == labels).sum(), labels.numel()


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
                raise UserError(f"text {n} is empty: there is nothing to classify")
            batch.append((ids, 0))
        ids, lengths, _ = collate_classification(batch)
        out.append(torch.softmax(model(ids.to(model.device), lengths).float(), dim=-1).cpu())  # (b, K)
    return torch.cat(out)  # (N, K)


# ------------------------------------------------------------------------------------------ the job


def finetune_classifier(cfg: FinetuneConfig | None = None, *, on_step=None, **settings) -> RunResult:
    """Finetune a GPT as a text classifier as ``cfg`` says (``gpt finetune-classifier``); the result's
    ``metrics`` hold the last evaluation's loss and accuracy on the train, validation and test splits."""
    return run(configure(FinetuneConfig, cfg, settings), ClassifierTask, on_step=on_step)


class ClassifierTask(FinetuneTask):
    name = "classifier finetuning"
    kind = run_prefix = "classifier"
    default_trainable, default_epochs = DEFAULT_TRAINABLE, DEFAULT_EPOCHS
    head_flops = False  # the loss runs a two-class head, not the vocabulary's

    def load_data(self, cfg: FinetuneConfig) -> None:
        if cfg.data:
            texts, labels = read_table(cfg.data, cfg.text_column, cfg.label_column)
            self.source = cfg.data
        else:
            (texts, labels), self.source = read_sms_spam(), "the bundled SMS Spam Collection"
        self.labels = class_names(labels, self.source)
        examples = balance_classes(texts, labels, seed=cfg.seed, limit=cfg.limit)
        self.splits = split_examples(examples, seed=cfg.seed)
        counts = {name: sum(1 for _, label in examples if label == name) for name in self.labels}
        self.lines.append(f"data: {self.source}, {len(texts):,} examples, balanced to {counts}; train/val/test "
                          + "/".join(str(len(s)) for s in self.splits))

    def wrap(self, gpt) -> GPTClassifier:
        return GPTClassifier(gpt, len(self.labels))

    def setup(self, cfg: FinetuneConfig) -> int:
        if self.meta.get("labels", self.labels) != self.labels:
            raise UserError(f"--resume {cfg.resume}: that run's labels {self.meta['labels']} differ from the "
                            f"data's {self.labels}")
        ctx = self.gpt.config.context_length
        if cfg.max_length is not None and not 1 <= cfg.max_length <= ctx:
            raise UserError(f"--max-length {cfg.max_length} must be between 1 and the model's context length "
                            f"{ctx}")
        max_length = cfg.max_length or min(ClassificationDataset(self.splits[0], self.labels).longest(), ctx)
        self.meta.update(labels=self.labels, max_length=max_length)
        self.datasets = [ClassificationDataset(part, self.labels, max_length) for part in self.splits]
        self.train_set = self.datasets[0]
        self.lines.append(f"texts truncated to {max_length} tokens and padded with <|endoftext|> to the longest "
                          f"in each batch")
        return max_length

    def collate(self, items):
        return collate_classification(items)

    def count(self, batch) -> int:
        return batch[2].numel()

    def loss(self, model, batch):
        return classification_loss(model, batch)

    def evaluate(self, run: Trainer) -> dict:
        record = {"running_train_loss": run.running_loss()}
        for split, ds in zip(SPLITS, self.datasets):
            loss_sum, correct, n = run.eval_sums(ds, _eval_sums, 3)
            record[f"{split}_loss"] = loss_sum / n if n else float("nan")
            record[f"{split}_accuracy"] = correct / n if n else float("nan")
        return record

    def report(self, r: dict) -> str:
        return f"{self.epoch_label(r)}: " + " | ".join(
            f"{s} loss {fmt_loss(r[f'{s}_loss'])} acc {100 * r[f'{s}_accuracy']:.1f}%" for s in SPLITS)

    def finish(self, run: Trainer) -> dict:
        run.say(f"saved the classifier to {run.run_dir}; try: gpt classify --checkpoint {run.run_dir} \"some text\"")
        return super().finish(run)
