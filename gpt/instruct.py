"""Instruction finetuning (chapter 7 of "Build a Large Language Model (From Scratch)").

Each example is an instruction, an optional input and the wanted output, written out in the Alpaca prompt
format and trained with the ordinary next-token loss::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    Convert 45 kilometers to meters.

    ### Response:
    45 kilometers is 45000 meters.<|endoftext|>

The collate function pads a batch with <|endoftext|> (50256) but keeps only the *first* one as a target
(the model must learn to stop); the rest of the padding gets the target -100, which the loss ignores.
``mask_prompt`` also sets the prompt's targets to -100, so the loss is on the response alone. A loss is
the mean over the targets that count, however the examples are batched.

After training, the test set's responses are generated (greedy) and written to ``test-responses.json``
beside the checkpoint, scored against the reference outputs with ROUGE-L F1 (see :func:`rouge_l_f1`):
an automatic, offline stand-in for chapter 7's scoring by a larger model (Llama 3 through Ollama).

    from gpt.finetune import FinetuneConfig
    from gpt.instruct import finetune_instruct
    result = finetune_instruct(FinetuneConfig(hf="gpt2-medium/", out="runs/instruct"))   # gpt finetune-instruct
    result.metrics["test_rouge_l_f1"]
"""

from __future__ import annotations

import functools
import json
import re

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .engine import RunResult, Trainer
from .errors import UserError
from .finetune import (
    FINETUNE_FILE,
    FinetuneConfig,
    FinetuneTask,
    fmt_loss,
    load_finetuned,
    task_name,
    update_finetune_meta,
)
from .generate import generate
from .job import run
from .rundir import atomic_write, need
from .runtime import rng_preserved
from .settings import configure
from .tokenizer import EOT_ID, asset_path, decode, encode, read_utf8, visible
from .weights import CONFIG_FILE

DEFAULT_EPOCHS = 2  # chapter 7
DEFAULT_TRAINABLE = "all"
IGNORE_INDEX = -100  # targets with this value add nothing to the loss (PyTorch's cross-entropy default)
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.")
RESPONSES_FILE = "test-responses.json"

# ---------------------------------------------------------------------------------------------------- data


def format_input(entry: dict) -> str:
    """The Alpaca-style prompt: preamble, instruction and (when not empty) input."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_prompt(entry: dict) -> str:
    """What the model sees before its answer: :func:`format_input` and the response header."""
    return format_input(entry) + "\n\n### Response:\n"


def validate_instruction_data(data, source: str = "the instruction data") -> list[dict]:
    """Check that ``data`` is a non-empty list of {"instruction": str, "output": str, "input": str (optional)}."""
    shape = 'a JSON list of records like {"instruction": "...", "input": "...", "output": "..."}'
    if not isinstance(data, list) or not data:
        what = "an empty list" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise UserError(f"{source} must be {shape}; it is {what}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{source}: record {i} is a {type(rec).__name__}, not a record; the file must be "
                            f"{shape}")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                problem = "has no" if key not in rec else "has a non-text"
                raise UserError(f"{source}: record {i} {problem} {key!r}; every record needs text 'instruction' "
                                f"and 'output' fields ('input' is optional)")
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise UserError(f"{source}: record {i} has a non-text 'input' ({type(rec['input']).__name__})")
    return data


def load_instruction_data(path=None) -> list[dict]:
    """The records of a UTF-8 JSON instruction file (default: the bundled instruction-data.json, 1,100 records)."""
    path = need(path or asset_path("instruction-data.json"), "file", "instruction file", "give a JSON file")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): the instruction data must be a JSON list of records "
                        f"with 'instruction' and 'output'") from None
    return validate_instruction_data(data, str(path))


def split_instruction_data(data: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, validation, test) as in the book: the first 85% train, the next 10% test, the last 5% validate."""
    n_train, n_test = int(len(data) * train_frac), int(len(data) * test_frac)
    train, test, val = data[:n_train], data[n_train:n_train + n_test], data[n_train + n_test:]
    if not train or not val or not test:
        raise UserError(f"{len(data)} records are too few for an 85/5/10 train/validation/test split (a part "
                        f"would be empty): use at least 10 (a larger --limit)")
    return train, val, test


