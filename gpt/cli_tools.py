"""The command line's corpus, evaluation, export, information and planning commands, ``gpt
prepare-data``, ``gpt eval``, ``gpt export``, ``gpt info`` and ``gpt plan``: argparse only, registered by
:mod:`gpt.cli` (which prints a user's mistake as one line, as for every command)."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from gpt_kernels.backend import BACKENDS

from .config import PRESETS
from .hellaswag import DEFAULT_EVAL_PRESET, EvalConfig, evaluate
from .model import GPT, RECOMPUTE
from .plan import DTYPES as PLAN_DTYPES
from .plan import GPUS, PARALLEL, PlanConfig, format_plan, plan
from .runtime import DTYPES, kernels_in_force
from .shards import PrepareConfig, prepare_data


def add_prepare_command(sub) -> None:
    d = PrepareConfig()
    p = sub.add_parser(
        "prepare-data", help="tokenize a corpus into token shards for gpt train --data DIR",
        description="Tokenize text files, JSON lines or Parquet files (FineWeb's format), plain or gzip/bz2/xz, "
                    "into uint16 token shards plus a validation shard and an index.json, with every core. Each "
                    "document starts with <|endoftext|>. Run the same command again to resume an interrupted run "
                    "(finished shards are kept); the same sources and settings always give the same bytes. Then: "
                    "gpt train --data OUT.")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="files and folders: .txt (one document a file), .jsonl/.json (one a line), .parquet (one a "
                        "row; needs pyarrow: pip install 'gpt-triton[parquet]'); .gz/.bz2/.xz compressed text or "
                        "JSON lines; a folder: every such file under it")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the output folder: new, empty, or an interrupted run of the same command (which resumes)")
    p.add_argument("--field", default=d.field, metavar="NAME",
                   help=f"the JSON field / Parquet column holding the text (default {d.field!r})")
    p.add_argument("--tokenizer", default=d.tokenizer, metavar="NAME",
                   help=f"a tiktoken encoding whose ids fit 16 bits (default {d.tokenizer}: bundled, no download)")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens, metavar="N",
                   help=f"tokens per training shard (default {d.shard_tokens:,})")
    p.add_argument("--val-tokens", type=int, default=d.val_tokens, metavar="N",
                   help=f"the corpus's first N tokens form the validation shard; 0: none (default {d.val_tokens:,})")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizing threads (default: every core this process may use)")
    p.add_argument("--strict", action="store_true",
                   help="stop at a document that is not UTF-8 (default: skip it and count it in the index)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    prepare_data(PrepareConfig(sources=args.sources, out=args.out, field=args.field, tokenizer=args.tokenizer,
                               shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, strict=args.strict,
                               workers=args.workers))
    return 0


def add_eval_command(sub) -> None:
    d = EvalConfig()
    p = sub.add_parser(
        "eval", help="score a model on HellaSwag (completion style, as build-nanogpt and llm.c)",
        description="Score a model on HellaSwag as build-nanogpt and llm.c do: the ending with the lowest summed "
                    "(acc) or mean (acc_norm) loss of its tokens after the context. The file is read from the path "
                    "given, never downloaded: hellaswag_val.jsonl from https://github.com/rowanz/hellaswag "
                    "(data/hellaswag_val.jsonl, 10,042 examples).")
    p.add_argument("--hellaswag", required=True, metavar="FILE", help="a HellaSwag JSON-lines file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory of this project (a run of gpt train)")
    g.add_argument("--hf", metavar="DIR", help="a Hugging Face GPT-2 directory (config.json + weights)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"without --checkpoint/--hf: an untrained model of this size, for trying the command out: "
                        f"{', '.join(PRESETS)} (default: {DEFAULT_EVAL_PRESET})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help=f"examples per forward pass, 4 rows each (default {d.batch_size})")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score the first N examples only (default: all)")
    p.add_argument("--device", default=d.device, help="auto (the default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="precision (default auto: bf16 autocast on CUDA, float32 on the CPU)")
    p.add_argument("--kernels", default=d.kernels, choices=BACKENDS,
                   help="implementation of the fused ops (default auto: Triton on CUDA, PyTorch on the CPU)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    evaluate(EvalConfig(**{k: getattr(args, k) for k in EvalConfig.__dataclass_fields__}))
    return 0


def add_train_hellaswag_args(g: argparse._ArgumentGroup) -> None:
    """gpt train's options for HellaSwag at evaluations."""
    g.add_argument("--hellaswag", metavar="FILE", default=None,
                   help="score this HellaSwag file (hellaswag_val.jsonl) at evaluations, into log.jsonl (default: no)")
    g.add_argument("--hellaswag-every", type=int, metavar="N", default=None,
                   help="steps between HellaSwag scores, a multiple of --eval-every (default: every evaluation)")


