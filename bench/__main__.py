"""One benchmark command: every suite this machine can run, tabled, saved and plotted.

    python -m bench                    # every suite the machine can run (GPU suites need CUDA)
    python -m bench attention norm     # some suites by name
    python -m bench --suite cpu        # the CPU suites (end to end vs transformers, generation)
    python -m bench --suite gpu        # the GPU suites (kernels, end-to-end training, generation)
    python -m bench --list

Writes ``<machine>-<date>.json`` (device, torch/Triton/CUDA versions, every row of every suite) and one PNG
per suite (``<machine>-<date>-<suite>.png``: ours against the baselines) into ``runs/bench/``, which git
ignores; ``--record`` writes them into ``bench/results/`` to be committed, ``--out DIR`` anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

import torch

from bench.common import add_output_args, format_table, machine_info, machine_tag, results_dir

# suite name -> (module, needs a GPU)
SUITES: dict[str, tuple[str, bool]] = {
    "norm": ("bench.bench_norm", True),
    "activation": ("bench.bench_activation", True),
    "attention": ("bench.bench_attention", True),
    "cross_entropy": ("bench.bench_cross_entropy", True),
    "e2e_train": ("bench.e2e_train", True),
    "generate": ("bench.bench_generate", False),
    "e2e_cpu": ("bench.e2e_cpu", False),
    "prepare": ("bench.bench_prepare", False),
    "hf_accelerate": ("bench.bench_hf_accelerate", False),
    "recompute": ("bench.bench_recompute", False),
}
GROUPS = {
    "cpu": ["e2e_cpu", "generate", "prepare", "hf_accelerate", "recompute"],
    "gpu": ["norm", "activation", "attention", "cross_entropy", "e2e_train", "generate", "hf_accelerate", "recompute"],
}
_METRIC_GUESSES = ("tflops", "TFLOP/s", "gbps", "GB/s", "tokens_per_s", "per_s")
_IMPL_KEYS = ("impl", "provider", "variant", "method")
_CASE_KEYS = ("case", "shape", "size", "config")


def _first_key(row: dict, keys) -> str | None:
    return next((k for k in keys if k in row), None)


def plot_suite(name: str, rows: list[dict], metric: str | None, path) -> bool:
    """Grouped bars: one group per case, one bar per implementation, ``metric`` (higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return False
    metric = metric or _first_key(rows[0], _METRIC_GUESSES)
    ik, ck = _first_key(rows[0], _IMPL_KEYS), _first_key(rows[0], _CASE_KEYS)
    if not (metric and ik and ck):
        return False
    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    cases = list(dict.fromkeys(str(r[ck]) for r in rows))
    impls = list(dict.fromkeys(str(r[ik]) for r in rows))
    if not cases:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) * max(1, len(impls)) / 2), 4.5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        vals = [next((r[metric] for r in rows if str(r[ck]) == c and str(r[ik]) == impl), 0.0) for c in cases]
        ax.bar([i + j * width for i in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    info = machine_info()
    ax.set_title(f"{name}: {info['gpu'] or info['cpu']} ({info['date']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", help=f"suites to run (default: all that can run): {', '.join(SUITES)}")
    p.add_argument("--suite", choices=sorted(GROUPS), help="a group of suites: cpu or gpu")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.list:
        for name, (mod, gpu) in SUITES.items():
            print(f"{name:<14} {mod:<28} {'GPU' if gpu else 'CPU or GPU'}")
        return 0
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}: choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    names = args.suites or (GROUPS[args.suite] if args.suite else list(SUITES))
    has_gpu = torch.cuda.is_available()
    info = machine_info()
    results: dict[str, list[dict]] = {}
    crashed: list[str] = []  # suites that raised (a row with an "error" of its own is a result, not a crash)
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{machine_tag(info)}-{info['date']}"
    print(f"machine: {info['gpu'] or info['cpu']}, torch {info['torch']}, triton {info['triton']}, "
          f"cuda {info['cuda']}")
    for name in names:
        mod_name, needs_gpu = SUITES[name]
        if needs_gpu and not has_gpu:
            print(f"\n== {name}: needs a CUDA GPU, skipped")
            continue
        print(f"\n== {name}")
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(mod_name)
            rows = mod.run(quick=args.quick)
        except Exception as e:  # one broken suite must not lose the others' numbers
            traceback.print_exc()
            results[name] = [{"error": f"{type(e).__name__}: {e}"}]
            crashed.append(name)
            continue
        results[name] = rows
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
            print(format_table(rows, cols))
            metric = getattr(mod, "METRIC", None)
            png = out / f"{stem}-{name}.png"
            if plot_suite(name, rows, metric, png):
                print(f"plot: {png}")
        print(f"({time.perf_counter() - t0:.0f} s)")
    path = out / f"{stem}.json"
    path.write_text(json.dumps({"machine": info, "suites": results}, indent=1, default=str))
    print(f"\nsaved {path}" + ("" if args.out or args.record else " (--record writes bench/results/, to commit)"))
    if crashed:  # the numbers of the others are saved; the exit status says the run is not complete
        print(f"error: {len(crashed)} suite(s) crashed: {', '.join(crashed)} (the traceback above; an 'error' row in "
              f"{path}); fix them and run them again: python -m bench {' '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
