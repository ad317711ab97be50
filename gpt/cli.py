"""The ``gpt`` command line (also ``python -m gpt``): a thin layer over the Python jobs.

Every argparse detail lives here and nowhere else. A training command turns its options into the job's
config dataclass (:class:`gpt.pretrain.TrainConfig`, :class:`gpt.finetune.FinetuneConfig`) and calls the job
(``train``, ``finetune_classifier``, ``finetune_instruct``); the options' defaults and choices come from
those configs, :data:`gpt_kernels.backend.BACKENDS` and :data:`gpt.runtime.DTYPES`. A user's mistake (a bad
path, a bad setting: :class:`gpt.errors.UserError`, or a file that cannot be read or written) prints one line
on stderr and exits 1 (``GPT_DEBUG=1`` shows its traceback); any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

import torch

from gpt_kernels.backend import BACKENDS

from . import __version__, classify, instruct
from .cli_tools import add_tool_commands, add_train_hellaswag_args
from .config import PRESETS
from .errors import UserError
from .finetune import (
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_RANK,
    TRAINABLE_CHOICES,
    FinetuneConfig,
    load_finetuned,
    merge_finetuned,
    task_name,
)
from .generate import check_sampling_args, decode_stream, generate_stream
from .model import RECOMPUTE
from .pretrain import DEFAULT_EPOCHS, DEFAULT_PRESET, TrainConfig, train
from .runtime import DTYPES, PARALLEL_MODES, check_backend, pick_device
from .settings import BETA2, RunConfig
from .tokenizer import EOT_ID, check_utf8_arg, decode_utf8, encode, not_utf8
from .weights import describe_source, load_model, model_source

DEVICE_HELP = "auto (the GPU if there is one, else the CPU; the default), cpu, cuda, cuda:1, ..."
MODEL_DROPOUT = "the model's own, 0.1 for the presets"


def _default(value, when_none: str) -> str:
    return when_none if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def add_model_source_args(p: argparse.ArgumentParser, default_preset: str, what: str = "a checkpoint directory "
                          "of this project (a run of gpt train, or of a full finetuning)",
                          preset_note: str = "") -> None:
    """--checkpoint / --hf / --preset: where a command's model comes from."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="DIR", help=what)
    g.add_argument("--hf", metavar="DIR", help="a Hugging Face GPT-2 directory (config.json + weights)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"without --checkpoint/--hf: a freshly initialised (untrained) model of this size: "
                        f"{', '.join(PRESETS)} (default: {default_preset}{preset_note})")


def add_run_args(p: argparse.ArgumentParser, d: RunConfig, epochs: int, checkpoint_help: str, out_default: str,
                 preset_note: str = "") -> None:
    """The options every training command shares (the fields of RunConfig), with ``d``'s defaults."""
    add_model_source_args(p, DEFAULT_PRESET, checkpoint_help, preset_note)
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"the run directory: checkpoint, log.jsonl, loss.png; a new or empty one (default: "
                        f"{out_default})")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run saved in DIR exactly where it stopped (in DIR, or copied on into --out)")
    p.add_argument("--epochs", type=int, metavar="N", default=d.epochs,
                   help=f"passes over the training data (default {epochs})")
    p.add_argument("--max-steps", type=int, metavar="N", default=None,
                   help="the run's length in optimizer steps, instead of --epochs (default: --epochs decides; a "
                        "resume that gives either one sets a new length)")
    p.add_argument("--batch-size", type=int, metavar="N", default=d.batch_size,
                   help=f"examples per batch, per process (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, metavar="N", default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--device", default=d.device, help=DEVICE_HELP)
    o = p.add_argument_group("optimisation")
    warmup = f"{d.warmup_share:.0%}% of the run" if d.warmup_share else "none"  # %%: argparse %-formats help
    min_lr = f"lr x {d.min_lr_share:g}" if d.min_lr_share != 1 else "--lr: a constant rate"
    o.add_argument("--warmup-steps", type=int, metavar="N", default=d.warmup_steps,
                   help=f"linear warm-up steps (default: {warmup})")
    o.add_argument("--min-lr", type=float, default=d.min_lr,
                   help=f"learning rate at the end of the cosine (default: {min_lr})")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on weights of 2+ dimensions (default {d.weight_decay:g})")
    o.add_argument("--beta2", type=float, default=d.beta2,
                   help=f"AdamW's second-moment decay (beta1 is 0.9) (default {BETA2:g}, PyTorch's, as the book; GPT-2 "
                        f"recipes use 0.95)")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"max gradient norm; 0 = off (default {_default(d.grad_clip, 'off')})")
    o.add_argument("--dropout", type=float, default=d.dropout,
                   help=f"dropout rate (default {_default(d.dropout, MODEL_DROPOUT)})")
    r = p.add_argument_group("evaluation and checkpoints")
    r.add_argument("--eval-every", type=int, metavar="N", default=d.eval_every,
                   help=f"steps between evaluations (default {_default(d.eval_every, 'after each epoch')})")
    r.add_argument("--eval-batches", type=int, default=d.eval_batches, metavar="N",
                   help=f"batches per evaluated split (default {_default(d.eval_batches, 'all')})")
    r.add_argument("--save-every", type=int, metavar="N", default=d.save_every,
                   help=f"steps between checkpoints (default {_default(d.save_every, 'after each epoch')}; "
                        f"always at the end and on Ctrl-C)")
    s = p.add_argument_group("speed")
    s.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="training precision (default auto: bf16 autocast on CUDA, float32 on the CPU; float16 "
                        "needs CUDA)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    s.add_argument("--parallel", default=d.parallel, choices=PARALLEL_MODES,
                   help="under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: each holds a shard "
                        "of every weight, gradient and optimizer moment, for models too big for one GPU) (default: "
                        "ddp, or the mode of the run being resumed)")
    s.add_argument("--recompute", default=d.recompute, choices=RECOMPUTE,
                   help="activation recomputation, less memory for more compute: blocks (keep each block's input, "
                        "run the block again in the backward), attention (its two branches) (default none)")
    s.add_argument("--kernels", default=d.kernels, choices=BACKENDS,
                   help="implementation of the fused ops (default: $GPT_KERNELS if set, as for every command, else "
                        "auto: Triton on CUDA, PyTorch on the CPU)")


