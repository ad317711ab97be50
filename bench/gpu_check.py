"""The first command on a lent GPU: the machine, the GPU tests, then every benchmark suite, in 9 minutes.

    python -m bench.gpu_check --out DIR              # on the GPU machine: ends by itself (budget 530 s)
    python -m bench.gpu_check --out DIR --dry-run    # the same pipeline on the CPU: tiny shapes, interpreter
    python -m bench.gpu_check --out DIR --only tests e2e_train --budget 300
    python -m bench.gpu_check --out DIR --tune 150   # within the same budget: its last 150 s run bench.tune

First a preflight, in this process: a line for each package that does not import, for a missing C compiler
and for a missing ``Python.h`` (Triton 3.6 builds its launcher with them: without them no kernel launches).
It stops nothing: the stages a missing piece makes impossible are skipped with that reason, the rest run.

Stages, in priority order. Every step runs in its own subprocess with a time limit, so a hang, a crash or
a CUDA error in one loses nothing else; a stage gets at most its cap (``CAPS_S``, scaled with
``--budget``) and never more than the time left. The caps add up to less than the budget (with
``SUMMARY_RESERVE_S`` and ``MARGIN_S`` for what the parent does between steps), so no stage is starved:

1. ``env``: the GPU, driver, library versions, and the two ceilings measured here: a device-to-device
   copy (GB/s, bytes read + written, 512 MiB of random bf16) and a bf16 matmul (TFLOP/s, 8192^3, random).
2. ``precompile``: ``python -m gpt_kernels.precompile bench.workloads:gpu_check``: every kernel the suites
   below launch (``bench/workloads.py``: each suite's Triton calls at its quick shapes), compiled in
   parallel over the host's cores before they run, so the suites do not compile one kernel after another
   inside their caps. The dry run only plans them (``--plan-only``, for sm_90, on the CPU).
3. ``tests``: ``pytest -m "gpu or gpu_path"`` (the GPU tests, and the autocast / torch.compile / custom-op
   tests of the GPU user's path, on CUDA) over the host's cores (pytest-xdist) with ``GPT_KERNELS_AUTOTUNE=first``:
   each autotuned attention launch compiles the first config its pruning leaves instead of every
   candidate, which on a cold Triton cache is most of the tests' time (test_gpu_every_autotune_config
   still runs every config, forced). 30 s before its cap pytest gets SIGINT and reports what ran; a test
   file that fails to import is reported and the others still run (``--continue-on-collection-errors``).
4. each benchmark suite's quick form (``python -m bench <suite> --quick``) in this order: attention;
   e2e_train (eager PyTorch, ours, torch.compile + SDPA); cross_entropy; norm; activation; generate.
   A suite runs in steps of one shape or one variant each, so a cap or a crash keeps the steps before it.

Files in DIR, flat, at most 8, named as bench/results/ names them so that they can be committed as they are:

    <machine>-<date>-gpu-check.json   environment, ceilings, test results, each stage's status and time
    <machine>-<date>-gpu-check.log    every step's output, in order
    <machine>-<date>-<suite>.json     one per suite, ``{suite, machine, rows, status, steps}`` like
                                      ``bench.common.save_results``; rewritten after each of its steps

The check JSON is rewritten after every step too, so a kill loses at most the step in flight. A summary
table is printed last. The exit status is 0 only when every stage ran clean. With ``--tune S`` the
stages above end S seconds early and ``python -m bench.tune`` runs in the rest; its rows and summary go
into the check JSON under "tune" (still 8 files), its tables into the log.

``--dry-run`` runs every stage on the CPU: the suites' ``smoke`` shapes with TRITON_INTERPRET=1 and
GPT_KERNELS=triton (the path CUDA tensors take), and pytest collecting the GPU tests (which skip there).
CI runs it (tests/bench/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 530  # within 9 minutes, with 40 s to spare for start-up and the summary
DRY_RUN_BUDGET_S = 900  # the CPU dry run takes ~1-2 min; a slow CI machine must not cut it
# The most each stage may take at the default budget (scaled with --budget). With SUMMARY_RESERVE_S and
# MARGIN_S they fit in the budget (tests/bench/test_gpu_check.py), so every stage gets its cap even when
# each runs to it; a stage that finishes early leaves its time to the ones after it.
CAPS_S = {"env": 35, "precompile": 50, "tests": 150, "attention": 55, "e2e_train": 110, "cross_entropy": 30,
          "norm": 25, "activation": 20, "generate": 25}
STAGES = tuple(CAPS_S)
SUITES = STAGES[3:]  # the benchmark suites, in priority order
MIN_STEP_S = 15  # less than this left: a step could not even import torch and start CUDA
SUMMARY_RESERVE_S = 5
MARGIN_S = 25  # the parent's own time between steps (writing the results, starting the next), with room to spare
PRECOMPILE_WORKLOAD = "bench.workloads:gpu_check"
INTERRUPT_GRACE_S = 30  # pytest's time between SIGINT and its report
TUNE_MARGIN_S = 40  # bench.tune's budget only stops new shapes: the one in flight and the summary need this
MAX_TEST_WORKERS = 16
PACKAGES = ("torch", "triton", "numpy", "transformers", "tiktoken", "safetensors", "matplotlib", "pytest",
            "pytest-xdist")


@dataclass
class Step:
    """One subprocess of a suite: ``run(**kwargs)`` of the suite's module (bench.__main__.SUITES)."""

    label: str
    kwargs: dict


