"""How much activation memory does ``--recompute`` save, and what does it cost in time per step?

One training step (forward with the loss, backward) of gpt2-small's shapes (12 layers, width 768, 12 heads,
GPT-2's vocabulary), for each of ``--recompute none``, ``blocks`` and ``attention``, on the same weights and
batch, in the same run:

- peak memory: the bytes the step allocates above what was held before it, after a first step so that
  every gradient already exists (as in any step but the first). On the CPU every allocation and free
  torch's allocator makes, summed in time order (``bench.common.cpu_peak_memory``, through the profiler);
  on CUDA ``torch.cuda.max_memory_allocated``. The planner's estimate for the same step
  (``gpt.plan.activation_bytes``) is printed beside it.
- time per step: the median of ``--repeats`` steps after the first; the modes' steps are interleaved
  (none, blocks, attention, none, ...) so that a busy shared machine slows them alike.

Figures: saved memory (``1 - peak / peak of none``) and time over ``none``'s. On the CPU the model runs
PyTorch's ops in fp32 with attention dropout off (with dropout, the CPU's attention takes its math path and
keeps the T x T probabilities, which the GPU's kernel never does); residual and embedding dropout stay on.
On CUDA: the Triton kernels under bf16 autocast, dropout 0.1 everywhere.

    python -m bench.bench_recompute                    # B 2 x T 128 on the CPU (about 4 minutes on 2 busy cores)
    python -m bench.bench_recompute --batch 1 --seq 64 --repeats 1
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.common import (
    add_output_args,
    cpu_peak_memory,
    format_table,
    machine_info,
    peak_memory,
    results_dir,
    save_results,
)

METRIC = "memory_saved"  # 1 - peak / peak of --recompute none, in the same run


def _model(cuda: bool):
    from gpt import GPT
    from gpt.model import CausalSelfAttention

    torch.manual_seed(0)
    model = GPT.from_preset("gpt2-small", kernel_backend="triton" if cuda else "torch")
    if not cuda:
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                m.dropout = 0.0  # see the module's doc
    return model.to("cuda" if cuda else "cpu").train()


def run(quick: bool = False, batch: int | None = None, seq: int | None = None, repeats: int | None = None
        ) -> list[dict]:
    from gpt.model import RECOMPUTE
    from gpt.plan import activation_bytes

    batch, seq, repeats = batch or (1 if quick else 2), seq or (64 if quick else 128), repeats or (1 if quick else 3)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    amp = torch.bfloat16 if cuda else None
    model = _model(cuda)  # one model, its mode switched before each step: the same weights for every mode
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    idx, tgt = (torch.randint(0, V, (batch, seq), generator=g).to(device) for _ in range(2))

    def step(mode):
        def fn():
            model.recompute = mode
            with torch.autocast(device, dtype=amp, enabled=amp is not None):
                _, loss = model(idx, tgt)  # (B, T) ids -> scalar loss
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
        return fn

    peaks, times = {}, {mode: [] for mode in RECOMPUTE}
    for mode in RECOMPUTE:
        step(mode)()  # a first step in this mode (the gradients exist from the very first)
        peaks[mode] = peak_memory(step(mode)) if cuda else cpu_peak_memory(step(mode))
    for _ in range(repeats):
        for mode in RECOMPUTE:
            t0 = time.perf_counter()
            step(mode)()
            times[mode].append(time.perf_counter() - t0)
    rows = []
    for mode in RECOMPUTE:
        est = activation_bytes(model.config, batch, seq, mode, dtype="bfloat16" if cuda else "float32",
                               kernels="triton" if cuda else "torch", device=device)["peak"]
        s = statistics.median(times[mode])
        rows.append({"suite": "recompute", "case": f"gpt2-small B{batch} x T{seq}", "impl": mode,
                     "peak_MiB": peaks[mode] / 2**20, "plan_MiB": est / 2**20, "memory_saved": 1 - peaks[mode]
                     / peaks["none"], "ms_per_step": s * 1e3, "time_vs_none": s / statistics.median(times["none"])})
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; --quick: 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; --quick: 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per mode, median (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="B 1 x T 64, one timed step per mode")
    add_output_args(p)
    args = p.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['gpu'] or info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
          f"python {info['python']}, {torch.get_num_threads()} torch threads")
    load = os.getloadavg()  # the machine may be shared: how busy it was, before and after
    rows = run(args.quick, args.batch, args.seq, args.repeats)
    print(format_table(rows, ["case", "impl", "peak_MiB", "plan_MiB", "memory_saved", "ms_per_step",
                              "time_vs_none"]))
    extra = {"load_average_1min": [load[0], os.getloadavg()[0]], "torch_threads": torch.get_num_threads()}
    print(f"load average (1 min) before and after: {extra['load_average_1min']}")
    print(f"saved {save_results('recompute', rows, extra, results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
