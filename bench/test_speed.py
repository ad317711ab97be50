"""Benchmark tests: did this commit make a kernel, or the model, slower? (pytest-benchmark, saved per machine)

``python -m bench`` answers "how fast against PyTorch, today"; these tests answer "slower than the last
saved run on this machine?". They time the cases of ``python -m bench``, imported from its modules (shapes,
inputs, providers, byte and FLOP formulas), each op forward and forward + backward, ours and PyTorch's as two
benchmarks in one group so that the table reads side by side, plus one training step and one decoding step
of the model:

- on a GPU: the suites' ``--quick`` shapes in bf16, ours on the Triton kernels (``ours-triton``); every
  timed call ends in ``torch.cuda.synchronize()`` (``benchmark.pedantic``, warm-up rounds first: Triton's
  autotuning happens there) and the L2 cache is flushed before each, off the clock, as ``do_bench`` does;
  the time includes the launch from Python, as a training step pays it;
- on the CPU: the suites' ``--smoke`` shapes in fp32, ours on its PyTorch path (``ours-torch``): the
  Triton interpreter is not timed. pytest-benchmark chooses the rounds (``benchmark(fn)``).

Each benchmark's ``extra_info`` holds the shapes, dtype, device, backend and the bytes moved or the FLOPs
of one call (the formula in the module named under ``formula``), and the GB/s or TFLOP/s of the median.
Not collected by the README's test command (``testpaths = ["tests"]``)::

    python -m pytest bench --benchmark-only                 # time, print the tables, save the run
    python -m pytest bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%
    python -m pytest bench --benchmark-disable -q           # CI: every body once, nothing timed

``bench/conftest.py`` saves each run under ``.benchmarks/<machine>/`` (see bench/README.md, "Regression check").
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench import bench_activation, bench_attention, bench_cross_entropy, bench_generate, bench_norm, e2e_train

CUDA = torch.cuda.is_available()
SMOKE = not CUDA  # the CPU times the suites' smoke shapes; a GPU their quick ones
OURS = "triton" if CUDA else "torch"  # the backend "ours" runs on: the kernels, or their torch path on a CPU
ROUNDS, WARMUP = 50, 5  # on a GPU, per kernel benchmark; the model's steps take fewer (below)
PASSES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------ timing


@functools.cache
def _l2_flush() -> torch.Tensor:
    """256 MB to overwrite between timed calls, more than any GPU's L2 (as ``triton.testing.do_bench``)."""
    return torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")


def _time(benchmark, fn, group: str, rounds: int | None = None, warmup: int = WARMUP, **info) -> None:
    """Time ``fn()`` in ``group`` with ``info`` as extra_info, then add the GB/s or TFLOP/s of the median
    where ``info`` has ``bytes`` or ``flops``. ``rounds``: a fixed count (the model's steps), else ROUNDS on a
    GPU and pytest-benchmark's choice on the CPU."""
    benchmark.group = group
    benchmark.extra_info.update(device="cuda" if CUDA else "cpu", **info)
    if CUDA:
        def setup():  # off the clock: a cold L2, nothing left running
            _l2_flush().zero_()
            torch.cuda.synchronize()

        def call():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(call, setup=setup, rounds=rounds or ROUNDS, warmup_rounds=warmup)
    elif rounds:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup)
    else:
        if benchmark.enabled:
            fn()  # first-call costs (autograd's threads, allocations) would otherwise skew the calibration
        benchmark(fn)
    median = benchmark.stats.stats.median if benchmark.stats else None  # seconds; None with --benchmark-disable
    if median and "bytes" in info:
        benchmark.extra_info["GB/s"] = info["bytes"] / median / 1e9
    if median and "flops" in info:
        benchmark.extra_info["TFLOP/s"] = info["flops"] / median / 1e12


def _provider(ours: bool) -> dict:
    return {"provider": "ours" if ours else "pytorch", "backend": OURS if ours else "torch"}


