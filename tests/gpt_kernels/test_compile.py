"""Every kernel configuration a launcher or autotuner can pick compiles for every target it runs on, unspilled and
within the target's shared memory per program; and the claims the check's shortcuts rest on hold.

The compile runs once per session in a subprocess without TRITON_INTERPRET (the interpreter has nothing to
compile): the ``compile_report`` fixture of tests/gpt_kernels/conftest.py, shared with test_sass.py. Which
variants the model and the benchmarks launch, and that each is among the cases, is tests/gpt/test_kernel_coverage.py.

The shortcuts, each checked here on the configurations where it could matter most (the most registers):

- sm_86 and sm_89 are not compiled by default: Triton generates the same TTGIR for them as for sm_80 (so the
  same shared memory; compile_check.SHARES_TTGIR_WITH), and their rows are sm_80's held to their limits;
- compile_check.stand_in: fp16 compiles as bf16 (the same registers and shared memory), attention's head dim 96
  as 80 (likewise), head dims 16 and 32 as 64 (no more registers or shared memory).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gpt_kernels.compile_check import ARCHS, collect_cases


def _case_ids():
    return [(c.name, f"sm_{cap}") for c in collect_cases() for cap in ARCHS if cap in c.archs]


@pytest.mark.parametrize("key", _case_ids(), ids=lambda k: f"{k[0]}-{k[1]}")
def test_compiles_unspilled_within_shared_memory(compile_report, key):
    row = compile_report.by_key[key]
    assert row["error"] is None, f"{key[0]} failed to compile for {key[1]}: {row['error']}"
    assert not compile_report.problems.get(key), "\n".join(compile_report.problems[key])


def test_every_target_is_checked(compile_report):
    """Each target has rows; sm_86 and sm_89 are sm_80's compile; an over-the-limit candidate is pruned only where
    another candidate of its launch fits (the consumer GPUs' 99 KB against an A100's 163 KB)."""
    archs = {r["arch"] for r in compile_report.all}
    assert archs == {f"sm_{cap}" for cap in ARCHS}
    derived = [r for r in compile_report.all if r["arch"] in ("sm_86", "sm_89")]
    assert derived and all(r["from"] == "sm_80" for r in derived)
    assert all(r["smem_limit"] == 101376 for r in derived)
    pruned = [r for r in compile_report.all if not r["error"] and not r["smem_ok"]]
    assert all(r["group"] for r in pruned), "a kernel that is not autotuned must fit every target"


CLAIMS = textwrap.dedent("""
    import copy, json, re, sys
    from gpt_kernels import compile_check as cc

    rows = json.load(open(sys.argv[1]))
    cases = {c.name: c for c in cc.collect_cases()}
    out = {"ttgir": [], "stand_in": []}

    def heaviest(arch, pick, n):
        found = [r for r in rows if r["arch"] == arch and not r["error"] and pick(r)]
        return [cases[r["name"]] for r in sorted(found, key=lambda r: -r["registers"])[:n]]

    # sm_86 and sm_89 get sm_80's TTGIR
    for case in heaviest("sm_80", lambda r: r["kernel"].startswith("_attn"), 2) + heaviest(
            "sm_80", lambda r: r["kernel"] == "_layer_norm_bwd_kernel", 1):
        base = cc.compile_one(case, 80, keep_ttgir=True)
        for cap in (86, 89):
            other = cc.compile_one(case, cap, keep_ttgir=True)
            same = re.sub(r"cuda:\\d+", "", base["ttgir"]) == re.sub(r"cuda:\\d+", "", other["ttgir"])
            out["ttgir"].append([case.name, cap, same, base["shared_bytes"], other["shared_bytes"],
                                 other["spill_bytes"] + other["stack_bytes"]])

    def variant(case, fp16=False, **consts):
        v = copy.deepcopy(case)
        if fp16:
            v.signature = {k: t.replace("bf16", "fp16") for k, t in v.signature.items()}
        v.constexprs.update(consts)
        return v

    for cap, arch in ((90, "sm_90"), (80, "sm_80")):
        claims = [(c, variant(c, fp16=True), "fp16") for c in heaviest(arch, lambda r: "bf16" in r["label"], 2)]
        claims += [(c, variant(c, HEAD_DIM=96), "96") for c in heaviest(arch, lambda r: " D=80 " in r["label"], 2)]
        claims += [(c, variant(c, HEAD_DIM=d, BLOCK_D=d), str(d)) for d in (16, 32)
                   for c in heaviest(arch, lambda r: " D=64 " in r["label"], 1)]
        for case, v, what in claims:
            a, b = cc.compile_one(case, cap), cc.compile_one(v, cap)
            out["stand_in"].append([case.name, arch, what, a["registers"], b["registers"], a["shared_bytes"],
                                    b["shared_bytes"], b["spill_bytes"] + b["stack_bytes"], b["error"]])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def claims(compile_report, tmp_path_factory):
    path = tmp_path_factory.mktemp("claims") / "rows.json"
    path.write_text(json.dumps(compile_report.all))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CLAIMS, str(path)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sm86_and_sm89_get_sm80s_code(claims):
    """The same TTGIR (so the same shared memory) on the heaviest attention configs and a LayerNorm backward,
    and no spills when ptxas compiles them for sm_86 and sm_89 themselves."""
    assert len(claims["ttgir"]) == 6
    for name, cap, same, smem80, smem, spills in claims["ttgir"]:
        assert same, f"{name}: sm_{cap}'s TTGIR differs from sm_80's"
        assert smem == smem80 and spills == 0, (name, cap, smem80, smem, spills)


def test_the_stand_ins_cost_no_less_than_what_they_stand_for(claims):
    """fp16 and head dim 96 compile to exactly the registers and shared memory of bf16 and head dim 80; head dims
    16 and 32 to no more than 64; on the configs with the most registers, on sm_90 and sm_80."""
    assert len(claims["stand_in"]) == 12  # sm_90 and sm_80: 2 fp16, 2 head dim 96, head dims 16 and 32
    for name, arch, what, regs, regs_v, smem, smem_v, spills, error in claims["stand_in"]:
        assert error is None and spills == 0, (name, arch, what, error, spills)
        if what in ("fp16", "96"):
            assert (regs_v, smem_v) == (regs, smem), (name, arch, what, regs, regs_v, smem, smem_v)
        else:
            assert regs_v <= regs and smem_v <= smem, (name, arch, what, regs, regs_v, smem, smem_v)


def test_only_the_listed_old_triton_spills_are_accepted():
    """OLD_TRITON_SPILLS waives exactly its (kernel, label, arch) at Triton < 3.7, up to its bytes; any other spill
    (another case, more bytes, a spill at 3.7+) is a problem."""
    from gpt_kernels.compile_check import OLD_TRITON_SPILLS, known_old_spill, problems

    (kernel, label, arch), limit = next(iter(OLD_TRITON_SPILLS.items()))
    row = {"name": f"{kernel}[{label}]", "kernel": kernel, "label": label, "arch": arch, "group": "", "error": None,
           "smem_ok": True, "spill_bytes": 0, "stack_bytes": limit, "registers": 72}
    assert known_old_spill(row, "3.6.0")
    assert bool(problems([row])) != known_old_spill(row)  # at the installed Triton: a problem unless waived
    assert not known_old_spill(row, "3.9.0")
    assert not known_old_spill({**row, "stack_bytes": limit + 8}, "3.6.0")
    assert not known_old_spill({**row, "label": label + " smooth"}, "3.6.0")
    assert not known_old_spill({**row, "spill_bytes": 4}, "3.6.0")