class InstructionDataset(Dataset):
    """Each record as (token ids of prompt + response, number of prompt tokens)."""

    def __init__(self, data: list[dict], max_length: int | None = None):
        self.items = []
        too_long = []
        for entry in data:
            prompt = encode(format_prompt(entry), allow_special=False)
            response = encode(entry["output"], allow_special=False)
            if max_length is not None and len(prompt) > max_length:
                too_long.append(len(prompt))
            self.items.append((prompt + response, len(prompt)))
        if too_long:
            raise UserError(f"the prompts of {len(too_long)} of {len(data)} records are longer than the maximum "
                            f"length of {max_length} tokens (the longest has {max(too_long)}), so their responses "
                            f"would be cut off entirely: raise --max-length, use a model with a longer context, "
                            f"or leave those records out")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_instructions(batch, pad_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
                         max_length: int | None = None, mask_prompt: bool = False):
    """Inputs and next-token targets, both (B, T), for a batch of (token ids, prompt length).

    Each row gets one end-of-text appended (its last target: the model learns to stop); inputs are padded
    with ``pad_id`` and targets with ``ignore_index`` to the batch's longest row. With ``mask_prompt`` the
    targets that are prompt tokens are ``ignore_index`` too. Rows are cut to ``max_length`` tokens.
    """
    rows = []
    for ids, prompt_len in batch:
        seq = list(ids) + [pad_id]  # (L + 1,): the text and one end-of-text
        inputs, targets = seq[:-1], seq[1:]  # (L,), (L,): target i is token i + 1
        if mask_prompt:
            targets[:prompt_len - 1] = [ignore_index] * (prompt_len - 1)  # targets 0..p-2 are prompt tokens 1..p-1
        if max_length is not None:
            inputs, targets = inputs[:max_length], targets[:max_length]
        rows.append((inputs, targets))
    T = max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), T), ignore_index, dtype=torch.long)  # (B, T)
    for r, (inp, tgt) in enumerate(rows):
        inputs[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        targets[r, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return inputs, targets


# ------------------------------------------------------------------------------- responses and their score


def generate_response(model, entry: dict, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None = None) -> str:
    """The model's answer to one record (greedy by default), up to its first end-of-text. A prompt longer
    than the model's context is a ValueError that says by how much."""
    prompt = encode(format_prompt(entry), allow_special=False)
    ctx = model.config.context_length
    if len(prompt) > ctx:
        raise UserError(f"the instruction is too long: in the prompt template it takes {len(prompt):,} tokens, "
                        f"more than the model's context of {ctx:,}; shorten it by {len(prompt) - ctx:,} tokens")
    out = generate(model, torch.tensor(prompt, dtype=torch.long), max_new_tokens, temperature=temperature,
                   top_k=top_k, eos_id=EOT_ID, seed=seed)  # (len(prompt) + new,)
    new = out[len(prompt):].tolist()
    if EOT_ID in new:
        new = new[:new.index(EOT_ID)]
    return decode(new).strip()


def chat_record(line: str, jsonl: bool = False) -> dict:
    """The record ({"instruction", "input"}) that a line of ``gpt chat``'s input asks: the line's text, or with
    ``jsonl`` a JSON object like those of the instruction data (its "output", if any, is not read)."""
    if not jsonl:
        return {"instruction": line.strip(), "input": ""}
    shape = 'with --jsonl each line is a JSON record {"instruction": "...", "input": "..." (optional)}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"not JSON ({e}): {shape}") from None
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(
            record.get("input", ""), str):
        raise UserError(f"not an instruction record ({line.strip()[:60]!r}): {shape}")
    return record


def chat_answers(model, lines, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, jsonl: bool = False):
    """What ``gpt chat`` prints for ``lines`` ((number, the line's text or the error reading it) pairs): one
    (output line, error or None) for each. The output line is the answer with its line breaks shown as \\n,
    an empty line for an empty one, or ``[error] line N: why`` (the error says why, for stderr). ``jsonl``:
    a JSON record in (:func:`chat_record`), the record with its "response" or {"line": N, "error": why} out."""
    for n, line in lines:
        try:
            if isinstance(line, Exception):
                raise line
            if not line.strip() and not jsonl:
                yield "", None
                continue
            record = chat_record(line, jsonl)
            response = generate_response(model, record, max_new_tokens, temperature, top_k, seed)
            yield (json.dumps({**record, "response": response}) if jsonl else visible(response)), None
        except ValueError as e:  # too long for the context, not UTF-8, not a record: say so, answer the next
            yield (json.dumps({"line": n, "error": str(e)}) if jsonl else f"[error] line {n}: {e}"), f"line {n}: {e}"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of a response against the reference: over lowercased words (runs of letters, digits and _),
    precision = LCS / candidate words, recall = LCS / reference words, F1 their harmonic mean. 1.0 for an
    exact match (in words), 0.0 when no word in order is shared; two empty texts score 1.0."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def score_responses(model, records: list[dict], max_new_tokens: int, desc: str = "answering the test set"):
    """Each record with the model's (greedy) response and its ROUGE-L F1 against the reference output."""
    results = []
    for entry in tqdm(records, desc=desc, leave=False):
        response = generate_response(model, entry, max_new_tokens)
        results.append({**entry, "model_response": response, "rouge_l_f1": rouge_l_f1(response, entry["output"])})
    return results


def load_chat_model(directory, device="cpu"):
    """The model of a ``gpt finetune-instruct`` run (or of ``gpt lora-merge`` of one), in eval mode. Any
    other model is refused: one that was never finetuned on instructions only continues the prompt's text,
    which reads as an empty or unrelated answer."""
    directory = need(directory, "directory", "checkpoint directory",
                     "give the run directory that gpt finetune-instruct wrote")
    if not (directory / FINETUNE_FILE).exists() and (directory / CONFIG_FILE).exists():
        option = "--hf" if "config" not in json.loads((directory / CONFIG_FILE).read_text()) else "--checkpoint"
        raise UserError(f"{directory} holds a pretrained model, not one finetuned to follow instructions (it would "
                        f"only continue the prompt): finetune it first with `gpt finetune-instruct {option} "
                        f"{directory}` and chat with that run")
    model, meta = load_finetuned(directory, device)
    if meta.get("task") != "instruct":
        raise UserError(f"{directory} holds {task_name(meta)}, not an instruction-following model: "
                        f"make one with `gpt finetune-instruct`")
    return model


# ------------------------------------------------------------------------------------------ the job


def finetune_instruct(cfg: FinetuneConfig | None = None, *, on_step=None, **settings) -> RunResult:
    """Finetune a GPT to follow instructions as ``cfg`` says (``gpt finetune-instruct``); the result's
    ``metrics`` hold the last validation loss and the test set's loss and mean ROUGE-L F1."""
    return run(configure(FinetuneConfig, cfg, settings), InstructTask, on_step=on_step)


def instruction_loss(model, batch) -> torch.Tensor:
    """The mean next-token loss over a batch's targets that count (inputs, targets: (B, T) each)."""
    inputs, targets = batch
    _, loss = model(inputs, targets)
    return loss


def _eval_sums(model, batch):
    """The summed loss and the number of targets that count."""
    inputs, targets = batch
    _, loss = model(inputs, targets, return_logits=False)
    n = (targets != IGNORE_INDEX).sum()
    return loss * n, n


class InstructTask(FinetuneTask):
    name = "instruction finetuning"
    kind = run_prefix = "instruct"
    trains_head = True
    default_trainable, default_epochs = DEFAULT_TRAINABLE, DEFAULT_EPOCHS

    def load_data(self, cfg: FinetuneConfig) -> None:
        data = load_instruction_data(cfg.data)
        if cfg.limit is not None:
            data = data[:cfg.limit]
        self.splits = split_instruction_data(data)
        self.after_training = f"the test set's {len(self.splits[2])} responses (not timed yet)"
        self.source = cfg.data or "instruction-data.json"
        self.lines.append(f"data: {cfg.data or 'the bundled instruction-data.json'}, {len(data):,} records; "
                          f"train/val/test " + "/".join(str(len(s)) for s in self.splits))

    def setup(self, cfg: FinetuneConfig) -> int:
        ctx = self.gpt.config.context_length
        if cfg.max_length is not None and not 1 <= cfg.max_length <= ctx:
            raise UserError(f"--max-length {cfg.max_length} must be between 1 and the model's context length "
                            f"{ctx}")
        max_length = cfg.max_length or ctx
        self.meta.update(max_length=max_length, mask_prompt=cfg.mask_prompt)
        self.datasets = [InstructionDataset(part, max_length) for part in self.splits]
        self.train_set = self.datasets[0]
        self._collate = functools.partial(collate_instructions, max_length=max_length, mask_prompt=cfg.mask_prompt)
        self.lines.append(f"examples cut to {max_length} tokens" + (", loss on the responses only (--mask-prompt)"
                                                                    if cfg.mask_prompt else ""))
        return max_length

    def collate(self, items):
        return self._collate(items)

    def count(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model, batch):
        return instruction_loss(model, batch)

    @staticmethod
    def _mean_loss(run: Trainer, ds, whole: bool = False) -> float:
        total, n = run.eval_sums(ds, _eval_sums, 2, whole=whole)
        return total / n if n else float("nan")

    def evaluate(self, run: Trainer) -> dict:
        # the training loss is the mean of the steps since the last evaluation (as the book's running loss)
        return {"train_loss": run.running_loss(), "val_loss": self._mean_loss(run, self.datasets[1])}

    def report(self, r: dict) -> str:
        return f"{self.epoch_label(r)}: train loss {fmt_loss(r['train_loss'])} | val loss {fmt_loss(r['val_loss'])}"

    def finish(self, run: Trainer) -> dict:
        """The test set: its loss, and every record answered and scored (shared out among the processes)."""
        test_loss = self._mean_loss(run, self.datasets[2], whole=True)
        test = self.splits[2]
        mine = list(range(self.env.rank, len(test), self.env.world))
        with rng_preserved():
            answered = score_responses(self.model, [test[i] for i in mine], run.config.max_new_tokens)
        results = [r for _, r in sorted(p for part in self.env.gather(list(zip(mine, answered))) for p in part)]
        score = sum(r["rouge_l_f1"] for r in results) / len(results)
        if self.env.main:
            path = run.run_dir / RESPONSES_FILE
            atomic_write(path, lambda p: p.write_text(json.dumps(results, indent=2)))
            update_finetune_meta(run.run_dir, {"test_loss": test_loss, "test_rouge_l_f1": score})
        run.say(f"test loss {fmt_loss(test_loss)} | test responses: mean ROUGE-L F1 {score:.3f} against the "
                f"reference outputs ({len(test)} responses in {run.run_dir / RESPONSES_FILE})")
        run.say(f"saved the model to {run.run_dir}; try: echo \"Name a color.\" | gpt chat --checkpoint {run.run_dir}")
        return {"test_loss": test_loss, "test_rouge_l_f1": score, **super().finish(run)}
