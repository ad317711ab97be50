"""Time every attention autotune config and the cross-entropy launch choices at the training shapes.

    python -m bench.tune --out DIR              # GPU: each config's time, DIR/<machine>-<date>-tune.json
    python -m bench.tune --dry-run --out DIR    # the same loop on the CPU (tiny shapes, interpreter): code only
    python -m bench.tune --head-dims 64 --seq-lens 1024 2048 --dropouts 0.1 --budget 120

Shapes (bf16, causal): 16K tokens per batch (``bench_attention.TOKENS``; B = TOKENS / T), H = HIDDEN / D
heads (``bench_attention.HIDDEN``), T = 1K..8K, D = 64 and 128, attention dropout 0 and 0.1.

- Attention: every config of ``gpt_kernels.flash_attention``'s FWD_CONFIGS, DKDV_CONFIGS and DQ_CONFIGS that
  serves the shape (``_Config.serves``: head dim, dropout, 16-bit inputs), read from the module when this
  runs, so the lists can change without touching this file. Each is forced through
  ``flash_attention.FORCE_CONFIGS`` (the hook test_gpu_every_autotune_config uses) and timed with
  ``bench.common.time_ms`` (``triton.testing.do_bench``: median, L2 flushed):
      fwd    the forward alone;
      dkdv   the whole backward (``torch.autograd.grad``), dQ forced to its first serving config;
      dq     the whole backward, dK/dV forced to its first serving config;
  so among one kernel's rows everything else is the same and the differences are that kernel's. TFLOP/s
  are counted as bench_attention counts them; ``x sdpa`` is SDPA's flash backend's time at the same shape
  (with the same dropout) over ours: above 1, ours is faster.
- Cross-entropy (N = TOKENS rows, V = 50,257 and the padded 50,304, bf16): the kernel has no autotuner;
  its launcher picks (BLOCK_V, num_warps) from V (``fused_cross_entropy._launch_config``). Timed: that pick
  and its neighbours (BLOCK_V / 2 and x 2, warps / 2 and x 2), each forced by patching the pick, forward
  + backward (the training call; the kernel serves both); and ``linear_cross_entropy`` (C = 768) at 1/4..4
  times its default chunk (``_default_chunk``), forward + backward, with peak memory.

A cold Triton cache costs more than the timing: first ``--jobs`` subprocesses compile every config (one
(D, dropout, kernel) group each) at T = 256, which has the same specialisation, so the timing loop finds
them compiled. Shapes run D = 64 first (GPT-2's head dim), then cross-entropy, then D = 128; no new shape
starts once ``--budget`` is spent, and the JSON is rewritten after each shape. Last comes a summary per
kernel: each config's wins, how often it comes within 3% of the best, and its geometric-mean time over the
best. The lists can be cut to the configs that win or come within 3% somewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

from bench.common import format_table, machine_info, machine_tag, time_ms

SEQ_LENS = (1024, 2048, 4096, 8192)
HEAD_DIMS = (64, 128)
DROPOUTS = (0.0, 0.1)
VOCABS = (50257, 50304)  # GPT-2's vocabulary, and padded to a multiple of 64 as the training model pads it
CLOSE = 1.03  # "within 3% of the best"
WARM_T = 256  # the warm-up length: a multiple of 16 like every training length, so the same specialisation
KERNELS = {"fwd": "FWD_CONFIGS", "dkdv": "DKDV_CONFIGS", "dq": "DQ_CONFIGS"}  # flash_attention's lists
# --dry-run: tiny shapes on the CPU (80 pads to BLOCK_D 128, so both head-dim groups of configs are listed)
DRY = {"tokens": 64, "hidden": 32, "seq_lens": (32,), "head_dims": (16, 80), "N": 16, "V": (1000,), "C": 32}


def _fa():
    """gpt_kernels.flash_attention, imported only after a dry run has set TRITON_INTERPRET."""
    from gpt_kernels import flash_attention

    return flash_attention


def config_name(c) -> str:
    return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"


def serving(kernel: str, D: int, dropout: float) -> list:
    """The configs of ``kernel``'s list that the autotuner may choose for 16-bit inputs at head dim D on
    this machine's GPU family (sm_90 when there is no GPU: the dry run)."""
    import torch
    import triton

    fa = _fa()
    arch = fa._arch_family(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return [c for c in getattr(fa, KERNELS[kernel]) if c.serves(triton.next_power_of_2(D), dropout > 0, False, arch)]


class Tuner:
    def __init__(self, dry_run: bool, out: Path | None):
        self.dry_run, self.out = dry_run, out
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = torch.float32 if dry_run else torch.bfloat16  # the interpreter's bf16 dot is unreliable
        self.rows: list[dict] = []
        self.info = machine_info()
        self.timer_kw = {"repeats": 1, "warmup": 1} if dry_run else {}
        if dry_run:
            self.tokens, self.hidden = DRY["tokens"], DRY["hidden"]
        else:
            from bench.bench_attention import HIDDEN, TOKENS

            self.tokens, self.hidden = TOKENS, HIDDEN

    def time(self, fn) -> float:
        return time_ms(fn, **self.timer_kw)

    def shape(self, T: int, D: int) -> tuple[int, int]:
        """(B, H) at length T and head dim D."""
        return max(1, self.tokens // T), max(1, self.hidden // D)

    # ---------------------------------------------------------------------------------------- attention

    def _inputs(self, B, H, T, D):
        q, k, v = (torch.randn(B, H, T, D, device=self.device, dtype=self.dtype, requires_grad=True)
                   for _ in range(3))
        return q, k, v, torch.randn(B, H, T, D, device=self.device, dtype=self.dtype)

    def _run_forced(self, forced: dict, q, k, v, do, dropout: float, backward: bool, timed: bool):
        """One forward (or forward + backward) with ``forced`` configs; its median ms if ``timed``."""
        import gpt_kernels

        fa = _fa()
        saved = fa.FORCE_CONFIGS
        fa.FORCE_CONFIGS = forced
        try:
            with gpt_kernels.use_backend("triton"):
                if not backward:
                    def fn():
                        with torch.no_grad():
                            gpt_kernels.attention(q, k, v, causal=True, dropout_p=dropout)
                else:
                    out = gpt_kernels.attention(q, k, v, causal=True, dropout_p=dropout)

                    def fn():
                        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                if not timed:
                    fn()
                    return None
                return self.time(fn)
        finally:
            fa.FORCE_CONFIGS = saved

    def _sdpa_ms(self, q, k, v, do, dropout: float) -> tuple[float | None, float | None]:
        """(forward ms, backward ms) of SDPA's flash backend (math on the CPU) at this shape, or Nones."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.MATH if self.dry_run else SDPBackend.FLASH_ATTENTION
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
                fwd_ms = self.time(fwd)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
                bwd_ms = self.time(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            return fwd_ms, bwd_ms
        except RuntimeError as e:
            print(f"  sdpa did not run: {str(e).strip().splitlines()[0][:120] if str(e).strip() else e}")
            return None, None

    def attention_shape(self, T: int, D: int, dropout: float) -> list[dict]:
        """Every serving config of each attention kernel at one shape, one row each."""
        from bench.bench_attention import attention_flops

        B, H = self.shape(T, D)
        q, k, v, do = self._inputs(B, H, T, D)
        first = {name: serving(name, D, dropout)[0] for name in KERNELS}
        sdpa_fwd, sdpa_bwd = self._sdpa_ms(q, k, v, do, dropout)
        rows = []
        for name in KERNELS:
            backward = name != "fwd"
            flops = attention_flops(B, H, T, D, backward=backward)
            for c in serving(name, D, dropout):
                row = {"op": "attention", "kernel": name, "config": config_name(c), "D": D, "T": T, "B": B, "H": H,
                       "dropout": dropout}
                try:
                    ms = self._run_forced({**first, name: c}, q, k, v, do, dropout, backward, timed=True)
                    base = sdpa_bwd if backward else sdpa_fwd
                    row.update(ms=ms, **{"TFLOP/s": flops / (ms * 1e-3) / 1e12,
                                         "x sdpa": base / ms if base else None})
                except Exception as e:  # a config that does not compile or launch is a finding, not a stop
                    row["error"] = _error(e)
                rows.append(row)
        _mark_best(rows, ("kernel",))
        return rows

    # ------------------------------------------------------------------------------------ cross-entropy

    def ce_candidates(self, V: int) -> list[tuple[int, int]]:
        """The launcher's (BLOCK_V, num_warps) for V and its neighbours, at least one element per thread."""
        from gpt_kernels import fused_cross_entropy as fce

        bv0, nw0 = fce._launch_config(V)
        return [(bv, nw) for bv in sorted({max(16, bv0 // 2), bv0, bv0 * 2})
                for nw in sorted({max(1, nw0 // 2), nw0, min(32, nw0 * 2)}) if bv >= 32 * nw]

    def cross_entropy(self) -> list[dict]:
        """The loss's launch choices and the chunked loss's chunk sizes, for each vocabulary size."""
        from bench.bench_cross_entropy import C_GPT2

        n = DRY["N"] if self.dry_run else self.tokens
        vocabs, C = (DRY["V"], DRY["C"]) if self.dry_run else (VOCABS, C_GPT2)
        rows = []
        for V in vocabs:
            rows += self._loss_rows(n, V)
            rows += self._chunk_rows(n, V, C)
        return rows

    def _loss_rows(self, n: int, V: int) -> list[dict]:
        """gpt_kernels.cross_entropy's forward + backward (the training call) at each (BLOCK_V, num_warps)."""
        import gpt_kernels
        from gpt_kernels import fused_cross_entropy as fce

        x = (torch.randn(n, V, device=self.device) * 2).to(self.dtype).requires_grad_()  # (N, V)
        t = torch.randint(0, V, (n,), device=self.device)  # (N,)
        e = torch.finfo(self.dtype).bits // 8
        pick = fce._launch_config(V)
        rows = []
        for bv, nw in self.ce_candidates(V):
            row = {"op": "cross_entropy", "kernel": "cross_entropy", "config": f"BLOCK_V={bv} w{nw}", "V": V, "N": n,
                   "launcher's pick": (bv, nw) == pick}
            try:
                with (mock.patch.object(fce, "_launch_config", lambda V, c=(bv, nw): c),
                      gpt_kernels.use_backend("triton")):
                    ms = self.time(lambda: torch.autograd.grad(gpt_kernels.cross_entropy(x, t), x))
                row.update(ms=ms, **{"GB/s (2NV*e)": 2 * n * V * e / (ms * 1e-3) / 1e9})
            except Exception as err:
                row["error"] = _error(err)
            rows.append(row)
        _mark_best(rows, ("V",))
        return rows

    def _chunk_rows(self, n: int, V: int, C: int) -> list[dict]:
        """gpt_kernels.linear_cross_entropy forward + backward at 1/4..4 times its default chunk."""
        import gpt_kernels
        from gpt_kernels import fused_cross_entropy as fce

        h = torch.randn(n, C, device=self.device).to(self.dtype).requires_grad_()  # (N, C)
        w = (torch.randn(V, C, device=self.device) * 0.02).to(self.dtype).requires_grad_()  # (V, C)
        t = torch.randint(0, V, (n,), device=self.device)  # (N,)
        e = torch.finfo(self.dtype).bits // 8
        default = fce._default_chunk(V, self.dtype)

        def step(chunk):
            with gpt_kernels.use_backend("triton"):
                loss = gpt_kernels.linear_cross_entropy(h, w, t, chunk_size=chunk)
            torch.autograd.grad(loss, (h, w))

        rows = []
        for chunk in sorted({max(64, int(default * f) // 64 * 64) for f in (0.25, 0.5, 1, 2, 4)}):
            row = {"op": "linear_cross_entropy", "kernel": "linear_cross_entropy", "config": f"chunk={chunk}",
                   "V": V, "N": n, "C": C, "chunk_MiB": chunk * V * e / 2**20, "default": chunk == default}
            try:
                row["ms"] = self.time(lambda c=chunk: step(c))
                if not self.dry_run:
                    from bench.common import peak_memory

                    row["peak MiB"] = peak_memory(lambda c=chunk: step(c)) / 2**20
            except Exception as err:
                row["error"] = _error(err)
            rows.append(row)
        _mark_best(rows, ("V",))
        return rows

    # ----------------------------------------------------------------------------------------- warm-up

    def warm(self, groups: list) -> None:
        """Compile (run once) every config of each (D, dropout, kernel) group, or the CE candidates."""
        for g in groups:
            try:
                if g[0] == "ce":
                    self._warm_ce()
                    continue
                D, dropout, name = g
                H = self.shape(WARM_T, D)[1]  # H as in the timing: the same specialisation
                q, k, v, do = self._inputs(1, H, 16 if self.dry_run else WARM_T, D)
                first = {n: serving(n, D, dropout)[0] for n in KERNELS}
                for c in serving(name, D, dropout):
                    self._run_forced({**first, name: c}, q, k, v, do, dropout, name != "fwd", timed=False)
                print(f"warm: D={D} dropout={dropout} {name}: {len(serving(name, D, dropout))} configs", flush=True)
            except Exception as e:  # the timing loop will meet and record it
                print(f"warm {g}: {_error(e)}", flush=True)

    def _warm_ce(self) -> None:
        import gpt_kernels
        from gpt_kernels import fused_cross_entropy as fce

        n = DRY["N"] if self.dry_run else 64  # the row count is the grid, not part of the specialisation
        for V in DRY["V"] if self.dry_run else VOCABS:
            x = torch.randn(n, V, device=self.device).to(self.dtype).requires_grad_()  # (n, V)
            t = torch.randint(0, V, (n,), device=self.device)  # (n,)
            for c in self.ce_candidates(V):
                try:
                    with mock.patch.object(fce, "_launch_config", lambda V, c=c: c), gpt_kernels.use_backend("triton"):
                        torch.autograd.grad(gpt_kernels.cross_entropy(x, t), x)
                except Exception as e:
                    print(f"warm ce {c}: {_error(e)}", flush=True)
        print("warm: cross-entropy candidates", flush=True)

    # -------------------------------------------------------------------------------------------- output

    def save(self, extra: dict) -> Path | None:
        if self.out is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{machine_tag(self.info)}-{self.info['date']}-tune.json"
        payload = {"suite": "tune", "machine": self.info, "rows": self.rows, "summary": summarize(self.rows),
                   **extra}
        path.write_text(json.dumps(payload, indent=1, default=str))
        return path


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _mark_best(rows: list[dict], by: tuple) -> None:
    """Set ``x best`` (ms over the fastest in the same group) on every timed row."""
    groups: dict = {}
    for r in rows:
        if r.get("ms"):
            groups.setdefault(tuple(r[k] for k in by), []).append(r)
    for group in groups.values():
        best = min(r["ms"] for r in group)
        for r in group:
            r["x best"] = r["ms"] / best


def summarize(rows: list[dict]) -> list[dict]:
    """Per (kernel, config): shapes timed, wins, times within 3% of the best, geometric-mean x best."""
    out: dict = {}
    for r in rows:
        s = out.setdefault((r["kernel"], r["config"]), {"kernel": r["kernel"], "config": r["config"], "shapes": 0,
                                                         "wins": 0, "within 3%": 0, "errors": 0, "_logs": []})
        if r.get("x best"):
            s["shapes"] += 1
            s["wins"] += r["x best"] == 1.0
            s["within 3%"] += r["x best"] <= CLOSE
            s["_logs"].append(math.log(r["x best"]))
        elif r.get("error"):
            s["errors"] += 1
    for s in out.values():
        logs = s.pop("_logs")
        s["geo-mean x best"] = math.exp(sum(logs) / len(logs)) if logs else None
    return list(out.values())


def _plan(head_dims, seq_lens, dropouts, with_ce: bool) -> list[tuple]:
    """The shapes in priority order: the first head dim's, cross-entropy, then the other head dims'."""
    jobs = []
    for i, D in enumerate(head_dims):
        jobs += [("attention", T, D, p) for p in dropouts for T in seq_lens]
        if i == 0 and with_ce:
            jobs.append(("cross_entropy",))
    return jobs


def _warm_up(head_dims, dropouts, with_ce: bool, jobs: int, timeout: float, dry_run: bool) -> None:
    """Compile in ``jobs`` parallel subprocesses (one or more groups each) into Triton's on-disk cache."""
    groups = [[D, p, k] for D in head_dims for p in dropouts for k in KERNELS] + ([["ce"]] if with_ce else [])
    shares = [groups[i::jobs] for i in range(jobs) if groups[i::jobs]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                    env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.tune", "--warm", json.dumps(share)]
                              + (["--dry-run"] if dry_run else []), env=env, start_new_session=True)
             for share in shares]
    t0 = time.monotonic()
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            print("warm-up: out of time; the timing loop compiles the rest", flush=True)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    print(f"warm-up: {len(groups)} groups in {len(shares)} processes, {time.monotonic() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:5]))
    p.add_argument("--out", help="write <machine>-<date>-tune.json here (after every shape)")
    p.add_argument("--dry-run", action="store_true", help="the same loop on the CPU: tiny shapes, interpreter")
    p.add_argument("--seq-lens", type=int, nargs="+", help=f"lengths T (default {SEQ_LENS})")
    p.add_argument("--head-dims", type=int, nargs="+", help=f"head dims D (default {HEAD_DIMS})")
    p.add_argument("--dropouts", type=float, nargs="+", default=list(DROPOUTS), help="attention dropout (0 0.1)")
    p.add_argument("--no-ce", action="store_true", help="skip cross-entropy")
    p.add_argument("--budget", type=float, default=180, help="seconds; no new shape starts after (default 180)")
    p.add_argument("--jobs", type=int, help="parallel compile processes (default: cores, at most 16; 1 dry run)")
    p.add_argument("--warm", help=argparse.SUPPRESS)  # internal: compile these groups in this process
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before `gpt_kernels` is imported
    elif not torch.cuda.is_available():
        print("bench.tune needs a CUDA GPU; `python -m bench.tune --dry-run` runs the same loop on the CPU.",
              file=sys.stderr)
        return 2
    tuner = Tuner(args.dry_run, Path(args.out) if args.out else None)
    if args.warm:
        tuner.warm(json.loads(args.warm))
        return 0
    t0 = time.monotonic()
    head_dims = tuple(args.head_dims or (DRY["head_dims"] if args.dry_run else HEAD_DIMS))
    seq_lens = tuple(args.seq_lens or (DRY["seq_lens"] if args.dry_run else SEQ_LENS))
    info = tuner.info
    print(f"device: {info['gpu'] or info['cpu']}, torch {info['torch']}, triton {info['triton']}")
    jobs = args.jobs or (1 if args.dry_run else min(os.cpu_count() or 1, 16))
    _warm_up(head_dims, args.dropouts, not args.no_ce, jobs, args.budget * 0.5, args.dry_run)
    done, skipped = [], []
    for job in _plan(head_dims, seq_lens, args.dropouts, not args.no_ce):
        if time.monotonic() - t0 > args.budget:
            skipped.append(job)
            continue
        label = "cross-entropy" if job[0] == "cross_entropy" else f"attention T={job[1]} D={job[2]} dropout={job[3]}"
        try:
            rows = tuner.cross_entropy() if job[0] == "cross_entropy" else tuner.attention_shape(*job[1:])
        except Exception as e:  # e.g. out of memory for the inputs: record it, go on
            traceback.print_exc()
            rows = [{"op": job[0], "kernel": job[0], "config": "-", "shape": label, "error": _error(e)}]
        tuner.rows += rows
        done.append(label)
        cols = ["kernel", "config", "ms", "TFLOP/s", "GB/s (2NV*e)", "peak MiB", "x best", "x sdpa", "error"]
        cols = [c for c in cols if any(c in r for r in rows)]
        print(f"\n== {label} ({time.monotonic() - t0:.0f} s)\n{format_table(rows, cols)}", flush=True)
        tuner.save({"done": done, "budget_s": args.budget})
    summary = summarize(tuner.rows)
    print("\n== summary: each config against the best at each shape it serves")
    print(format_table(summary, ["kernel", "config", "shapes", "wins", "within 3%", "geo-mean x best", "errors"]))
    keep = [f"{s['kernel']} {s['config']}" for s in summary if s["within 3%"]]
    never = [f"{s['kernel']} {s['config']}" for s in summary if s["shapes"] and not s["within 3%"]]
    print(f"\nwithin 3% of the best somewhere (keep): {', '.join(keep) or '-'}")
    print(f"never within 3%: {', '.join(never) or '-'}")
    if skipped:
        print(f"not run (budget of {args.budget:.0f} s spent): {len(skipped)} shapes")
    path = tuner.save({"done": done, "not_run": [str(j) for j in skipped], "budget_s": args.budget})
    if path:
        print(f"saved {path}")
    if args.dry_run:
        print("dry run: interpreter timings on the CPU with the interpreter's own tiles, not a measurement")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
