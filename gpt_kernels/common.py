"""What the op modules share: output buffers, row views, input checks, block sizes, how many programs fit.

Nothing here launches a kernel or knows a model: it is the plumbing every launcher needs, written once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os

import torch
import triton
import triton.language as tl

from .backend import planning

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every Triton kernel here reads and writes

# constexprs, so kernels can use them (a kernel may read a module global only if it is a tl.constexpr)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E), the form MUFU.EX2 computes
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): back from the log2 domain, log(x) = log2(x) * LN2

# True under Triton's CPU interpreter. A constexpr, so kernels can branch on it at no cost on a GPU (the
# branch is compiled away). Read when this module is imported, as TRITON_INTERPRET itself is.
INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"))


def _mend_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int (a ``range`` bound, a loop count)
    with ``int()`` of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"): every kernel with a loop fails. Later Triton squeezes the array first
    (triton-lang/triton#9171); on an interpreter without that fix, install the same fix. No effect on a GPU."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data))" not in inspect.getsource(patch):
        return  # a Triton that has the fix (or patches tensors another way)

    def patch_with_fix(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_fix


if INTERPRETER:
    _mend_interpreter_index()

# Compile options every launch states rather than leaving to Triton's defaults: contract a * b + c into one
# FMA, which the kernels are written for (the softmax's exp2(s * scale - m), the norms' (x - mean) * rstd * w
# + b, Philox's integer arithmetic aside). Triton 3.9 warns that its default turns this off in 3.10.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# Tests set this to fill every buffer the launchers allocate with NaN, so an element a kernel forgets to
# write fails the comparison instead of passing on leftover memory.
POISON_OUTPUTS = False


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An output buffer: ``torch.empty``, or filled with NaN when the tests set ``POISON_OUTPUTS``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS and t.is_floating_point() else t


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (M, n) rows with unit column stride: a view when the layout allows, else a copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n)  # (M, N); not -1, which is ambiguous when N == 0
    return t2 if t2.stride(1) == 1 or t2.numel() == 0 else t2.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, like: torch.Tensor | None = None) -> None:
    """Raise a clear error unless ``t`` is a tensor of one of ``dtypes`` (on ``like``'s device if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"{op}: {name} must be {names} for the Triton kernel, got {t.dtype}; cast it, or "
                        "use gpt_kernels.use_backend('torch') for other dtypes")
    if like is not None and t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {like.device}; move them to one device")


def check_vector(op: str, name: str, p, n: int, like: torch.Tensor) -> None:
    """A per-column parameter (weight or bias): None, or an (n,) float tensor on ``like``'s device."""
    if p is None:
        return
    check_tensor(op, name, p, like=like)
    if tuple(p.shape) != (n,):
        raise ValueError(f"{op}: {name} must have shape ({n},) to match the input's last dimension, "
                         f"got {tuple(p.shape)}")


# ------------------------------------------------------------------------------------- the tensors' GPU


def device_guard(device: torch.device):
    """A context in which ``device`` is the current CUDA device (a no-op for any other device).

    Triton launches (and compiles for) the *current* device, not the tensors': without this, a kernel
    on cuda:1 tensors would run on cuda:0 with cuda:1 pointers. Every launcher runs inside one
    (:func:`on_inputs_device`); ``torch.cuda.device`` restores the previous device on exit.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_inputs_device(fn):
    """Run ``fn`` (a launcher or custom op) inside :func:`device_guard` for the device of its first tensor
    argument, so that every kernel it launches, and every compile, is on the inputs' GPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with device_guard(first.device):
            return fn(*args, **kwargs)

    return wrapper


def check_same_device(op: str, **tensors) -> None:
    """Raise a clear error unless every tensor given (None skipped) is on one device."""
    given = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {where}; move them with .to(device)")


# Shared memory one program (CTA) may use, in bytes, by compute capability, with the opt-in above 48 KB
# that Triton takes (CUDA programming guide, "Technical Specifications per Compute Capability"). A
# kernel's tiles must fit this: the consumer parts (sm_86, sm_89, sm_120) have ~60% of an A100's.
SMEM_PER_BLOCK = {
    (7, 0): 98304,  # V100: 96 KB
    (7, 5): 65536,  # T4, RTX 20xx: 64 KB
    (8, 0): 166912,  # A100: 163 KB
    (8, 6): 101376,  # RTX 30xx, A10, A40: 99 KB
    (8, 7): 166912,  # Jetson Orin: 163 KB
    (8, 9): 101376,  # RTX 40xx, L4, L40: 99 KB
    (9, 0): 232448,  # H100, H200: 227 KB
    (10, 0): 232448,  # B200: 227 KB
    (12, 0): 101376,  # RTX 50xx: 99 KB
}
SMEM_UNKNOWN = 101376  # a compute capability not in the table: the smallest of the current parts


