"""Where and how a job runs: the device, the precision, the process group, the kernel backend, the random
generators, the signals that stop a run. Plain functions and small classes that any job (or a notebook)
can use; no argparse here.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL_MODES = ("ddp", "fsdp")  # under torchrun: each process holds the whole model, or a shard of it (gpt.parallel)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; or a name such as ``cpu``, ``cuda``, ``cuda:1``.

    A GPU named by index must exist, and becomes the current CUDA device: what reads the current device
    (``torch.cuda.is_bf16_supported()``, an allocation on plain ``"cuda"``) then means the chosen GPU. (The
    kernels launch on their tensors' GPU whichever is current: ``gpt_kernels.common.device_guard``.)
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(device)
    return device


def kernels_in_force() -> str:
    """The kernel backend a command runs when not told: ``$GPT_KERNELS`` (a UserError if it names no
    backend), else auto."""
    from gpt_kernels.backend import get_backend

    try:
        return get_backend()
    except ValueError as e:  # gpt_kernels' own ValueError (it knows nothing of gpt): a user's setting
        raise UserError(str(e)) from None


def check_backend(name: str | None, device: torch.device, setting: str | None = None) -> str:
    """Raise now, before anything is written, if kernel backend ``name`` cannot run on ``device``; None: the
    backend in force ($GPT_KERNELS, checked, or auto). ``setting`` names where the choice came from in the
    error (default ``--kernels NAME``, or ``GPT_KERNELS=NAME`` for None). Returns the backend's name."""
    from gpt_kernels.backend import ENV_VAR, select, use_backend

    if name is None:
        name = kernels_in_force()
        setting = setting or f"{ENV_VAR}={name}"
    try:
        with use_backend(name):
            select(torch.empty(0, device=device))
    except RuntimeError as e:
        raise UserError(f"{setting or f'--kernels {name}'} cannot run on {device}: {e}") from None
    return name


class Precision:
    """The training precision on a device: ``autocast()`` for the forward passes and, for float16, the
    gradient scaler. ``auto`` is bf16 autocast on a CUDA GPU that has it (fp16 on one that has not) and
    float32 on the CPU."""

    def __init__(self, device: torch.device, dtype: str = "auto"):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if dtype == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = ("bfloat16" if bf16 else "float16") if device.type == "cuda" else "float32"
        if dtype == "float16" and device.type != "cuda":
            raise UserError("float16 training needs a CUDA GPU (it relies on a gradient scaler there): use "
                            "--dtype bfloat16 or float32 on the CPU")
        if device.type == "cuda":  # TF32 tensor cores for the float32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device, self.name = device, dtype
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


class Processes:
    """This process, alone or one of several started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK).

    With several, each gets its own GPU (or shares the CPU) and the process group is started here (gloo on
    the CPU, NCCL on GPUs) unless the caller started one already.
    """

    def __init__(self, device_name: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        device = pick_device(device_name)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)  # one GPU per process
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- RNG


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every GPU), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """Every random generator a training step can draw from, as plain tensors and numbers (loadable with
    ``torch.load(weights_only=True)``): torch's CPU generator and each GPU's (dropout masks; the attention
    kernels draw their dropout seeds from these too), numpy's and Python's."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                              "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(s["python"])


@contextlib.contextmanager
def rng_preserved():
    """Run a block (an evaluation, a sample) without moving any random generator that training uses, so
    that the steps after it are the same whether or not it ran."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def to_device(batch, device: torch.device):
    """A batch's tensors on ``device`` (through pinned memory to a GPU, without waiting for the copy)."""
    if device.type != "cuda":
        return tuple(batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


class StopOnSignal:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step; a second
    one stops at once. Inside :meth:`at_once` (work after a step that can be done again on resume: an
    evaluation, a sample, an estimate) the first one also raises KeyboardInterrupt at once, so that no
    phase makes a person wait for it. Signal handlers can only be set in the main thread; elsewhere this
    does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._now = False  # inside at_once()

    def _handle(self, signum, frame):
        if self.requested or self._now:
            if not self.requested:
                tqdm.write("\nstopping now to save a checkpoint (press Ctrl-C again to quit without saving)")
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nstopping after this step to save a checkpoint (press Ctrl-C again to quit without saving)")

    @contextlib.contextmanager
    def at_once(self, enabled: bool = True):
        """A block that a signal interrupts at once (KeyboardInterrupt, with ``requested`` set) when ``enabled``."""
        self._now = enabled
        try:
            yield
        finally:
            self._now = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
