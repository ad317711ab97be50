"""The compile check compiles every kernel variant the model and the benchmarks launch, seen, not assumed.

The model's presets (each width class: tiny, mini, GPT-2 small and XL) are planned through a training step in
each precision it trains in (bf16 and fp16 autocast, float32), an evaluation forward and generation with the
KV cache (bf16, float32; past 128 cached keys, so decoding splits the keys), and the GPU check's benchmark
workloads (bench/workloads.py) likewise, for a GPU of each config family (sm_90 and sm_80), and what a GPU
runs by default for sm_100 too (the newer targets get those variants: compile_check.PRIMARY). Planning
(gpt_kernels.precompile) runs the launchers for real and has Triton's JIT specialize each launch as on that
GPU, without running it. Every launch's variant (kernel, pointer types, constexprs, the alignment of its
pointers and strides, warps, stages; compile_check.variant_key) must be a compile check case for that
target marked launched (the cases CI's oldest-Triton stage compiles, --launched-only), or one its stand_in rules
map onto such a case. In a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from bench import workloads
    from gpt import GPT, generate
    from gpt_kernels import compile_check as cc, precompile

    AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def model(preset, **kw):
        torch.manual_seed(0)
        return GPT.from_preset(preset, kernel_backend="triton", n_layers=1, **kw)

    def train(preset, mode, pad=64):
        def run():
            m = model(preset, context_length=32, pad_vocab_multiple=pad).train()
            x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
            with torch.autocast("cpu", dtype=AMP.get(mode, torch.bfloat16), enabled=mode in AMP):
                _, loss = m(x, y)
            loss.backward()
        return f"{preset} train {mode} pad {pad}", run

    def evaluate(preset):
        def run():
            m = model(preset, context_length=32, pad_vocab_multiple=64).eval()
            x = torch.randint(0, 50257, (2, 32))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                m(x, x)
        return f"{preset} eval", run

    def gen(preset, dtype):
        def run():
            m = model(preset, context_length=160, dropout=0.0).to(dtype).eval()
            generate(m, torch.randint(0, 50257, (2, 140)), 2)
        return f"{preset} generate {dtype}", run

    # (name, run, the targets it is checked for): every run on sm_90 and sm_80 (the two config families); what a
    # GPU runs by default (bf16 autocast GPT-2, bf16 generation, the benchmarks) on sm_100 too
    ALL, DEFAULT = (90, 80), (90, 80, 100)
    runs = [(*train("gpt2-small", "bf16"), DEFAULT), (*train("gpt2-xl", "bf16"), DEFAULT),
            (*evaluate("gpt2-small"), DEFAULT), (*gen("gpt2-small", torch.bfloat16), DEFAULT)]
    runs += [(*train(p, "bf16"), ALL) for p in ("tiny", "mini")]
    runs += [(*train("gpt2-small", "fp16"), ALL), (*train("gpt2-small", "fp32"), ALL),
             (*train("gpt2-small", "bf16", pad=1), ALL), (*gen("gpt2-small", torch.float32), ALL)]
    runs += [(f"bench {name}", fn, DEFAULT) for name, fn in workloads.SUITES.items()
             if name not in ("e2e_train", "generate")]  # those two: the gpt2-small runs above
    cases = cc.select_cases(launched_only=True)  # marked launched: what CI compiles at the oldest Triton too
    compiled = {cap: {cc.case_key(c) for c in cases if cap in c.archs} for cap in (90, 80, 100)}
    out = {str(cap): {} for cap in compiled}
    for name, run, caps in runs:
        for cap in caps:
            for r in precompile.plan(run, capability=cap).compiles():
                key = cc.request_key(r.module, r.kernel, r.data)
                if key not in compiled[cap]:
                    out[str(cap)].setdefault(repr(key), []).append(name)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def missing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", ["90", "80", "100"])
def test_every_variant_the_model_and_benchmarks_launch_is_compiled(missing, cap):
    gaps = missing[cap]
    assert not gaps, f"launched on sm_{cap} but not in the compile check ({len(gaps)}):\n" + "\n".join(
        f"{key}\n    by {', '.join(sorted(set(by)))}" for key, by in gaps.items())