def cmd_export(args) -> int:
    from .hf_export import export_run

    out, what = export_run(args.run, args.to, force=args.force)
    print(f"exported {what} from {args.run} to {out}: load it with transformers' from_pretrained({str(out)!r}) "
          f"and AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def add_export_command(sub) -> None:
    e = sub.add_parser("export", help="write a run as a Hugging Face GPT-2 directory (transformers loads it)",
                       description="Write a run as a Hugging Face GPT-2 directory: config.json, model.safetensors, "
                                   "generation_config.json and GPT-2's tokenizer files, which transformers' "
                                   "from_pretrained and AutoTokenizer load offline. A pretraining or instruction run "
                                   "becomes a GPT2LMHeadModel (LoRA adapters merged), a classifier run a "
                                   "GPT2ForSequenceClassification with its labels.")
    e.add_argument("run", metavar="RUN", help="a run directory of gpt train, gpt finetune-* or gpt lora-merge")
    e.add_argument("--to", required=True, metavar="DIR", help="where to write it (a new or empty directory)")
    e.add_argument("--force", action="store_true",
                   help="write into a directory that holds other files, replacing the Hugging Face files there "
                        "(default: refuse a directory that is not empty)")
    e.set_defaults(func=cmd_export)


def add_info_command(sub) -> None:
    i = sub.add_parser("info", help="presets, parameter counts and the active kernel backend",
                       description="The presets with their sizes and parameter counts, the torch and Triton "
                                   "versions, and which kernels run.")
    i.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import gpt_kernels.backend as kb

    kernels_in_force()  # a $GPT_KERNELS that names no backend is refused, as by every command
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
            untied = GPT(dataclasses.replace(cfg, tie_weights=False)).num_parameters()
        print(f"{name:<12} {cfg.n_layers:>6} {cfg.emb_dim:>6} {cfg.n_heads:>6} {cfg.context_length:>8} "
              f"{tied:>15,} {untied:>16,}")
    return 0


def add_plan_command(sub) -> None:
    d = PlanConfig()
    p = sub.add_parser(
        "plan", help="memory per GPU and time per step of a training run, before running it",
        description="Work out a training step's memory per GPU (weights, gradients, AdamW state, DDP/FSDP buffers, "
                    "activations without and with recomputation) and its time from the model's FLOPs and the GPU's "
                    "peak at an assumed utilisation. The formulas and their sources: gpt/plan.py. Nothing is run.")
    p.add_argument("--preset", default=d.preset, choices=PRESETS, metavar="NAME",
                   help=f"the model: {', '.join(PRESETS)} (default {d.preset})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="B",
                   help=f"sequences per GPU per forward (default {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="tokens per sequence (default: the model's context length)")
    p.add_argument("--parallel", default=d.parallel, choices=PARALLEL,
                   help="none (one GPU), ddp (a whole copy per GPU), fsdp (weights, gradients and optimizer state "
                        f"sharded over the GPUs) (default {d.parallel})")
    p.add_argument("--gpus", type=int, default=d.gpus, metavar="N", help=f"GPUs in the run (default {d.gpus})")
    p.add_argument("--gpu", default=d.gpu, choices=GPUS, metavar="NAME",
                   help=f"the GPU: {', '.join(GPUS)} (default {d.gpu})")
    p.add_argument("--recompute", default=d.recompute, choices=RECOMPUTE,
                   help=f"the recomputation the run will use, marked in the output (default {d.recompute})")
    p.add_argument("--dtype", default=d.dtype, choices=PLAN_DTYPES,
                   help=f"training precision: autocast's dtype, or float32 with TF32 matmuls (default {d.dtype})")
    p.add_argument("--mfu", type=float, default=d.mfu, metavar="F",
                   help=f"the share of the GPU's dense peak the step time assumes (default {d.mfu:g})")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    print(format_plan(plan(PlanConfig(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                                      parallel=args.parallel, gpus=args.gpus, gpu=args.gpu, recompute=args.recompute,
                                      dtype=args.dtype, mfu=args.mfu))))
    return 0


def add_tool_commands(sub) -> None:
    """info, prepare-data, eval, export and plan, in that order in ``gpt --help``."""
    add_info_command(sub)
    add_prepare_command(sub)
    add_eval_command(sub)
    add_export_command(sub)
    add_plan_command(sub)