@dataclass
class Outcome:
    """What one stage or step came to: ``ok``, ``errors`` (ran, some rows failed), ``failed``, ``timeout``,
    ``skipped``."""

    status: str
    seconds: float = 0.0
    error: str | None = None
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- the plan


def suite_steps(suite: str, dry_run: bool) -> list[Step]:
    """The steps of one suite's quick form (GPU) or smoke form (dry run), one shape or variant each."""
    from bench import bench_attention, bench_cross_entropy, bench_norm, e2e_train

    if suite == "e2e_train":
        mode = {"smoke": True} if dry_run else {"quick": True}
        return [Step(v, {**mode, "variants": [v]}) for v in e2e_train.QUICK_VARIANTS]
    if dry_run:
        if suite == "generate":  # on the CPU: the tiny model, a few tokens (GPT_KERNELS=triton: the kernels)
            return [Step("tiny", {"preset": "tiny", "new_tokens": 4, "batch_sizes": [1, 2]})]
        return [Step("smoke", {"smoke": True})]
    if suite == "attention":
        return [Step(f"T={t}", {"quick": True, "seq_lens": [t]}) for t in bench_attention.QUICK_SEQ_LENS]
    if suite == "cross_entropy":
        return [Step(f"N={n}", {"quick": True, "sizes": [n]}) for n in bench_cross_entropy.QUICK_SIZES]
    if suite in ("norm", "activation"):
        return [Step(f"N={n}", {"quick": True, "widths": [n]}) for n in bench_norm.QUICK_WIDTHS]
    if suite == "generate":
        return [Step("quick", {"quick": True})]
    raise ValueError(f"no steps for suite {suite!r}")


# --------------------------------------------------------------------------- the steps (subprocesses)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# distribution -> the module it installs, for the preflight; and the stages that cannot run without it
IMPORT_NAMES = {"pytest-xdist": "xdist"}
NEEDED_BY = {"pytest": ("tests",), "triton": ("precompile",)}


