"""Median wall time of a callable on CPU or CUDA."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["L2_FLUSH_BYTES", "median_time"]

# Written before every timed CUDA run so that no run starts with the previous one's data in L2
# (H100: 50 MB, H200: 60 MB), as triton.testing.do_bench does.
L2_FLUSH_BYTES = 256 << 20


def median_time(fn: Callable[[], object], device: torch.device, rounds: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``rounds`` calls of ``fn`` after ``warmup`` untimed ones.

    CUDA: each call between two CUDA events, after the L2 flush; CPU: ``time.perf_counter``
    around each call. The median, not the mean: on a shared machine the slow outliers are
    other people's work.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        for _ in range(rounds):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(rounds):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)
