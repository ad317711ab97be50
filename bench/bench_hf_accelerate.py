"""How much faster and leaner is a transformers GPT-2 after ``gpt.accelerate_hf``?

The same ``GPT2LMHeadModel`` (random GPT-2 weights, transformers' default SDPA attention), plain and
accelerated, at the same shapes: one training step (forward with labels, backward, AdamW step), dropout as
GPT-2's config has it (0.1). Measured:

- step time: the median of repeats after a warm-up (CUDA: ``triton.testing.do_bench``);
- peak memory of a step above what the model, its gradients and AdamW's state hold between steps. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: the process's resident-set high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs`` before the measured step), each variant in a fresh process with glibc's
  mmap threshold pinned at 64 KiB so freed tensors leave the resident set; it counts what the allocator
  holds, so read it as a comparison between the two rows, not as a byte count of tensors.

On the CPU ``gpt_kernels`` runs PyTorch's own ops (no Triton kernels without a GPU), so the CPU rows measure
what the replacement itself costs; the fused kernels' gains show on a GPU.

    python -m bench hf_accelerate              # tiny and gpt2-small (B 2 x T 128) on this machine
    python -m bench.bench_hf_accelerate --quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bench.common import (
    add_output_args,
    cpu_time_ms,
    cuda_time_ms,
    format_table,
    peak_memory,
    results_dir,
    save_results,
)

VARIANTS = ("transformers", "accelerated")
SHAPES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, B=4, T=64), "gpt2-small": dict(n_embd=768, n_layer=12,
                                                                                      n_head=12, B=2, T=128)}
METRIC = "vs_transformers"


def _step_fn(preset: str, variant: str, device: str):
    """A training step of a GPT2LMHeadModel of ``preset``'s size, plain or accelerated."""
    import transformers

    from gpt import accelerate_hf

    s = SHAPES[preset]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=s["n_embd"], n_layer=s["n_layer"],
                                                                 n_head=s["n_head"])).to(device).train()
    if variant == "accelerated":
        accelerate_hf(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, 50257, (s["B"], s["T"]), device=device)

    def step():
        model(idx, labels=idx).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(preset: str, variant: str, repeats: int) -> dict:
    """{ms, peak_bytes} of one variant, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = _step_fn(preset, variant, device)
    step()  # warm-up: AdamW's state exists from here on
    if device == "cuda":
        return {"ms": cuda_time_ms(step), "peak_bytes": peak_memory(step)}
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the resident set now
    step()
    peak = _rss("VmHWM") - base
    return {"ms": cpu_time_ms(step, repeats=repeats, warmup=0), "peak_bytes": peak}


def _measure_in_child(preset: str, variant: str, repeats: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS
    out = subprocess.run([sys.executable, "-m", "bench.bench_hf_accelerate", "--child", preset, variant,
                          str(repeats)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    rows = []
    repeats = 3 if quick else 5
    for preset in (["tiny"] if quick else list(SHAPES)):
        s = SHAPES[preset]
        for variant in VARIANTS:
            m = measure(preset, variant, repeats) if torch.cuda.is_available() else _measure_in_child(
                preset, variant, repeats)
            rows.append({"suite": "hf_accelerate", "case": f"{preset} train B{s['B']}xT{s['T']}", "impl": variant,
                         "ms": m["ms"], "per_s": 1e3 / m["ms"], "unit": "steps/s",
                         "peak_mib": m["peak_bytes"] / 2**20})
    for r in rows:
        base = next(b for b in rows if b["case"] == r["case"] and b["impl"] == "transformers")
        r["vs_transformers"] = r["per_s"] / base["per_s"]
        r["memory_vs_transformers"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
    return rows


def main(argv=None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one variant in a fresh process: python -m ... --child PRESET VARIANT REPEATS
        print(json.dumps(measure(argv[1], argv[2], int(argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny size only, fewer repeats (default: both sizes)")
    add_output_args(p)
    args = p.parse_args(argv)
    rows = run(quick=args.quick)
    print(format_table(rows, ["case", "impl", "ms", "per_s", "vs_transformers", "peak_mib",
                              "memory_vs_transformers"]))
    print(f"saved {save_results('hf_accelerate', rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