def config_from_args(cls, args: argparse.Namespace):
    """The config dataclass ``cls`` with every field an option set."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


# ------------------------------------------------------------------------------------------ training commands


def add_train_command(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="pretrain a GPT on text (default: the mini model on The Verdict, as in chapter 5)",
        description="Pretrain a GPT on text. With no options: the 'mini' preset on The Verdict for 10 epochs, "
                    "as chapter 5 of the book does (90 steps: 6 to 12 minutes on a busy 2-core CPU; an estimate "
                    "of the time left is printed once the first steps are timed). Writes a run directory for gpt "
                    "generate --checkpoint and the finetuning commands' --checkpoint. Under torchrun: "
                    "DistributedDataParallel, with --batch-size windows per process.")
    add_run_args(p, d, DEFAULT_EPOCHS, "start from the weights in DIR (a run of gpt train, or any checkpoint of "
                 "this project) as a new run; --resume continues a run instead", "runs/<date-time>")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE_OR_DIR", default=None,
                   help="a UTF-8 text file, a directory of .txt files (big ones are tokenized once into a "
                        "memory-mapped token file beside them), or a folder of gpt prepare-data (its shards streamed "
                        "in order, its validation shard evaluated) (default: The Verdict, bundled)")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio,
                   help=f"share of the tokens (the last ones) kept for validation (default {d.val_ratio:g})")
    g.add_argument("--context-length", type=int, metavar="T", default=None,
                   help="tokens per window (default: the model's context length)")
    g.add_argument("--stride", type=int, metavar="N", default=None,
                   help="tokens between windows (default: the context length, no overlap)")
    g.add_argument("--tokens-per-step", type=int, metavar="N", default=None,
                   help="tokens per optimizer step, reached by gradient accumulation: a multiple of batch size x "
                        "context length x processes (default: one batch)")
    g.add_argument("--book-init", action="store_true",
                   help="a fresh model initialised as the book's chapter 5 (PyTorch defaults, untied head) "
                        "(default: GPT-2's initialisation)")
    add_pad_vocab_arg(g)
    g.add_argument("--sample-prompt", metavar="TEXT", default=d.sample_prompt,
                   help=f"text continued after each epoch (default \"{d.sample_prompt}\")")
    g.add_argument("--sample-tokens", type=int, metavar="N", default=d.sample_tokens,
                   help=f"tokens generated for the sample; 0 = no sample (default {d.sample_tokens})")
    add_train_hellaswag_args(p.add_argument_group("HellaSwag"))
    p.set_defaults(func=cmd_train)


def add_pad_vocab_arg(g) -> None:
    g.add_argument("--pad-vocab-multiple", type=int, metavar="N", default=None,
                   help="round a fresh or GPT-2 model's embedding and output-head rows up to a multiple of N; "
                        "the padding never reaches the logits or the loss (default: 64 on a GPU, where 50,304 rows "
                        "let the head's matmuls and the loss kernel use 16-byte loads; 1 on the CPU)")


def cmd_train(args) -> int:
    train(config_from_args(TrainConfig, args))
    return 0


FINETUNE_FROM = ("the model to finetune: a run directory of gpt train (or any checkpoint of this project); "
                 "or --hf DIR for GPT-2")


def add_finetune_command(sub, name: str, job, help: str, description: str, epochs: int, trainable: str,
                         data_help: str, max_length_default: str):
    """A finetuning command: the shared training options plus what both finetuning tasks add."""
    d = FinetuneConfig()
    p = sub.add_parser(name, help=help, description=description)
    add_run_args(p, d, epochs, FINETUNE_FROM, f"runs/{name.removeprefix('finetune-')}-<date-time>",
                 "; untrained, for trying the command out: finetune a pretrained model")
    g = p.add_argument_group("finetuning")
    g.add_argument("--data", metavar="FILE", default=None, help=data_help)
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only N examples (a quick run on a slice of the data) (default: all)")
    g.add_argument("--max-length", type=int, default=None, metavar="L",
                   help=f"truncate every example to L tokens (default: {max_length_default})")
    g.add_argument("--examples-per-step", type=int, default=None, metavar="N",
                   help="examples per optimizer step, reached by gradient accumulation: a multiple of batch size x "
                        "processes (default: one batch)")
    g.add_argument("--trainable", choices=TRAINABLE_CHOICES, default=None,
                   help=f"which weights train (default: {trainable}; 'lora' when --lora-rank is given)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help=f"LoRA rank (implies --trainable lora; default with lora: {DEFAULT_LORA_RANK})")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help=f"LoRA alpha; the update is scaled by alpha / rank (default: {DEFAULT_LORA_ALPHA:g})")
    g.add_argument("--merge", action="store_true",
                   help="with LoRA: also write the model with the adapters merged in, to OUT/merged (default: off)")
    p.set_defaults(func=cmd_finetune, job=job)
    return g


def cmd_finetune(args) -> int:
    args.job(config_from_args(FinetuneConfig, args))
    return 0


def add_finetune_commands(sub) -> None:
    d = FinetuneConfig()
    g = add_finetune_command(
        sub, "finetune-classifier", classify.finetune_classifier,
        "finetune a GPT as a text classifier (chapter 6: SMS spam)",
        "Finetune a GPT as a text classifier, as chapter 6 of the book does: a new output layer reads the last "
        "token, and the last block, the final LayerNorm and that layer train (--trainable). Start from a "
        "pretrained model (--checkpoint DIR of gpt train, or --hf DIR); then label texts with gpt classify "
        "--checkpoint OUT.", classify.DEFAULT_EPOCHS, classify.DEFAULT_TRAINABLE,
        "a UTF-8 CSV or TSV file whose first row names the columns: the text in --text-column, the label in "
        "--label-column; the classes are balanced and split 70/10/20 (default: the bundled SMS Spam Collection)",
        "the longest training text, at most the context length")
    g.add_argument("--text-column", metavar="NAME", default=d.text_column,
                   help=f"with --data: the column holding the text (default {d.text_column!r})")
    g.add_argument("--label-column", metavar="NAME", default=d.label_column,
                   help=f"with --data: the column holding the label (default {d.label_column!r})")
    g = add_finetune_command(
        sub, "finetune-instruct", instruct.finetune_instruct,
        "finetune a GPT to follow instructions (chapter 7)",
        "Finetune a GPT to follow instructions, as chapter 7 of the book does: Alpaca-style prompts, the "
        "next-token loss on prompt and response (--mask-prompt: the response only), then the test set answered "
        "and scored with ROUGE-L. Start from a pretrained model (--checkpoint DIR of gpt train, or --hf DIR); "
        "then chat with it: gpt chat --checkpoint OUT.", instruct.DEFAULT_EPOCHS, instruct.DEFAULT_TRAINABLE,
        'a UTF-8 JSON file: a list of records {"instruction": ..., "input": ... (may be empty or left out), '
        '"output": ...}, split in order: 85%% train, 10%% test, 5%% validation (default: the book\'s 1,100 records, '
        'bundled)',
        "the model's context length")
    g.add_argument("--mask-prompt", action="store_true",
                   help="compute the loss on the response tokens only (default: prompt and response)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", default=d.max_new_tokens,
                   help=f"longest generated response for the test set (default {d.max_new_tokens})")
    add_pad_vocab_arg(g)


# ------------------------------------------------------------------------------------------ using models


def cmd_generate(args) -> int:
    """Print the prompt, then each new piece of text as soon as its token is chosen; tokens/s on stderr."""
    if not args.prompt:
        raise UserError("the prompt is empty: give some text with --prompt \"...\"")
    check_utf8_arg(args.prompt, "--prompt")
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, flags=True)
    device = model_device(args.device)
    if args.dtype == "auto":  # bf16 halves the bytes each decode step reads on a GPU; CPUs are faster in fp32
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    kind, source = model_source(args.checkpoint, args.hf, args.preset, "gpt2-small")
    model = load_model(source, device, kind=kind).to(dtype=dtype)
    if kind == "preset":
        print(f"note: running an {describe_source(kind, source)}; its text is noise. Train one with `gpt train` "
              f"and pass --checkpoint DIR, or load GPT-2 with --hf DIR.", file=sys.stderr)
    ids = encode(args.prompt)
    stream = generate_stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             top_p=args.top_p, eos_id=EOT_ID if args.stop_at_eos else None, seed=args.seed,
                             use_cache=not args.no_cache)
    n_new, t_first = 0, None

    def timed(tokens):
        nonlocal n_new, t_first
        for t in tokens:
            n_new += 1
            t_first = t_first or time.perf_counter()
            yield t

    t0 = time.perf_counter()
    tokens = timed(stream)
    first = list(itertools.islice(tokens, 1))  # the first forward pass runs (or fails) before anything is printed
    for piece in decode_stream(itertools.chain(ids, first, tokens)):  # the prompt, then each new token
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - t0
    if n_new:
        print(f"{n_new} new tokens in {elapsed:.2f} s: {n_new / elapsed:.1f} tokens/s (first after "
              f"{(t_first - t0) * 1e3:.0f} ms; KV cache {'off' if args.no_cache else 'on'}, "
              f"{str(dtype).removeprefix('torch.')}, {device})", file=sys.stderr)
    return 0


def model_device(name: str) -> torch.device:
    """The device a command runs a model on, with the kernel backend in force ($GPT_KERNELS, or auto) checked
    there first: the rule every command follows (the training commands add --kernels)."""
    device = pick_device(name)
    check_backend(None, device)
    return device


def read_stdin() -> str:
    """All of stdin as UTF-8 text (NotUTF8Error naming the first bad byte otherwise)."""
    buffer = getattr(sys.stdin, "buffer", None)  # None: a text stream put in place of stdin (tests)
    return sys.stdin.read() if buffer is None else decode_utf8(buffer.read(), "stdin")


def stdin_lines():
    """(line number, the line as text, or the NotUTF8Error that line raised), one line of stdin at a time."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from enumerate(iter(sys.stdin.readline, ""), 1)
        return
    offset = 0
    for n, raw in enumerate(iter(buffer.readline, b""), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = not_utf8("stdin", raw, e, offset, n)
        offset += len(raw)
        yield n, line


def cmd_classify(args) -> int:
    texts = [check_utf8_arg(t, "the text to classify") for t in args.text]
    texts = texts or [line for line in read_stdin().splitlines() if line.strip()]
    if not texts:
        raise UserError("no text to classify: give it as an argument (gpt classify --checkpoint DIR \"text\") "
                        "or one per line on stdin")
    model, meta = load_finetuned(args.checkpoint, model_device(args.device))
    if meta.get("task") != "classifier":
        raise UserError(f"{args.checkpoint} holds {task_name(meta)}, not a classifier: finetune one "
                        f"with `gpt finetune-classifier`")
    probs = classify.predict(model, texts, meta.get("max_length"))  # (N, K)
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        print(f"{meta['labels'][k]}\t{p[k].item():.3f}" + (f"\t{text}" if len(texts) > 1 else ""))
    return 0


def cmd_chat(args) -> int:
    """Answer each line of stdin with one line of stdout (see :func:`gpt.instruct.chat_answers`); a line that
    cannot be answered is also reported on stderr, the rest go on, and the exit status is 1."""
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k or None, None, flags=True)
    model = instruct.load_chat_model(args.checkpoint, model_device(args.device))
    interactive = sys.stdin.isatty()
    if interactive:
        print("type an instruction and press Enter; Ctrl-D quits", file=sys.stderr)
    failed = 0
    for out, error in instruct.chat_answers(model, _prompted(stdin_lines(), interactive), args.max_new_tokens,
                                            args.temperature, args.top_k or None, args.seed, args.jsonl):
        if error:
            failed += 1
            print(f"gpt chat: error: {error}", file=sys.stderr)
        print(out, flush=True)
    return 1 if failed else 0