def smem_per_block_for(capability: tuple[int, int]) -> int:
    """The table's shared memory per program for a compute capability (the fallback of :func:`smem_per_block`)."""
    return SMEM_PER_BLOCK.get(tuple(capability), SMEM_UNKNOWN)


@functools.cache
def _smem_of_index(index: int) -> int:
    try:  # what Triton itself checks a compiled kernel against (the driver's opt-in maximum)
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # a Triton without this utility: torch's properties, then the table
        props = torch.cuda.get_device_properties(index)
        optin = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        return optin or smem_per_block_for((props.major, props.minor))


def smem_per_block(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on ``device``; None off CUDA (the interpreter: no limit)."""
    if device.type != "cuda":
        return None
    return _smem_of_index(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------- grids of row groups


_RESIDENT: dict = {}  # (kernel, device, config key) -> how many of its programs the GPU holds at once


def resident_programs(kernel, args, meta: dict, device: torch.device, key) -> int:
    """How many programs of ``kernel`` (launched with ``args`` and ``meta``) the whole GPU runs at once.

    Per SM: the fewest of what its registers, threads and shared memory allow, read from the compiled
    kernel (``kernel.warmup`` compiles without launching) and cached per ``key``. A grid of exactly this
    many programs finishes in one wave; a few more would leave most SMs idle for a second one. Under the
    CPU interpreter: 4, so the tests run several programs with several loop steps each.

    ``args`` must specialize the kernel as the launch that follows does (the same dtypes, 16-byte
    alignments and integers, or integers the kernel does not specialize on): the warm-up's compile is
    then the launch's, not a second one. While a plan is recorded (:mod:`gpt_kernels.precompile`) the
    warm-up is recorded like a launch and the count is the plan's estimate.
    """
    plan = planning()
    if plan is not None:
        kernel.warmup(*args, grid=(1,), **meta)  # recorded by the plan, not compiled
        return plan.programs_per_gpu(device, meta["num_warps"])
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    num_warps = meta["num_warps"]
    cache_key = (getattr(kernel, "__name__", id(kernel)), index, key)
    if cache_key not in _RESIDENT:
        props = torch.cuda.get_device_properties(index)
        threads = getattr(props, "max_threads_per_multi_processor", 2048)
        try:
            compiled = kernel.warmup(*args, grid=(1,), **meta)
            compiled._init_handles()  # loads the binary, which fills in n_regs
            regs_per_warp = -(-max(int(compiled.n_regs), 1) * 32 // 256) * 256  # allocated in 256s per warp
            by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // num_warps
            smem = int(compiled.metadata.shared)
            by_smem = getattr(props, "shared_memory_per_multiprocessor", 0) // smem if smem else 32
            fit = min(by_regs, by_smem or 32, threads // (32 * num_warps), 32)
        except Exception:  # an older/newer Triton without these fields: assume ~64 registers a thread
            fit = threads // (64 * num_warps)
        _RESIDENT[cache_key] = props.multi_processor_count * max(1, fit)
    return _RESIDENT[cache_key]


def split_rows(m: int, block_m: int, programs: int, min_rows: int | None = None) -> tuple[int, int]:
    """(G, rows per group) for a backward whose programs each walk a contiguous group of rows.

    At most ``programs`` groups (one wave), and at least 4 row tiles per group (or ``min_rows`` rows) so
    the (G, N) float32 partial sums stay small next to the rows themselves. Rows per group is a multiple
    of ``block_m``, so only the last group's last tile is ragged.
    """
    tiles = triton.cdiv(m, block_m)
    fewest = triton.cdiv(tiles, 4) if min_rows is None else triton.cdiv(m, min_rows)
    g = max(1, min(tiles, programs, fewest))
    rows_per_program = triton.cdiv(tiles, g) * block_m
    return triton.cdiv(m, rows_per_program), rows_per_program
