"""How fast is gpt prepare-data, against tiktoken's own batch encoder on the same text and cores?

A corpus of FineWeb-like documents (about 4 KB each, assembled from paragraphs of the bundled texts: The
Verdict, the instruction data, the SMS collection) is written as JSON lines. In the same run, on the
same documents and the same number of threads:

- ``tiktoken``: ``encode_ordinary_batch(docs, num_threads=W)`` on the documents already in memory (the
  lists of ids it returns are all it does);
- ``prepare-data``: ``gpt.shards.prepare_data`` from the file, end to end: hashing and checking the
  source, reading and parsing the JSON, tokenizing, writing the shards and the index.

Figure: document tokens per second (the separators not counted), and ours over tiktoken's (the goal: at
least 0.8). Median of ``--repeats`` alternating runs.

    python -m bench.bench_prepare                 # 32 MB, every core and 1 thread
    python -m bench.bench_prepare --mb 8 --repeats 1
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import add_output_args, format_table, machine_info, results_dir, save_results

METRIC = "vs_tiktoken"  # ours over tiktoken's encode_ordinary_batch in the same run (goal >= 0.8)


def _paragraphs() -> list[str]:
    from gpt.tokenizer import asset_path

    paras = [p for p in open(asset_path("the-verdict.txt"), encoding="utf-8").read().split("\n\n") if p.strip()]
    for r in json.load(open(asset_path("instruction-data.json"), encoding="utf-8")):
        paras += [r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]]
    return paras


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> list[str]:
    """Documents of about 4 KB of paragraphs, as JSON lines in ``path``; returns them."""
    rng, paras, docs, size = random.Random(seed), _paragraphs(), [], 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            doc, n = [], 0
            while n < 4000:
                doc.append(rng.choice(paras))
                n += len(doc[-1]) + 2
            docs.append("\n\n".join(doc))
            line = json.dumps({"text": docs[-1], "id": len(docs)}) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
    return docs


def run(quick: bool = False, megabytes: float | None = None, repeats: int | None = None) -> list[dict]:
    from gpt.shards import PrepareConfig, default_workers, prepare_data
    from gpt.tokenizer import get_tokenizer

    megabytes, repeats = megabytes or (8 if quick else 32), repeats or (1 if quick else 3)
    enc = get_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        docs = write_corpus(src, megabytes)
        threads = sorted({default_workers(), 1}, reverse=True)
        for w in threads:
            times = {"tiktoken": [], "prepare-data": []}
            tokens = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                ids = enc.encode_ordinary_batch(docs, num_threads=w)
                times["tiktoken"].append(time.perf_counter() - t0)
                tokens = sum(map(len, ids))
                del ids
                out = Path(tmp) / "out"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                index = prepare_data(PrepareConfig(sources=[str(src)], out=str(out), workers=w, val_tokens=0),
                                     say=lambda *a: None)
                times["prepare-data"].append(time.perf_counter() - t0)
                assert index["tokens"]["train"] - index["documents"] == tokens  # the same tokens, EOTs aside
            for impl, ts in times.items():
                s = statistics.median(ts)
                rows.append({"suite": "prepare", "case": f"{megabytes:g} MB JSONL, {w} thread(s)", "impl": impl,
                             "threads": w, "s": s, "tokens": tokens, "tokens_per_s": tokens / s,
                             "MB_per_s": os.path.getsize(src) / s / 1e6})
    for r in rows:
        base = next(b for b in rows if b["case"] == r["case"] and b["impl"] == "tiktoken")
        r["vs_tiktoken"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 32; --quick: 8)")
    p.add_argument("--repeats", type=int, default=None, help="alternating runs of each, median (default 3)")
    p.add_argument("--quick", action="store_true", help="8 MB, one run each")
    add_output_args(p)
    args = p.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cpu_count']} cores), python {info['python']}")
    load = os.getloadavg()  # the machine may be shared: how busy it was, before and after
    rows = run(args.quick, args.mb, args.repeats)
    print(format_table(rows, ["case", "impl", "s", "tokens", "tokens_per_s", "MB_per_s", "vs_tiktoken"]))
    import tiktoken

    extra = {"tiktoken": tiktoken.__version__, "load_average_1min": [load[0], os.getloadavg()[0]]}
    print(f"load average (1 min) before and after: {extra['load_average_1min']}")
    print(f"saved {save_results('prepare', rows, extra, results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
