"""The command line's data command, ``gpt prepare-data``: argparse only, registered by :mod:`gpt.cli`
(which prints a user's mistake as one line, as for every command)."""

from __future__ import annotations

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
