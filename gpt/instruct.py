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
``--mask-prompt`` also sets the prompt's targets to -100, so the loss is on the response alone.

After training, the test set's responses are generated (greedy) and written to ``test-responses.json``
beside the checkpoint, scored against the reference outputs with ROUGE-L F1 (see :func:`rouge_l_f1`):
an automatic, offline stand-in for chapter 7's scoring by a larger model (Llama 3 through Ollama).

    gpt finetune-instruct --hf gpt2-medium/ --out runs/instruct
    echo "Name a color." | gpt chat --checkpoint runs/instruct
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .cli import pick_device
from .finetune import (
    FINETUNE_FILE,
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
    update_finetune_meta,
    write_log,
)
from .generate import check_sampling_args, generate
from .tokenizer import EOT_ID, asset_path, decode, encode
from .weights import _atomic_write, load_checkpoint, save_checkpoint

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
        raise ValueError(f"{source} must be {shape}; it is {what}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i} is a {type(rec).__name__}, not a record; the file must be "
                             f"{shape}")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                problem = "has no" if key not in rec else "has a non-text"
                raise ValueError(f"{source}: record {i} {problem} {key!r}; every record needs text 'instruction' "
                                 f"and 'output' fields ('input' is optional)")
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise ValueError(f"{source}: record {i} has a non-text 'input' ({type(rec['input']).__name__})")
    return data


def load_instruction_data(path=None) -> list[dict]:
    """The records of a JSON instruction file (default: the bundled instruction-data.json, 1,100 records)."""
    path = Path(path or asset_path("instruction-data.json"))
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {str(path)!r} does not exist: check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the instruction data must be a JSON list of records "
                         f"with 'instruction' and 'output'") from None
    return validate_instruction_data(data, str(path))


def split_instruction_data(data: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, validation, test) as in the book: the first 85% train, the next 10% test, the last 5% validate."""
    n_train, n_test = int(len(data) * train_frac), int(len(data) * test_frac)
    train, test, val = data[:n_train], data[n_train:n_train + n_test], data[n_train + n_test:]
    if not train or not val or not test:
        raise ValueError(f"{len(data)} records are too few for an 85/5/10 train/validation/test split (a part "
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
            raise ValueError(f"the prompts of {len(too_long)} of {len(data)} records are longer than the maximum "
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


# ------------------------------------------------------------------------------- training and evaluation


def instruction_loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    _, loss = model(inputs.to(model.device), targets.to(model.device))
    return loss


@torch.no_grad()
def evaluate_loss(model, loader, max_batches: int | None = None, desc: str = "evaluating") -> float:
    """The mean of the batches' losses (the book's ``calc_loss_loader``), over the first ``max_batches``."""
    was_training = model.training
    model.eval()
    losses = []
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for i, batch in enumerate(tqdm(loader, total=total, desc=desc, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        losses.append(instruction_loss(model, batch).item())
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


def generate_response(model, entry: dict, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_k: int | None = None, seed: int | None = None) -> str:
    """The model's answer to one record (greedy by default), up to its first end-of-text."""
    prompt = encode(format_prompt(entry), allow_special=False)
    out = generate(model, torch.tensor(prompt, dtype=torch.long), max_new_tokens, temperature=temperature,
                   top_k=top_k, eos_id=EOT_ID, seed=seed)  # (len(prompt) + new,)
    new = out[len(prompt):].tolist()
    if EOT_ID in new:
        new = new[:new.index(EOT_ID)]
    return decode(new).strip()


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


def score_test_set(model, test: list[dict], max_new_tokens: int, path) -> float:
    """Generate every test record's response, write them with their scores to ``path``; mean ROUGE-L F1."""
    results = []
    for entry in tqdm(test, desc="answering the test set", leave=False):
        response = generate_response(model, entry, max_new_tokens)
        results.append({**entry, "model_response": response, "rouge_l_f1": rouge_l_f1(response, entry["output"])})
    _atomic_write(Path(path), lambda p: p.write_text(json.dumps(results, indent=2)))
    return sum(r["rouge_l_f1"] for r in results) / len(results)


# ------------------------------------------------------------------------------------------------ commands