def _python_include() -> str:
    """Where Triton looks for ``Python.h`` when it builds its launcher (triton/runtime/build.py)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


def preflight(find_spec=importlib.util.find_spec, which=shutil.which, environ=os.environ,
              include_dir: str | None = None) -> list[str]:
    """One line for each thing the check needs that is missing here: a package (PACKAGES) that is not
    installed, a C compiler (``$CC``, gcc or clang) and ``Python.h``, which Triton 3.6 needs to build the
    launcher of every kernel. Empty when nothing is missing. The arguments are for tests."""
    problems = []
    for dist in PACKAGES:
        if find_spec(IMPORT_NAMES.get(dist, dist).replace("-", "_")) is None:
            problems.append(f"package {dist} is not installed (pip install {dist})")
    if not (environ.get("CC") or which("gcc") or which("clang")):
        problems.append("no C compiler (gcc or clang on PATH, or $CC): Triton builds each kernel's launcher with "
                        "one, so no Triton kernel can launch (apt-get install gcc)")
    include_dir = include_dir or _python_include()
    if not os.path.exists(os.path.join(include_dir, "Python.h")):
        problems.append(f"no Python.h in {include_dir}: Triton builds each kernel's launcher against it, so no "
                        f"Triton kernel can launch (apt-get install python{sys.version_info.major}."
                        f"{sys.version_info.minor}-dev, or a Python that ships its headers)")
    return problems


def blocked_stages(problems: list[str]) -> dict[str, str]:
    """Stage -> the preflight line that keeps it from running (the other stages run regardless)."""
    out = {}
    for dist, stages in NEEDED_BY.items():
        line = next((p for p in problems if p.startswith(f"package {dist} ")), None)
        if line:
            out.update({stage: line for stage in stages})
    return out


def _nvidia_smi() -> dict:
    """Driver, clocks, power limit and temperature as nvidia-smi reports them (read only, nothing set)."""
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "temperature.gpu", "pstate")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return dict(zip(fields, (v.strip() for v in out.splitlines()[0].split(","))))


def measure_ceilings(cuda: bool) -> dict:
    """The copy bandwidth and matmul rate of this device, measured now on random data.

    GPU: a device-to-device copy of 512 MiB of bf16 (far past L2), bytes = read + written, and an
    8192^3 bf16 matmul (``bench.e2e_train.measured_bf16_peak_tflops``, the ceiling MFU is taken over).
    CPU (dry run): 32 MiB of fp32 and a 512^3 fp32 matmul, which only check the code.
    """
    import torch

    from bench.common import time_ms

    device, dtype, n = ("cuda", torch.bfloat16, 2**28) if cuda else ("cpu", torch.float32, 2**23)
    src = torch.randn(n, device=device).to(dtype)  # (n,)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    out = {"copy_bytes": nbytes, "copy_ms": ms, "copy_GBps": nbytes / ms / 1e6}
    if cuda:
        from bench.e2e_train import measured_bf16_peak_tflops

        out.update(matmul="bf16 8192^3", matmul_TFLOPs=measured_bf16_peak_tflops(8192))
    else:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        out.update(matmul="fp32 512^3", matmul_TFLOPs=2 * 512**3 / time_ms(lambda: a @ b) / 1e9)
    return out


def environment() -> dict:
    """The machine, versions and ceilings (the ``env`` stage)."""
    import torch

    from bench.common import machine_info

    info = machine_info()
    info["packages"] = {p: _version(p) for p in PACKAGES}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["multiprocessors"] = props.multi_processor_count
        info["l2_cache_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
        info["cudnn"] = torch.backends.cudnn.version()
        info["nvidia_smi"] = _nvidia_smi()
        info["driver"] = info["nvidia_smi"].get("driver_version")
    info["ceilings"] = measure_ceilings(torch.cuda.is_available())
    return info


def _print_rows(rows: list[dict]) -> None:
    from bench.common import format_table

    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
        print(format_table(rows, cols), flush=True)


def run_step(stage: str, kwargs: dict, result_path: Path) -> int:
    """In the subprocess: run the env stage or one suite step and write ``{rows | env, error}`` as JSON."""
    result: dict = {"error": None}
    try:
        if stage == "env":
            result["env"] = environment()
            print(json.dumps(result["env"], indent=1, default=str), flush=True)
        else:
            from bench.__main__ import SUITES as MODULES

            rows = importlib.import_module(MODULES[stage][0]).run(**kwargs)
            result["rows"] = rows
            _print_rows(rows)
    except Exception as e:  # recorded in the step's outcome; the parent goes on with the next step
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        result["error"] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    Path(result_path).write_text(json.dumps(result, default=str))
    return 1 if result["error"] else 0


# ------------------------------------------------------------------------------------------ the parent


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's whole process group (pytest's xdist workers, torch.compile's compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_subprocess(cmd: list[str], log: Path, timeout: float, env: dict,
                   interrupt: bool = False) -> tuple[int | None, float, bool]:
    """Run ``cmd`` in its own process group, output appended to ``log``: (exit code, None if killed;
    seconds; whether it reached its limit). With ``interrupt``, SIGINT comes INTERRUPT_GRACE_S before the
    limit (pytest then reports what ran) and SIGKILL at the limit; without, SIGKILL at the limit."""
    t0 = time.monotonic()
    rc: int | None = None
    timed_out = False
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (INTERRUPT_GRACE_S if interrupt else 0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            if interrupt:
                proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(timeout=INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
        _kill_group(proc)  # also after a clean exit: no stray worker may hold the GPU for the next step
    return rc, time.monotonic() - t0, timed_out


def _log_tail(log: Path, start: int, lines: int = 3) -> str:
    """The last ``lines`` non-empty lines written to ``log`` after byte ``start``."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])


