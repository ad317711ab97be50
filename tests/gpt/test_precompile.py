"""A cold start compiles each kernel a training step launches once, and gpt_kernels.precompile compiles exactly those.

Without a GPU: the tiny model's bf16-autocast training step is planned for sm_90 (Triton's own JIT specializes
every launch behind a stand-in driver; see gpt_kernels.precompile), its kernels compiled in two processes into
an empty Triton cache, and then the step runs again with every launch turned into the JIT's warm-up (the
compile path of a real launch, without the launch): Triton's compile listener sees each compile and whether the
cache had it. In a subprocess without TRITON_INTERPRET (the interpreter compiles nothing).
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
    from triton import knobs
    from triton.runtime.jit import JITFunction
    from gpt import GPT
    from gpt_kernels import precompile
    from gpt_kernels.backend import use_backend

    torch.manual_seed(0)
    model = GPT.from_preset("tiny", kernel_backend="triton", pad_vocab_multiple=64, context_length=32).train()
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()

    plan = precompile.plan(step, capability=90)
    rows = precompile.compile_plan(plan, workers=2)

    # the step again, each launch compiled as the JIT compiles it at run time (warm-up: compiled, not run)
    compiles = []
    knobs.compilation.listener = lambda *, src, metadata, cache_hit, **_: compiles.append(
        (metadata["name"], cache_hit))
    run = JITFunction.run
    JITFunction.run = lambda self, *a, grid, warmup, **k: run(self, *a, grid=grid, warmup=True, **k)
    with precompile._stand_in_driver(90), use_backend("triton"):
        from gpt_kernels import backend
        backend._plan = plan  # CPU tensors take the GPU's path, as while planning
        try:
            step()
        finally:
            backend._plan = None
    print(json.dumps({"summary": plan.summary(), "origins": [r.origin for r in plan.compiles()],
                      "rows": rows, "compiles": compiles}))
""")


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    cache = tmp_path_factory.mktemp("triton-cache")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_tiny_training_step_compiles_each_launched_kernel_once(cold_start):
    """The step's distinct compile requests (launches, and the warm-ups that size the LayerNorm and bias + GELU
    backward grids) are exactly its distinct launched kernels: no warm-up compiles a kernel no launch uses."""
    summary = cold_start["summary"]
    assert summary["launched"] >= 9, summary  # LayerNorm x2, attention x4, bias+GELU x2, CE, LayerNorm bwd x2
    assert summary["compiles"] == summary["launched"], (
        f"{summary['compiles']} compiles for {summary['launched']} launched kernels: a warm-up specializes "
        f"differently from its launch ({summary['by_kernel']})")
    assert summary["requests"] > summary["compiles"], "the warm-ups were planned too (else nothing was checked)"


def test_precompile_leaves_nothing_for_the_step_to_compile(cold_start):
    """After precompiling, the step's own compiles (as the JIT makes them at run time) all hit Triton's cache,
    and it makes as many as the plan counted."""
    assert all(r["error"] is None for r in cold_start["rows"]), cold_start["rows"]
    compiles = cold_start["compiles"]
    assert len(compiles) == cold_start["summary"]["compiles"], compiles
    missed = [name for name, hit in compiles if not hit]
    assert not missed, f"compiled at run time although precompiled: {missed}"