def _prompted(lines, interactive: bool):
    """``lines``, with a "> " prompt on stderr before each when a person types them."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        item = next(lines, None)
        if item is None:
            return
        yield item


def cmd_lora_merge(args) -> int:
    out = merge_finetuned(args.checkpoint, args.out)
    print(f"merged the LoRA adapters of {args.checkpoint} into the base weights: {out}")
    return 0


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_k: int) -> None:
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, metavar="T", default=temperature,
                   help=f"sampling temperature; 0 = greedy decoding (default {temperature:g})")
    p.add_argument("--top-k", type=int, metavar="K", default=top_k,
                   help=f"sample only from the K most likely tokens; 0 = off (default {top_k or 'off'})")
    p.add_argument("--seed", type=int, metavar="N", default=None,
                   help="random seed for sampling, for a repeatable result (default: a new one each run)")


def add_use_commands(sub) -> None:
    """generate, classify, chat, lora-merge."""
    g = sub.add_parser("generate", help="continue a prompt with a model",
                       description="Continue a prompt with a model, printing each piece of text as soon as its token "
                                   "is chosen (tokens/s on stderr). The model: --checkpoint DIR (a run of gpt train, "
                                   "a full finetuning run, or a merged LoRA run), --hf DIR (GPT-2), or an untrained "
                                   "--preset.")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    add_model_source_args(g, "gpt2-small")
    add_sampling_args(g, 50, 0.8, 50)
    g.add_argument("--top-p", type=float, metavar="P", default=None,
                   help="sample only from the most likely tokens that together have probability P (default: off)")
    g.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at <|endoftext|> (default: yes)")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and KV cache (default auto: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--no-cache", action="store_true",
                   help="rerun the model over the whole text every step (no KV cache; slow, for comparison) "
                        "(default: the KV cache is on)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("classify", help="label texts with a classifier from gpt finetune-classifier",
                       description="Label texts with a classifier that gpt finetune-classifier made: for each text, "
                                   "the label and its probability (and the text, when there are several).")
    c.add_argument("text", nargs="*", help="the texts to classify (default: one per line from stdin, UTF-8)")
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="the run directory of gpt finetune-classifier")
    c.add_argument("--device", default="auto", help=DEVICE_HELP)
    c.set_defaults(func=cmd_classify)

    c = sub.add_parser("chat", help="answer instructions with a model from gpt finetune-instruct",
                       description="Answer instructions with a model that gpt finetune-instruct made: one instruction "
                                   "per line on stdin (UTF-8; typed, when stdin is a terminal), one line on stdout for "
                                   "each: the answer (its line breaks written \\n), an empty line for an empty one. A "
                                   "line it cannot answer (longer than the model's context, not UTF-8) gets the line "
                                   "'[error] line N: why' (also on stderr), the others are answered, and the exit "
                                   "status is 1.")
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="the run directory of gpt finetune-instruct")
    c.add_argument("--jsonl", action="store_true",
                   help='JSON lines in and out: each input line a record {"instruction": ..., "input": ...}, each '
                        'output line that record with its "response", or {"line": N, "error": ...} (default: text)')
    add_sampling_args(c, 256, 0.0, 0)
    c.add_argument("--device", default="auto", help=DEVICE_HELP)
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("lora-merge", help="merge a run's LoRA adapters into its base model's weights",
                       description="Fold the LoRA adapters of a finetuning run into its base model's weights and "
                                   "write the whole model to a new directory, which every command reads as "
                                   "--checkpoint.")
    m.add_argument("--checkpoint", required=True, metavar="DIR", help="a finetuning run trained with LoRA")
    m.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (a new directory)")
    m.set_defaults(func=cmd_lora_merge)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt", description="A GPT-2 language model on handwritten Triton kernels.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (the gpt-triton package)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_train_command(sub)
    add_finetune_commands(sub)
    add_use_commands(sub)
    add_tool_commands(sub)  # prepare-data, eval, export, plan
    p.commands = sub.choices  # name -> the command's parser
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage (argparse's top level would show gpt's)
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (| head) is found here, not at exit
        return code
    except BrokenPipeError:  # gpt info | head -1: stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush goes nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that the broken pipe stopped
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, torch.OutOfMemoryError) as e:  # a user's mistake, a file problem, a batch too big
        if os.environ.get("GPT_DEBUG"):  # (anything else is a bug, and shows its traceback)
            raise
        oom = isinstance(e, torch.OutOfMemoryError)
        print(f"gpt {args.command}: error: " + (f"out of memory ({str(e).splitlines()[0]}): use a smaller --batch-size "
                                                f"or model" if oom else str(e)), file=sys.stderr)
        return 1