def parse_junit(path: Path) -> dict:
    """Counts, failures (test id and first line of the message) and the slowest tests of a JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, durations = [], []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        durations.append((float(case.get("time", 0) or 0), test_id))
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                failed.append({"test": test_id, "kind": tag, "message": msg[0][:300] if msg else ""})
    slowest = [{"test": t, "seconds": round(s, 1)} for s, t in sorted(durations, reverse=True)[:10]]
    return {**counts, "failed": failed, "slowest": slowest}


def _counts_from_log(text: str) -> dict:
    """pytest's closing counts read off its output, when no JUnit file was written (killed)."""
    names = {"passed": "passed", "failed": "failures", "error": "errors", "errors": "errors", "skipped": "skipped"}
    return {names[k]: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)\b", text)}


def _headline(suite: str, rows: list[dict]) -> str:
    """A few figures of a suite for the summary table (details are in its JSON)."""
    try:
        return _HEADLINES[suite]([r for r in rows if not r.get("error")])
    except Exception as e:  # the summary must never fail over a figure
        return f"(no headline: {type(e).__name__})"


def _ratio(x, y) -> str:
    return f"x{x / y:.2f}" if x and y else "-"


def _attention_headline(rows) -> str:
    by = {(r["provider"], r["pass"], r["T"]): r.get("TFLOP/s") for r in rows
          if "TFLOP/s" in r and r["pass"] != "decode"}
    base = "sdpa-flash" if any(p == "sdpa-flash" for p, _, _ in by) else "sdpa-math"
    parts = []
    for provider, ps, t in by:
        if provider == "triton":
            ours = by[(provider, ps, t)]
            parts.append(f"{ps} T={t}: {ours or 0:.0f} TFLOP/s {_ratio(ours, by.get((base, ps, t)))}")
    return f"ours vs {base}: " + "; ".join(parts)


def _e2e_headline(rows) -> str:
    tps = {r["impl"]: r["tokens_per_s"] for r in rows}
    parts = [f"{k} {v:,.0f} tok/s" for k, v in tps.items()]
    if "ours" in tps:
        parts += [f"ours/{b} {_ratio(tps['ours'], tps[b])}" for b in ("compile-torch", "eager-torch") if b in tps]
    return ", ".join(parts)


def _ce_headline(rows) -> str:
    parts = []
    for r in rows:
        if r["method"].startswith("fused"):
            parts.append(f"N={r['N']} fused time x{r.get('time vs base') or 0:.2f} of F.cross_entropy")
        if r["method"].startswith("chunked"):
            mem = r.get("mem base/ours")
            parts.append(f"chunked time x{r.get('time vs base') or 0:.2f}"
                         + (f", {mem:.1f}x less memory" if mem else ""))
    return "; ".join(parts)


def _sweep_headline(rows) -> str:
    ours = [r for r in rows if r["provider"] == "triton" and r["pass"] == "fwd+bwd" and r.get("% of copy")]
    return "; ".join(f"{r['op']} N={r['N']}: {r['% of copy']:.0f}% of copy, x{r.get('x torch') or 0:.2f} torch"
                     for r in ours)


def _generate_headline(rows) -> str:
    return "; ".join(f"{r['case']} {r['impl']}: {r['tokens_per_s']:.0f} tok/s"
                     + (f" (x{r['speedup']:.1f})" if r.get("speedup") and r["impl"] == "kv cache" else "")
                     for r in rows)


_HEADLINES = {"attention": _attention_headline, "e2e_train": _e2e_headline, "cross_entropy": _ce_headline,
              "norm": _sweep_headline, "activation": _sweep_headline, "generate": _generate_headline}