def _label(ours: bool) -> str:
    return f"ours-{OURS}" if ours else "pytorch"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------- LayerNorm, add + LayerNorm, GELU, bias + GELU


@functools.cache
def _memory_bound_ops() -> dict:
    """op -> (make, impls, bytes_fn, module) of bench_norm's and bench_activation's sweeps."""
    ops = {op: (*v, "bench.bench_norm") for op, v in bench_norm.norm_ops(OURS).items()}
    ops.update({op: (*v, "bench.bench_activation") for op, v in bench_activation.activation_ops(OURS).items()})
    return ops


MEMORY_BOUND = [(op, m, n, which, ours)
                for op in ("layer_norm", "add_layer_norm", "gelu", "bias_gelu")
                for n in bench_norm.sweep_shapes(quick=True, smoke=SMOKE)[0]
                for m in bench_norm.sweep_shapes(quick=True, smoke=SMOKE)[1]
                for which in PASSES for ours in (True, False)]


@pytest.mark.parametrize("op, m, n, which, ours", MEMORY_BOUND,
                         ids=[f"{op}-{w}-M{m}xN{n}-{_label(o)}" for op, m, n, w, o in MEMORY_BOUND])
def test_memory_bound(benchmark, op, m, n, which, ours):
    make, impls, bytes_fn, module = _memory_bound_ops()[op]
    device, dtype = bench_norm.sweep_device(SMOKE)
    inputs, grads_out = make(m, n, device, dtype)
    step = bench_norm.pass_fn(impls["triton" if ours else "torch"], inputs, grads_out, which)
    _time(benchmark, step, f"{op} {which} M={m} N={n}", op=op, **{"pass": which}, M=m, N=n,
          dtype=_dtype_name(dtype), bytes=bytes_fn(m, n, dtype.itemsize)[which], formula=module, **_provider(ours))


# ------------------------------------------------------------------------------------------ attention

# ours and PyTorch's, without and with dropout: bench_attention's provider names
ATTENTION_PROVIDERS = {(0.0, True): "triton", (bench_attention.DROPOUT_P, True): "triton-dropout",
                       (0.0, False): "sdpa-flash" if CUDA else "sdpa",
                       (bench_attention.DROPOUT_P, False): "sdpa-flash-dropout" if CUDA else "sdpa-dropout"}
@functools.cache
def _attention_providers() -> dict:
    return bench_attention.providers(SMOKE, backend=OURS)


ATTENTION = [(shape, p, which, ours) for shape in bench_attention.shapes(quick=True, smoke=SMOKE)
             for p in (0.0, bench_attention.DROPOUT_P) for which in PASSES for ours in (True, False)]


@pytest.mark.parametrize("shape, dropout_p, which, ours", ATTENTION,
                         ids=[f"{w}-B{b}xH{h}xT{t}xD{d}-dropout{p:g}-{_label(o)}"
                              for (b, h, t, d), p, w, o in ATTENTION])
def test_attention(benchmark, shape, dropout_p, which, ours):
    B, H, T, D = shape
    fn = _attention_providers()[ATTENTION_PROVIDERS[dropout_p, ours]]
    device, dtype = bench_attention.device_dtype(SMOKE)
    q, k, v, do = bench_attention.inputs(B, H, T, D, device, dtype)
    flops = bench_attention.attention_flops(B, H, T, D)
    if which == "fwd+bwd":
        flops += bench_attention.attention_flops(B, H, T, D, backward=True)
    _time(benchmark, bench_norm.pass_fn(fn, (q, k, v), (do,), which),
          f"attention {which} B={B} H={H} T={T} D={D} dropout={dropout_p:g}", op="attention", **{"pass": which},
          B=B, H=H, T=T, D=D, causal=True, dropout_p=dropout_p, dtype=_dtype_name(dtype), flops=flops,
          formula="bench.bench_attention", impl=ATTENTION_PROVIDERS[dropout_p, ours], **_provider(ours))


