"""The ``gpt`` command line (also ``python -m gpt``).

Each subcommand lives beside the code it drives; a module in ``COMMAND_MODULES`` registers its own
subcommands through ``add_commands(subparsers)``. A user's mistake (a bad path, a bad setting) prints one
line on stderr and exits non-zero; set ``GPT_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that add subcommands (each has add_commands(subparsers)); gpt.cli itself adds generate and info
COMMAND_MODULES: list[str] = ["gpt.train", "gpt.finetune"]  # gpt.finetune adds finetune-classifier, classify,
# finetune-instruct, chat (from gpt.classify and gpt.instruct) and lora-merge


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return torch.device(name)


def add_model_source_args(p: argparse.ArgumentParser, default_preset: str | None = "gpt2-small") -> None:
    """--checkpoint / --hf / --preset: where a command's model comes from."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory of this project (gpt train)")
    g.add_argument("--hf", metavar="DIR", help="a Hugging Face GPT-2 directory (config.json + weights)")
    p.add_argument("--preset", default=default_preset,
                   help=f"architecture for a freshly initialised model (default: {default_preset})")


def add_common_training_args(p: argparse.ArgumentParser, default_preset: str = "mini", epochs: int = 10,
                             batch_size: int = 8, lr: float = 4e-4) -> None:
    """The options every training command shares (gpt train, gpt finetune-*), one definition for all."""
    add_model_source_args(p, default_preset)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for checkpoints, log and plot (default: a new folder under runs/)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the run saved in DIR")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default {epochs})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per batch (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--seed", type=int, default=123, help="random seed (default 123)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def load_model_from_args(args, device="cpu", **overrides):
    """The model named by --checkpoint, --hf or --preset; returns (model, description)."""
    from .model import GPT
    from .weights import load_checkpoint, load_hf

    if getattr(args, "checkpoint", None):
        return load_checkpoint(args.checkpoint, map_location=device), f"checkpoint {args.checkpoint}"
    if getattr(args, "hf", None):
        return load_hf(args.hf, map_location=device, **overrides), f"GPT-2 weights from {args.hf}"
    return GPT.from_preset(args.preset, **overrides).to(device), f"UNTRAINED {args.preset} (random weights)"


def cmd_generate(args) -> int:
    """Print the prompt, then each new piece of text as soon as its token is chosen; tokens/s on stderr."""
    import itertools
    import time

    import torch

    from .generate import check_sampling_args, decode_stream, generate_stream
    from .tokenizer import EOT_ID, encode

    if not args.prompt:
        raise ValueError("the prompt is empty: give some text with --prompt \"...\"")
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device)
    if args.dtype == "auto":  # bf16 halves the bytes each decode step reads on a GPU; CPUs are faster in fp32
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    model, what = load_model_from_args(args, device)
    model = model.to(dtype=dtype)
    if what.startswith("UNTRAINED"):
        print(f"note: running an {what}; its text is noise. Train one with `gpt train` and pass "
              f"--checkpoint DIR, or load GPT-2 with --hf DIR.", file=sys.stderr)
    ids = encode(args.prompt)
    stream = generate_stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
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
    for piece in decode_stream(itertools.chain(ids, timed(stream))):  # the prompt, then each new token
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - t0
    if n_new:
        print(f"{n_new} new tokens in {elapsed:.2f} s: {n_new / elapsed:.1f} tokens/s (first after "
              f"{(t_first - t0) * 1e3:.0f} ms; KV cache {'off' if args.no_cache else 'on'}, "
              f"{str(dtype).removeprefix('torch.')}, {device})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    import kernels.backend as kb

    from .config import PRESETS
    from .model import GPT

    print(f"kernels: {kb.describe()}")
    print(f"torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")
    print(f"\n{'preset':<12} {'layers':>6} {'width':>6} {'heads':>6} {'context':>8} {'params (tied)':>15} "
          f"{'params (untied)':>16}")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            tied = GPT(cfg).num_parameters()
            untied = GPT(_replace_config(cfg, tie_weights=False)).num_parameters()
        print(f"{name:<12} {cfg.n_layers:>6} {cfg.emb_dim:>6} {cfg.n_heads:>6} {cfg.context_length:>8} "
              f"{tied:>15,} {untied:>16,}")
    return 0


def _replace_config(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt", description="A GPT-2 language model on handwritten Triton kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt with a model")
    g.add_argument("--prompt", required=True, help="the text to continue")
    add_model_source_args(g)
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy decoding")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at <|endoftext|> (default: yes)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--no-cache", action="store_true",
                   help="rerun the model over the whole text every step (no KV cache; slow, for comparison)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="presets, parameter counts and the active kernel backend")
    i.set_defaults(func=cmd_info)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("GPT_DEBUG"):
            raise
        print(f"gpt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
