"""Which configs the attention autotuner weighs: exactly those of its table that serve the inputs, each once.

The tables (flash_attention.FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS, BWD_ATOMIC_CONFIGS, SPLITK_CONFIGS) list
a launch (BLOCK_M, BLOCK_N, warps, stages) once per set of inputs it was checked for; one launch may be
listed twice (dK/dV's 32x128 tile, for D = 64 and for D = 128). The autotuner's ``early_config_prune`` is
called here as Triton calls it, on the autotuner the launches use; its answer is compared with what the
tables say, read field by field, for every kernel, padded head dim, dropout setting, dtype and GPU family.

Shared memory: a consumer Ampere/Ada GPU (sm_86, sm_89) gives a program 99 KB where an A100 gives 163 KB.
The pruning holds each candidate's compiled shared memory (on a GPU: read from the compiled kernel) to
the GPU's limit; here it is fed the compile check's measured numbers (tests/gpt_kernels/conftest.py).
"""

import pytest
import torch

from gpt_kernels import common
from gpt_kernels import flash_attention as fa

KERNELS = ("fwd", "dkdv", "dq", "bwd_atomic", "splitk")
TABLES = {"fwd": "FWD_CONFIGS", "dkdv": "DKDV_CONFIGS", "dq": "DQ_CONFIGS", "bwd_atomic": "BWD_ATOMIC_CONFIGS",
          "splitk": "SPLITK_CONFIGS"}
LONG = 1 << 16  # a length every tile fits


def _launch(tc) -> tuple:
    return (tc.kwargs["BLOCK_M"], tc.kwargs["BLOCK_N"], tc.num_warps, tc.num_stages)


def _prune(name, D, dropout, dtype, length=LONG):
    """The autotuner's pruning of kernel ``name``, called as Triton calls it: its configs, the launch's args."""
    tuner = fa._autotuned(name)
    q = torch.empty(1, 1, 1, D, dtype=dtype)
    args = {"Q": q, "HEAD_DIM": D, "BLOCK_D": fa._head_dims(D)["BLOCK_D"], "DROPOUT": dropout, "TQ_KEY": length,
            "TK_KEY": length}
    return [_launch(tc) for tc in tuner.early_config_prune(tuner.configs, {}, **args)]