class Check:
    """Runs the stages in order within the budget, writing the results files as each step ends."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, workers: int | None = None, tune_s: float = 0):
        self.out, self.dry_run, self.budget_s, self.tune_s = out, dry_run, budget_s, tune_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s - SUMMARY_RESERVE_S - tune_s  # the last tune_s are the tuning's
        self.tune: dict = {}
        self.scale = budget_s / DEFAULT_BUDGET_S  # a dry run's caps are 1.7x: a busy CI machine must not cut it
        self.workers = workers
        self.n_steps = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.stem = f"unknown-{datetime.date.today().isoformat()}"  # <machine>-<date> once env names it
        self.env_info: dict = {}
        self.outcomes: dict[str, Outcome] = {}
        self.problems: list[str] = []  # the preflight's lines
        self.blocked: dict[str, str] = {}  # stage -> why it cannot run here
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / f"{self.stem}-gpu-check.log"
        self.log.write_text(f"bench.gpu_check {'--dry-run ' if dry_run else ''}budget {budget_s:.0f} s\n")

    # -- bookkeeping

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, stage: str) -> float:
        return CAPS_S[stage] * self.scale

    def env(self, tests: bool = False) -> dict:
        """The environment of a subprocess: the repo importable; for the tests, the autotune switch; for a
        dry run's other steps, the interpreter and the Triton backend (the path CUDA tensors take)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        if tests:
            env["GPT_KERNELS_AUTOTUNE"] = "first"
        elif self.dry_run:
            env.update(TRITON_INTERPRET="1", GPT_KERNELS="triton")
        return env

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f} s] {text}", flush=True)

    def _header(self, title: str) -> int:
        with open(self.log, "a") as f:
            f.write(f"\n===== {title} =====\n")
        return self.log.stat().st_size

    def _write_json(self, path: Path, payload: dict) -> None:
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)

    def write_check(self) -> None:
        self._write_json(self.out / f"{self.stem}-gpu-check.json", {
            "check": "bench.gpu_check" + (" --dry-run" if self.dry_run else ""),
            "budget_s": self.budget_s, "elapsed_s": round(time.monotonic() - self.t0, 1),
            "env": self.env_info, "preflight": self.problems, **({"tune": self.tune} if self.tune else {}),
            "stages": {k: {"status": o.status, "seconds": round(o.seconds, 1), "error": o.error, **o.detail}
                       for k, o in self.outcomes.items()}})

    def _name_files(self, info: dict) -> None:
        """After the env stage: <machine>-<date>- before every file, the log's too."""
        from bench.common import machine_tag

        self.stem = f"{machine_tag(info)}-{info['date']}"
        log = self.out / f"{self.stem}-gpu-check.log"
        os.replace(self.log, log)
        self.log = log

    # -- one subprocess step

    def _step(self, stage: str, step: Step | None, timeout: float) -> tuple[Outcome, dict]:
        label = f"{stage} {step.label}" if step else stage
        start = self._header(f"{label} (limit {timeout:.0f} s)")
        self.n_steps += 1
        result_path = self.tmp / f"step-{self.n_steps}.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--step", stage, "--result", str(result_path),
               "--kwargs", json.dumps(step.kwargs if step else {})]
        rc, seconds, timed_out = run_subprocess(cmd, self.log, timeout, self.env())
        if timed_out:
            return Outcome("timeout", seconds, f"ran past its {timeout:.0f} s limit; killed"), {}
        if not result_path.exists():
            return Outcome("failed", seconds, f"exit code {rc}: {_log_tail(self.log, start)}"), {}
        result = json.loads(result_path.read_text())
        if result.get("error"):
            return Outcome("failed", seconds, result["error"]), result
        return Outcome("ok", seconds), result

    # -- the stages

    def run_env(self) -> None:
        outcome, result = self._step("env", None, min(self.cap("env"), self.left()))
        self.env_info = result.get("env", {})
        if self.env_info:
            self._name_files(self.env_info)
            e, c = self.env_info, self.env_info.get("ceilings", {})
            outcome.detail["headline"] = (
                f"{e.get('gpu') or e.get('cpu')}, driver {e.get('driver')}, torch {e.get('torch')}, "
                f"triton {e.get('triton')}; copy {c.get('copy_GBps', 0):,.0f} GB/s, "
                f"{c.get('matmul')} matmul {c.get('matmul_TFLOPs', 0):.4g} TFLOP/s")
        self.outcomes["env"] = outcome
        self.write_check()
        self.say(f"env {outcome.status} ({outcome.seconds:.0f} s) {outcome.detail.get('headline', outcome.error)}")

    def test_command(self, junit: Path) -> list[str]:
        # a dry run collects the GPU tests and skips them all: xdist's start-up would cost more than that
        workers = self.workers if self.workers is not None else (
            1 if self.dry_run else min(os.cpu_count() or 1, MAX_TEST_WORKERS))
        # on the GPU also the GPU user's path (autocast, torch.compile, the custom ops) on CUDA; the dry run
        # leaves those out: the CPU suite runs them under the interpreter already
        marks = "gpu" if self.dry_run else "gpu or gpu_path"
        # a test file that cannot be imported here (a missing package) is reported; the others still run
        cmd = [sys.executable, "-m", "pytest", "-m", marks, "-q", "-rfE", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", "--durations=10"]
        xdist = _version("pytest-xdist")
        if workers > 1 and xdist:  # without pytest-xdist: one process, and the cap decides how far it gets
            cmd += ["-n", str(workers)]
            if tuple(int(x) for x in re.findall(r"\d+", xdist)[:2]) >= (3, 2):
                cmd += ["--dist", "worksteal"]  # compile-heavy tests vary a lot in length
        return cmd

    def _skip(self, stage: str, timeout: float) -> bool:
        """Record ``stage`` as skipped (and say so) if the preflight blocks it or too little time is left."""
        why = self.blocked.get(stage) or ("no time left" if timeout < MIN_STEP_S else None)
        if why:
            self.outcomes[stage] = Outcome("skipped", 0.0, why)
            self.say(f"{stage} skipped: {why}")
        return why is not None

    def run_precompile(self) -> None:
        """``python -m gpt_kernels.precompile`` over the suites' workloads (the dry run: plans them only)."""
        timeout = min(self.cap("precompile"), self.left())
        if self._skip("precompile", timeout):
            return
        report = self.tmp / "precompile.json"
        # the dry run plans one cheap suite for sm_90 on the CPU: the path, not the GPU's list
        workload = "bench.workloads:norm" if self.dry_run else PRECOMPILE_WORKLOAD
        cmd = [sys.executable, "-m", "gpt_kernels.precompile", workload, "--json", str(report),
               *(["--plan-only", "--capability", "90"] if self.dry_run else [])]
        env = {k: v for k, v in self.env().items() if k not in ("TRITON_INTERPRET", "GPT_KERNELS")}
        start = self._header(f"precompile: {' '.join(cmd[1:])} (limit {timeout:.0f} s)")
        rc, seconds, timed_out = run_subprocess(cmd, self.log, timeout, env)
        got = json.loads(report.read_text()) if report.exists() else {}
        detail = {k: got[k] for k in ("compiles", "launched", "plan_s", "compile_s", "workers", "by_kernel")
                  if k in got}
        detail["headline"] = (f"{got.get('compiles', '?')} kernels {'planned' if self.dry_run else 'compiled'}"
                              + (f" in {got['compile_s']} s on {got['workers']} processes (plan {got['plan_s']} s)"
                                 if "compile_s" in got else ""))
        if timed_out:
            outcome = Outcome("timeout", seconds, f"ran past its {timeout:.0f} s limit; killed", detail)
        elif rc != 0 or not got:
            errors = got.get("errors") or []
            why = f"{len(errors)} kernels failed to compile, e.g. {errors[0]['error']}" if errors else (
                f"exit code {rc}: {_log_tail(self.log, start)}")
            outcome = Outcome("failed", seconds, why, detail)
        else:
            outcome = Outcome("ok", seconds, None, detail)
        self.outcomes["precompile"] = outcome
        self.write_check()
        self.say(f"precompile {outcome.status} ({seconds:.0f} s) {detail['headline']}")

    def run_tests(self) -> None:
        timeout = min(self.cap("tests"), self.left())
        if self._skip("tests", timeout):
            return
        junit = self.tmp / "junit.xml"
        cmd = self.test_command(junit)
        start = self._header(f"tests: {' '.join(cmd[1:])} (GPT_KERNELS_AUTOTUNE=first, limit {timeout:.0f} s)")
        rc, seconds, timed_out = run_subprocess(cmd, self.log, timeout, self.env(tests=True), interrupt=True)
        if junit.exists():
            detail = parse_junit(junit)
        else:
            with open(self.log, "rb") as f:
                f.seek(start)
                detail = _counts_from_log(f.read().decode(errors="replace"))
        detail["command"] = " ".join(cmd[1:]).replace(str(junit), "JUNIT")
        detail["headline"] = (f"{detail.get('passed', 0)} passed, {detail.get('failures', 0)} failed, "
                              f"{detail.get('errors', 0)} errors, {detail.get('skipped', 0)} skipped")
        if timed_out:
            outcome = Outcome("timeout", seconds, f"stopped at its {timeout:.0f} s limit: results so far", detail)
        elif rc == 0:
            outcome = Outcome("ok", seconds, None, detail)
        elif rc == 1:
            outcome = Outcome("failed", seconds, f"{len(detail.get('failed', []))} tests failed", detail)
        else:
            outcome = Outcome("failed", seconds, f"pytest exit code {rc}: {_log_tail(self.log, start)}", detail)
        self.outcomes["tests"] = outcome
        self.write_check()
        self.say(f"tests {outcome.status} ({seconds:.0f} s) {detail['headline']}")

    def run_suite(self, suite: str, steps: list[Step]) -> None:
        stage_end = time.monotonic() + self.cap(suite)
        rows: list[dict] = []
        done: list[dict] = []
        for step in steps:
            timeout = min(stage_end - time.monotonic(), self.left())
            if timeout < MIN_STEP_S:
                done.append({"step": step.label, "status": "skipped", "error": "no time left"})
                continue
            outcome, result = self._step(suite, step, timeout)
            step_rows = result.get("rows") or []
            rows += [dict(r, step=step.label) for r in step_rows]
            errors = [r["error"] for r in step_rows if r.get("error")]
            if outcome.status == "ok" and errors:
                outcome = Outcome("errors", outcome.seconds, f"{len(errors)} rows failed, e.g. {errors[0]}")
            done.append({"step": step.label, "status": outcome.status, "seconds": round(outcome.seconds, 1),
                         "error": outcome.error})
            self._write_suite(suite, rows, done)
            self.say(f"{suite} {step.label}: {outcome.status} ({outcome.seconds:.0f} s)"
                     + (f" {outcome.error}" if outcome.error else ""))
        statuses = [d["status"] for d in done]
        status = "ok" if all(s == "ok" for s in statuses) else next(
            s for s in ("timeout", "failed", "errors", "skipped") if s in statuses)
        errors = [f"{d['step']}: {d['error']}" for d in done if d.get("error")]
        self.outcomes[suite] = Outcome(status, sum(d.get("seconds", 0) for d in done), "; ".join(errors) or None,
                                       {"steps": done, "headline": _headline(suite, rows)})
        self._write_suite(suite, rows, done)
        self.write_check()

    def _write_suite(self, suite: str, rows: list[dict], steps: list[dict]) -> None:
        self._write_json(self.out / f"{self.stem}-{suite}.json", {
            "suite": suite, "machine": self.env_info, "rows": rows, "steps": steps,
            "source": "bench.gpu_check" + (" --dry-run (CPU smoke shapes: not a measurement)" if self.dry_run
                                           else " (each suite's --quick form)")})

    def run_tune(self, extra_args: tuple[str, ...] = ()) -> None:
        """``python -m bench.tune`` in the time left, its results kept in the check JSON (no ninth file)."""
        self.deadline += self.tune_s
        timeout = self.left()
        if timeout < MIN_STEP_S + TUNE_MARGIN_S:
            self.outcomes["tune"] = Outcome("skipped", 0.0, "no time left")
            return
        out = self.tmp / "tune"
        cmd = [sys.executable, "-m", "bench.tune", "--out", str(out), "--budget", f"{timeout - TUNE_MARGIN_S:.0f}",
               *(["--dry-run"] if self.dry_run else []), *extra_args]
        self._header(f"tune: {' '.join(cmd[1:])} (limit {timeout:.0f} s)")
        rc, seconds, timed_out = run_subprocess(cmd, self.log, timeout, self.env())
        saved = next(out.glob("*-tune.json"), None)
        self.tune = json.loads(saved.read_text()) if saved else {}
        keep = [f"{s['kernel']} {s['config']}" for s in self.tune.get("summary", []) if s["within 3%"]]
        detail = {"headline": f"{len(self.tune.get('rows', []))} configs timed at {len(self.tune.get('done', []))} "
                              f"shapes; within 3% somewhere: {', '.join(keep) or '-'}"}
        if timed_out:
            outcome = Outcome("timeout", seconds, f"ran past its {timeout:.0f} s limit: results so far", detail)
        elif rc != 0 or not saved:
            outcome = Outcome("failed", seconds, f"bench.tune exit code {rc}", detail)
        else:
            errors = [r for r in self.tune.get("rows", []) if r.get("error")]
            outcome = Outcome("errors" if errors else "ok", seconds,
                              f"{len(errors)} configs failed, e.g. {errors[0]['error']}" if errors else None, detail)
        self.outcomes["tune"] = outcome
        self.write_check()
        self.say(f"tune {outcome.status} ({seconds:.0f} s) {detail['headline']}")

    # -- the summary

    def summary(self) -> str:
        text = [f"preflight: {line}" for line in self.problems] + ([""] if self.problems else [])
        text += [f"{'stage':<14}{'status':<9}{'s':>5}  result", "-" * 100]
        text += [f"{k:<14}{o.status:<9}{o.seconds:>5.0f}  {(o.detail.get('headline') or o.error or '')[:160]}"
                 for k, o in self.outcomes.items()]
        failed = self.outcomes.get("tests", Outcome("skipped")).detail.get("failed", [])
        if failed:
            text.append(f"\nfailed tests ({len(failed)}):")
            text += [f"  {f['test']}: {f['message'][:160]}" for f in failed[:15]]
        problems = [(k, o.error) for k, o in self.outcomes.items() if o.error and k != "tests"]
        if problems:
            text.append("\nproblems:")
            text += [f"  {k}: {e[:300]}" for k, e in problems]
        text.append(f"\nfiles in {self.out}: " + ", ".join(sorted(p.name for p in self.out.iterdir())))
        text.append(f"total {time.monotonic() - self.t0:.0f} s of a {self.budget_s:.0f} s budget")
        return "\n".join(text)

    def run(self, only: tuple[str, ...] = STAGES) -> int:
        self.say(f"bench.gpu_check{' --dry-run' if self.dry_run else ''}: budget {self.budget_s:.0f} s, "
                 f"results in {self.out}")
        self.problems = preflight()
        self.blocked = blocked_stages(self.problems)
        for line in self.problems:
            self.say(f"preflight: {line}")
        self.run_env()  # always: it names the files
        if "precompile" in only:
            self.run_precompile()
        if "tests" in only:
            self.run_tests()
        for suite in SUITES:
            if suite in only:
                self.run_suite(suite, suite_steps(suite, self.dry_run))
        if self.tune_s:
            self.run_tune()
        self.write_check()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print("\n" + self.summary(), flush=True)
        return 0 if all(o.status == "ok" for o in self.outcomes.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:5]))
    p.add_argument("--out", help="results directory (at most 8 files, written as they come)")
    p.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU: tiny shapes, interpreter")
    p.add_argument("--budget", type=float, help=f"seconds for everything (default {DEFAULT_BUDGET_S}; "
                                                f"dry run {DRY_RUN_BUDGET_S}); stage caps scale with it")
    p.add_argument("--only", nargs="+", choices=STAGES[1:], help="run only these stages (env always runs)")
    p.add_argument("--test-workers", type=int, help="pytest-xdist workers (default: the cores, at most 16)")
    p.add_argument("--tune", type=float, default=0, metavar="S",
                   help="spend the budget's last S seconds on python -m bench.tune (results in the check JSON)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this (sub)process
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return run_step(args.step, json.loads(args.kwargs), Path(args.result))
    if not args.out:
        p.error("--out DIR is required")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench.gpu_check: no CUDA GPU here. On a GPU machine run it as it is; here, "
                  "`python -m bench.gpu_check --dry-run --out DIR` runs the same pipeline on the CPU.",
                  file=sys.stderr)
            return 2
    budget = args.budget or (DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    if args.tune and args.tune > budget / 2:
        p.error(f"--tune {args.tune:.0f} would take more than half of the {budget:.0f} s budget")
    check = Check(Path(args.out), args.dry_run, budget, args.test_workers, args.tune)
    return check.run(tuple(args.only) if args.only else STAGES)


if __name__ == "__main__":
    raise SystemExit(main())
