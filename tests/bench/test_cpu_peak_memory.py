"""bench.common.cpu_peak_memory: the CPU allocator's high-water mark of a call, to the byte, which the
planner's test (tests/gpt/test_plan.py) and bench.bench_recompute measure with."""

import torch

from bench.common import cpu_peak_memory


def test_the_peak_counts_what_was_alive_together_and_not_what_was_freed_before():
    held = torch.randn(1000)  # allocated before: not counted

    def fn():
        a = torch.randn(300_000)  # 1.2 MB
        b = torch.randn(500_000)  # 2 MB, alive with a: the peak
        del a, b
        c = torch.randn(600_000)  # 2.4 MB alone: less than a + b
        return c.sum()

    peak = cpu_peak_memory(fn)
    assert 3_200_000 <= peak < 3_200_000 + 4096, peak  # a + b (the sums' scalars aside)
    assert held.numel() == 1000
