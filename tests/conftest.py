"""Shared test set-up.

On a machine with no CUDA GPU the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET is
read when ``@triton.jit`` runs, i.e. when ``gpt_kernels`` is first imported, so it is set here, before any
test module imports the package.
"""

import os
import signal
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A test run started in the background by a shell without job control (`cmd &`, nohup) inherits an ignored
# SIGINT, and Python then keeps it ignored: the tests that press Ctrl-C need the usual KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Triton 3.9's notice for kernels that leave FMA contraction to its default (ours state it: gpt_kernels.common)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where the kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, never zeros.

    The seed comes from the test's id (not Python's salted ``hash``), so a failure reproduces; set
    ``TEST_SEED=N`` to draw another set of inputs for every test.
    """
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("TEST_SEED", "0"))) % (2**31)
    torch.manual_seed(seed)
    yield