# ------------------------------------------------------------------------ cross-entropy, linear + loss

CROSS_ENTROPY = [(op, n, which, ours) for op in ("cross_entropy", "linear_cross_entropy")
                 for n in bench_cross_entropy.setup(quick=True, smoke=SMOKE)[0]
                 for which in PASSES for ours in (True, False)]


@pytest.mark.parametrize("op, n, which, ours", CROSS_ENTROPY,
                         ids=[f"{op}-{w}-N{n}-{_label(o)}" for op, n, w, o in CROSS_ENTROPY])
def test_cross_entropy(benchmark, op, n, which, ours):
    _, V, C, dtype, device = bench_cross_entropy.setup(quick=True, smoke=SMOKE)
    if op == "cross_entropy":
        inputs = bench_cross_entropy.loss_inputs(n, V, dtype, device)
        fns, shape = bench_cross_entropy.loss_fns(OURS), {"N": n, "V": V}
        work = {"bytes": bench_cross_entropy.loss_bytes(n, V, dtype.itemsize, which)}
    else:
        inputs = bench_cross_entropy.linear_inputs(n, V, C, dtype, device)
        fns, shape = bench_cross_entropy.linear_fns(OURS), {"N": n, "V": V, "C": C}
        work = {"flops": bench_cross_entropy.linear_flops(n, V, C, which)}
    base, mine = fns
    step = bench_norm.pass_fn(fns[mine if ours else base], inputs, None, which)
    _time(benchmark, step, f"{op} {which} " + " ".join(f"{k}={v}" for k, v in shape.items()), op=op,
          **{"pass": which}, **shape, dtype=_dtype_name(dtype), **work, formula="bench.bench_cross_entropy",
          impl=mine if ours else base, **_provider(ours))


# ---------------------------------------------------------------------------------------- the model

TRAIN = e2e_train.FULL if CUDA else e2e_train.SMOKE
TRAIN_VARIANTS = ("ours", "eager-torch") if CUDA else ("eager-torch",)  # eager-torch: the model on torch ops


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_train_step(benchmark, variant):
    device = "cuda" if CUDA else "cpu"
    batch, T, preset = TRAIN["batch"], TRAIN["T"], TRAIN["preset"]
    model, step = e2e_train.make_step(variant, batch, T, preset, device)
    flops = e2e_train.flops_per_token(model, T) * batch * T
    _time(benchmark, step, f"train_step {preset} B={batch} T={T}", rounds=10, warmup=3, op="train_step",
          variant=variant, backend=model.kernel_backend, preset=preset, batch=batch, T=T, dtype="bfloat16 autocast",
          flops=flops, formula="bench.e2e_train", provider="ours" if variant == "ours" else "pytorch")


@pytest.fixture(scope="module")
def generate_model():
    return bench_generate.load_model(bench_generate.PRESET)


@pytest.mark.parametrize("backend", ("triton", "torch") if CUDA else ("torch",))
def test_decode_step(benchmark, generate_model, backend):
    import gpt_kernels

    model, dtype = generate_model
    idx = bench_generate.prompts(1).to(model.device)  # (1, P): one prompt, bench_generate's first case
    B, P = idx.shape
    with gpt_kernels.use_backend(backend):
        step = bench_generate.decode_step(model, idx)

    def on_backend():
        with gpt_kernels.use_backend(backend):
            step()

    _time(benchmark, on_backend, f"decode_step {bench_generate.PRESET} B={B} P={P}", rounds=20,
          op="decode_step", backend=backend, preset=bench_generate.PRESET, batch=B, prompt_tokens=P,
          dtype=_dtype_name(dtype), bytes=bench_generate.decode_bytes(model, B, P), formula="bench.bench_generate",
          provider="ours" if backend == "triton" else "pytorch")