def _from_table(name, D, dropout, fp32, arch, length=None) -> set:
    """The launches the table lists for these inputs, read from its fields; with ``length``, those whose
    program tile fits it (at least min(64, length): no tiny tiles when a 64 fits), else the smallest."""
    padded = max(64, 1 << (D - 1).bit_length())  # D <= 64 shares BLOCK_D 64's configs; 80, 96 use 128's
    served = [(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in getattr(fa, TABLES[name])
              if c.fp32 == fp32 and arch in c.archs and padded in (c.dropout_block_d if dropout else c.block_d)]
    if length is None or not served:
        return set(served)
    tile = 0 if name in ("fwd", "dq", "splitk") else 1  # the side a program owns: query rows, or keys for dK/dV
    fits = {launch for launch in served if min(64, length) <= launch[tile] <= length}
    return fits or {min(served, key=lambda launch: launch[tile])}  # the table's first of the smallest


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", KERNELS)
def test_pruning_keeps_exactly_the_configs_that_serve_the_inputs(monkeypatch, name, arch):
    monkeypatch.setattr(fa, "_arch_family", lambda device: arch)
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    tuner = fa._autotuned(name)
    listed = [_launch(tc) for tc in tuner.configs]
    assert len(set(listed)) == len(listed), f"{name}: the autotuner times a launch twice: {listed}"
    assert set(listed) == {c.launch for c in getattr(fa, TABLES[name])}
    weighed = set()
    for D in fa.SUPPORTED_HEAD_DIMS:
        for dropout in (False, True):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                if name == "bwd_atomic" and not _from_table(name, D, dropout, dtype == torch.float32, arch):
                    continue  # _backward runs the deterministic kernels there (_atomic_dq_served)
                for length in (16, 32, 64, 128, 1024):
                    want = _from_table(name, D, dropout, dtype == torch.float32, arch, length)
                    got = _prune(name, D, dropout, dtype, length)
                    where = f"{name} at D={D}, dropout={dropout}, {dtype}, sm_{arch}, length {length}"
                    assert len(set(got)) == len(got), f"{where}: {got} weighs a launch twice"
                    assert set(got) == want, f"{where}: the autotuner weighs {sorted(got)}, the table {sorted(want)}"
                    weighed |= set(got)
    # every launch the table lists for this family is weighed somewhere
    assert weighed == {c.launch for c in getattr(fa, TABLES[name]) if arch in c.archs}


def test_the_main_gpt2_backward_config_is_weighed_at_d64(monkeypatch):
    """Issue 22's defect 1: dK/dV's 32x128 tile, listed for D = 64 and again for D = 128, was looked up by
    its launch alone, so the D = 128 entry hid the D = 64 one: with dropout only 32x64 was left."""
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    for arch in (80, 90):
        monkeypatch.setattr(fa, "_arch_family", lambda device, arch=arch: arch)
        for dropout in (False, True):
            assert (32, 128, 8, 2) in _prune("dkdv", 64, dropout, torch.bfloat16, 1024), (arch, dropout)


def test_arch_families(monkeypatch):
    """The GPU families the configs were compiled and checked for: warp MMA (8.x, 12.x) and warpgroup MMA."""
    for cap, family in (((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 90), ((12, 0), 80)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, cap=cap: cap)
        assert fa._arch_family(torch.device("cuda", 0)) == family, cap
    assert fa._arch_family(torch.device("cpu")) == 90


def test_shared_memory_table():
    """Per program, opted in: an A100 163 KB, consumer Ampere/Ada/Blackwell 99 KB, Hopper 227 KB."""
    assert common.smem_per_block_for((8, 0)) == 163 * 1024
    assert common.smem_per_block_for((8, 6)) == common.smem_per_block_for((8, 9)) == 99 * 1024
    assert common.smem_per_block_for((12, 0)) == 99 * 1024
    assert common.smem_per_block_for((9, 0)) == 227 * 1024
    assert common.smem_per_block_for((13, 7)) == common.SMEM_UNKNOWN
    assert common.smem_per_block(torch.device("cpu")) is None


def _measured(compile_report, arch: str) -> dict:
    """(kernel name, padded D, fp32, dropout, launch) -> shared bytes, from the compile check's rows."""
    short = {"fwd": "fwd", "dkdv": "dkdv", "bwd-atomic": "bwd_atomic", "dq": "dq", "splitk": "splitk"}
    out = {}
    for r in compile_report.all:
        words = r["label"].split()
        if r["arch"] != arch or r["error"] or not words or words[0] not in short or "BLOCK_N" not in r["constexprs"]:
            continue
        if r["constexprs"].get("CAUSAL") == "False":  # the causal kernels' sizes (non-causal ones differ a little)
            continue
        c = r["constexprs"]
        launch = (int(c["BLOCK_M"]), int(c["BLOCK_N"]), r["num_warps"], r["num_stages"])
        out[(short[words[0]], int(words[1][2:]), words[2] == "fp32", "dropout" in words, launch)] = r["shared_bytes"]
    return out


@pytest.mark.parametrize("cap", [(8, 6), (8, 9), (8, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_pruning_drops_what_exceeds_the_gpus_shared_memory(compile_report, monkeypatch, cap):
    """On sm_86 / sm_89 (99 KB a program) the autotuner never weighs a config whose compiled kernel needs more
    (dQ at D = 128 with 64x64 tiles: ~104 KB); on an A100 (163 KB) it keeps them. The sizes are the compile
    check's, for the target itself where it compiles it, else for sm_80 (the same code: warp MMA, cp.async)."""
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    arch = f"sm_{cap[0]}{cap[1]}"
    sizes = _measured(compile_report, arch) or _measured(compile_report, "sm_80")
    limit = common.smem_per_block_for(cap)
    monkeypatch.setattr(fa, "_arch_family", lambda device: 80)
    monkeypatch.setattr(fa, "_smem_limit", lambda device: limit)
    dropped = []
    for name in KERNELS:
        for block_d in (64, 128):
            for dropout in (False, True):
                for fp32 in (False, True):
                    served = fa._served(name, block_d, dropout, fp32, 80)
                    if not served:
                        continue
                    size = {launch: sizes[(name, block_d, fp32, dropout, launch)] for launch in served}
                    monkeypatch.setattr(fa, "_smem_used", lambda kernel, launch, args, size=size: size[launch])
                    got = _prune(name, block_d, dropout, torch.float32 if fp32 else torch.bfloat16)
                    by_length = _from_table(name, block_d, dropout, fp32, 80, LONG)
                    fitting = [launch for launch in served if launch in by_length and size[launch] <= limit]
                    assert fitting, "the test wants a case where some config fits"
                    assert got == fitting, f"{name} D={block_d} dropout={dropout} fp32={fp32} on {arch}: {got}"
                    dropped += [(name, block_d, launch) for launch in served if size[launch] > limit]
    if cap == (8, 0):
        assert not dropped  # every family-80 config fits an A100
    else:
        assert ("dq", 128, (64, 64, 4, 3)) in dropped


def test_a_launch_through_the_autotuner_measures_with_the_kernels_arguments(monkeypatch, device):
    """As a GPU launch runs it: through Triton's autotuner, which hands the pruning the launch's arguments
    plus its own (grid, warmup). Each candidate's shared memory is read by compiling the kernel with exactly
    its arguments and compile options. (GPT_KERNELS_AUTOTUNE=first: one candidate, so no timing, which
    needs a GPU; the interpreter then runs it.)"""
    from gpt_kernels.common import LAUNCH_OPTIONS

    monkeypatch.setenv(fa.AUTOTUNE_ENV, "first")
    monkeypatch.setattr(fa, "interpreter_enabled", lambda: False)  # through the autotuner, not the fixed configs
    monkeypatch.setattr(fa, "_AUTOTUNED", {})
    monkeypatch.setattr(fa, "_smem_limit", lambda device: 100_000)
    measured = []

    def smem_used(kernel, launch, args):
        unknown = set(args) - set(kernel.arg_names) - set(LAUNCH_OPTIONS)
        assert not unknown, f"{kernel.fn.__name__} would be compiled with {sorted(unknown)}"
        measured.append((kernel.fn.__name__, launch))
        return 50_000

    monkeypatch.setattr(fa, "_smem_used", smem_used)
    # Triton 3.6's autotuner times even a lone candidate (3.9 skips it); timing needs a GPU, so here the
    # trial runs the candidate once and reports a time
    timed = []
    monkeypatch.setattr(fa._autotuned("fwd"), "_do_bench",
                        lambda call, quantiles: (call(), timed.append(1), [1.0] * len(quantiles))[-1])
    q, k, v = (torch.randn(1, 1, 64, 16, device=device) for _ in range(3))
    o, _ = fa._forward(q, k, v, True, 0.0, 0.25, None)
    assert [name for name, _ in measured] == ["_attn_fwd"]
    assert len(timed) <= 1  # one candidate: timed once at most, whatever the Triton version
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)


def test_no_config_fits_says_so(monkeypatch):
    monkeypatch.setattr(fa, "_smem_limit", lambda device: 1024)
    monkeypatch.setattr(fa, "_smem_used", lambda kernel, launch, args: 4096)
    with pytest.raises(RuntimeError, match="no dq kernel configuration.*shared memory.*GPT_KERNELS=torch"):
        _prune("dq", 64, False, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_pruning_reads_the_compiled_shared_memory(monkeypatch):
    """On a GPU the sizes come from the compiled kernels: told it has 99 KB a program (a consumer part), the
    dQ autotuner at D = 128 keeps exactly the served configs whose compiled kernel fits, and runs one."""
    monkeypatch.delenv(fa.AUTOTUNE_ENV, raising=False)
    limit = common.smem_per_block_for((8, 6))
    monkeypatch.setattr(fa, "_smem_limit", lambda device: limit)
    seen = {}
    real = fa._smem_used

    def measure(kernel, launch, args):
        seen[launch] = real(kernel, launch, args)
        return seen[launch]

    monkeypatch.setattr(fa, "_smem_used", measure)
    q, k, v = (torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    saved = dict(fa._AUTOTUNED)
    fa._AUTOTUNED.clear()  # fresh autotuners: they prune again, for this limit
    try:
        fa._attention(q, k, v, causal=True).sum().backward()
        kept = [launch for launch, used in seen.items() if used <= limit]
        assert seen and _launch(fa._autotuned("dq").best_config) in kept
    finally:
        fa._AUTOTUNED.clear()  # their choices were made for a smaller GPU: the others' again
        fa._AUTOTUNED.update(saved)