def cmd_finetune_instruct(args) -> int:
    check_training_args(args)
    check_sampling_args(args.max_new_tokens, 0.0, None, None)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    data = load_instruction_data(args.data)
    if args.limit is not None:
        data = data[:args.limit]
    train, val, test = split_instruction_data(data)
    print(f"data: {args.data or 'the bundled instruction-data.json'}, {len(data):,} records; "
          f"train/val/test {len(train)}/{len(val)}/{len(test)}")

    out = run_dir(args, "instruct")
    if args.resume:
        model, meta = load_finetuned(out, device)
        if meta.get("task") != "instruct":
            raise ValueError(f"--resume {out}: that run made {task_name(meta)}, not an instruction-following model")
        mode, lora, max_length, mask_prompt = meta["trainable"], meta["lora"], meta["max_length"], meta["mask_prompt"]
        state = load_train_state(out)
        start_epoch, step, history = state["epoch"] + 1, state["step"], meta.get("history", [])
        model.set_dropout(args.dropout)
        print(f"resuming {out} after epoch {start_epoch} (step {step})")
    else:
        mode, lora = resolve_trainable(args)
        model, what, base = load_base_model(args, device)
        print(f"model: {what}")
        ctx = model.config.context_length
        if args.max_length is not None and not 1 <= args.max_length <= ctx:
            raise ValueError(f"--max-length {args.max_length} must be between 1 and the model's context length "
                             f"{ctx}")
        max_length, mask_prompt = args.max_length or ctx, args.mask_prompt
        if lora and "preset" in base:  # a fresh model exists nowhere else: keep it beside the adapters
            save_checkpoint(model, out / "base")
            base = {"checkpoint": "base"}
        meta = {"task": "instruct", "max_length": max_length, "mask_prompt": mask_prompt, "trainable": mode,
                "lora": lora, "base": base, "data": args.data or "instruction-data.json", "seed": args.seed}
        start_epoch, step, history, state = 0, 0, [], None
    set_trainable(model, mode, lora=lora)
    print(f"finetuning: --trainable {mode}" + (f" (LoRA rank {lora['rank']}, alpha {lora['alpha']:g})"
                                               if lora else "") + f"; {describe_parameters(model)}")
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    datasets = [InstructionDataset(part, max_length) for part in (train, val, test)]
    collate = functools.partial(collate_instructions, max_length=max_length, mask_prompt=mask_prompt)
    train_loader = DataLoader(datasets[0], batch_size=args.batch_size, shuffle=True, generator=torch.Generator(),
                              collate_fn=collate)
    val_loader, test_loader = (DataLoader(ds, batch_size=args.batch_size, collate_fn=collate) for ds in datasets[1:])
    print(f"examples cut to {max_length} tokens" + (", loss on the responses only (--mask-prompt)" if mask_prompt
                                                     else ""))

    def on_epoch_end(epoch, step, train_loss):
        val_loss = evaluate_loss(model, val_loader, args.eval_batches, desc="evaluating val")
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "val_loss": val_loss}
        print(f"epoch {epoch + 1}/{args.epochs} (step {step}): train loss {fmt_loss(train_loss)} | "
              f"val loss {fmt_loss(val_loss)}")
        history.append(metrics)
        write_log(out, metrics)
        save_finetuned(out, model, {**meta, "history": history})
        save_train_state(out, optimizer, epoch, step)

    out.mkdir(parents=True, exist_ok=True)
    if start_epoch >= args.epochs or (args.max_steps is not None and step >= args.max_steps):
        print(f"{out} has already trained {start_epoch} epochs ({step} steps): raise --epochs or --max-steps "
              f"to train more")
        return 0
    train_epochs(model, train_loader, instruction_loss, optimizer, epochs=args.epochs, seed=args.seed,
                 start_epoch=start_epoch, step=step, max_steps=args.max_steps, on_epoch_end=on_epoch_end)

    test_loss = evaluate_loss(model, test_loader, desc="evaluating test")
    score = score_test_set(model, test, args.max_new_tokens, out / RESPONSES_FILE)
    update_finetune_meta(out, {"test_loss": test_loss, "test_rouge_l_f1": score})
    print(f"test loss {fmt_loss(test_loss)} | test responses: mean ROUGE-L F1 {score:.3f} against the reference "
          f"outputs ({len(test)} responses in {out / RESPONSES_FILE})")
    print(f"saved the model to {out}; try: echo \"Name a color.\" | gpt chat --checkpoint {out}")
    if lora and args.merge:
        print(f"merged the LoRA adapters into the base weights: {merge_finetuned(out, out / 'merged')}")
    return 0


def load_chat_model(directory, device):
    """An instruction-finetuned model (or any checkpoint of this project, which will answer poorly)."""
    directory = Path(directory)
    if (directory / FINETUNE_FILE).exists():
        model, meta = load_finetuned(directory, device)
        if meta.get("task") != "instruct":
            raise ValueError(f"{directory} holds {task_name(meta)}, not an instruction-following model: "
                             f"make one with `gpt finetune-instruct`")
        return model
    return load_checkpoint(directory, map_location=device).eval()


def cmd_chat(args) -> int:
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, None)
    model = load_chat_model(args.checkpoint, pick_device(args.device))
    interactive = sys.stdin.isatty()
    if interactive:
        print("type an instruction and press Enter; Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        try:
            response = generate_response(model, {"instruction": line.strip(), "input": ""}, args.max_new_tokens,
                                         args.temperature, args.top_k, args.seed)
        except ValueError as e:  # e.g. an instruction longer than the model's context: say so, take the next
            print(f"error: {e}", file=sys.stderr)
            continue
        print(response, flush=True)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("finetune-instruct", help="finetune a GPT to follow instructions (chapter 7)")
    add_finetune_args(p, trainable="all", epochs=2, lr=5e-5)
    p.add_argument("--mask-prompt", action="store_true",
                   help="compute the loss on the response tokens only (mask the prompt's targets)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest generated response for the test set (default 256)")
    p.set_defaults(func=cmd_finetune_instruct)

    c = sub.add_parser("chat", help="answer instructions (one per line on stdin) with a finetuned model")
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="a run of gpt finetune-instruct")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    c.set_defaults(func=cmd_chat)
