"""Timing an optimizer step on CPU or CUDA: the full step synchronized and pipelined, the host's
share of it, and the Python calls it makes.

A step's time has two parts that show differently: the kernels, and the host work around them
(Python, argument checks, launches). One step timed alone and synchronized (:func:`median_time`)
is what a step costs when nothing overlaps it; steps back to back (:func:`pipelined_time`) let
the host prepare the next step while the GPU runs this one, as a training loop does. The host's
share (:func:`host_time`) says how much a smaller kernel could gain at most, and
:func:`python_calls_per_step` counts the Python calls, a number that does not vary with the load
of the machine.
"""
from __future__ import annotations

import cProfile
import contextlib
import gc
import math
import pstats
import statistics
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import torch

from .. import backends
from .._checks import non_negative_int, positive_int

__all__ = ["L2_FLUSH_BYTES", "HostTime", "KernelClock", "host_time", "kernel_names", "kernels_timed",
           "median_time", "pipelined_time", "python_calls", "python_calls_per_step", "synced_time"]

# Written before every timed CUDA run so that no run starts with the previous one's data in L2
# (H100: 50 MB, H200: 60 MB), as triton.testing.do_bench does.
L2_FLUSH_BYTES = 256 << 20

# The backend-module attributes an optimizer step calls its kernels through (docs/design.md §1), for a
# sparse_grad without backends.KERNEL_NAMES.
_DEFAULT_KERNEL_NAMES = ("block_sqnorms", "select_blocks", "sparse_adamw_step")


def _check_device(device) -> torch.device:
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__} {device!r}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _l2_flush(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _warm_up(fn: Callable[[], object], warmup: int) -> None:
    for _ in range(non_negative_int(warmup, "warmup")):
        fn()


def median_time(fn: Callable[[], object], device: torch.device, rounds: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``rounds`` calls of ``fn`` after ``warmup`` untimed ones, each call
    timed alone and synchronized ("synced").

    CUDA: each call between two CUDA events, after the L2 flush; CPU: ``time.perf_counter``
    around each call. The median, not the mean: on a shared machine the slow outliers are
    other people's work.
    """
    rounds = positive_int(rounds, "rounds")
    _warm_up(fn, warmup)
    times = []
    if device.type == "cuda":
        flush = _l2_flush(device)
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


synced_time = median_time  # the name that says which of the two full-step timings it is


def pipelined_time(fn: Callable[[], object], device: torch.device, steps: int = 10, runs: int = 3,
                   warmup: int = 2) -> float:
    """Seconds per call of ``fn`` called ``steps`` times back to back with one synchronization
    at the end ("pipelined"): the median over ``runs`` such runs of their time / ``steps``.

    With no sync between calls the host prepares call i+1 while the device runs call i, as in a
    training loop, so host time hides behind kernel time (it adds where it is the longer of the
    two). CUDA: CUDA events before the first and after the last call, the L2 flushed once
    before each run; CPU: ``time.perf_counter``, where kernels run synchronously and this
    mostly agrees with :func:`median_time`.
    """
    device = _check_device(device)
    steps, runs = positive_int(steps, "steps"), positive_int(runs, "runs")
    _warm_up(fn, warmup)
    per_call = []
    flush = _l2_flush(device) if device.type == "cuda" else None
    for _ in range(runs):
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            begin = time.perf_counter()
            for _ in range(steps):
                fn()
            per_call.append((time.perf_counter() - begin) / steps)
    return statistics.median(per_call)


def kernel_names() -> tuple[str, ...]:
    """The backend-module attributes every kernel call of a step goes through."""
    return tuple(getattr(backends, "KERNEL_NAMES", _DEFAULT_KERNEL_NAMES))


class KernelClock:
    """What the wrapped kernel entry points saw: ``seconds`` spent inside them (the outermost
    call only, should one call another through the module), ``calls`` made, and
    ``first_call_at``, the ``time.perf_counter()`` at entry of the first call since
    :meth:`reset` (``None`` if none)."""

    def __init__(self) -> None:
        self.reset()
        self._depth = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.first_call_at: float | None = None

    def wrap(self, kernel: Callable) -> Callable:
        """``kernel`` with the same arguments and return value, timed into this clock."""
        def timed_kernel(*args, **kwargs):
            begin = time.perf_counter()
            if self.first_call_at is None:
                self.first_call_at = begin
            self.calls += 1
            self._depth += 1
            try:
                return kernel(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - begin
        timed_kernel.__wrapped__ = kernel
        timed_kernel.__name__ = getattr(kernel, "__name__", "kernel")
        return timed_kernel


@contextlib.contextmanager
def kernels_timed(module: ModuleType) -> Iterator[KernelClock]:
    """Replace ``module``'s kernel entry points (:func:`kernel_names`) by timed wrappers for the
    ``with`` block and yield their :class:`KernelClock`; the originals are put back on exit,
    also when the block raises.

    Steps look the entry points up on the backend module at every call
    (``backends.get(name).sparse_adamw_step(...)``), so the wrappers see every kernel call.
    """
    if not isinstance(module, ModuleType):
        raise TypeError(f"module must be a backend module, got {type(module).__name__} {module!r}")
    names = kernel_names()
    missing = [n for n in names if not callable(getattr(module, n, None))]
    if missing:
        raise ValueError(f"module {module.__name__} has no kernel entry point {', '.join(missing)}")
    clock = KernelClock()
    originals = {n: getattr(module, n) for n in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, clock.wrap(kernel))
        yield clock
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


@dataclass(frozen=True)
class HostTime:
    """Medians over rounds: ``seconds``, the host's time per step with the kernels excluded, and
    ``before_launch_seconds``, the host time before the first kernel entry point is called
    (CUDA only; NaN on CPU, and where no kernel module was given or none was called)."""
    seconds: float
    before_launch_seconds: float


def host_time(fn: Callable[[], object], device: torch.device, module: ModuleType | None = None,
              rounds: int = 7, warmup: int = 2) -> HostTime:
    """The host's time per call of ``fn`` (an optimizer step), kernels excluded; medians over
    ``rounds`` calls after ``warmup`` untimed ones.

    CPU, where kernels run synchronously on the calling thread: the wall time of the call
    minus the time spent inside ``module``'s kernel entry points (:func:`kernels_timed`); the
    wrappers' own few perf_counter calls count as host time. ``module`` is required here:
    without it host and kernels cannot be told apart.

    CUDA, where kernels are asynchronous: the wall time of an unsynchronized call with the
    device idle at entry (synchronized before, ``time.perf_counter`` around the call, then
    synchronized outside the timed region). A step that waits for the device itself (a host
    sync) has that wait counted as host time: the host is blocked for it. With ``module``, also
    the time from entry to its first kernel entry point (launch latency seen by an idle GPU).
    """
    device = _check_device(device)
    rounds = positive_int(rounds, "rounds")
    if module is None and device.type == "cpu":
        raise ValueError("module: on CPU the host time needs the backend module whose kernels to subtract")
    _warm_up(fn, warmup)
    with (kernels_timed(module) if module is not None else contextlib.nullcontext(None)) as clock:
        hosts, before_launch = [], []
        for _ in range(rounds):
            _sync(device)
            if clock is not None:
                clock.reset()
            begin = time.perf_counter()
            fn()
            wall = time.perf_counter() - begin
            _sync(device)
            if device.type == "cuda":
                hosts.append(wall)
                if clock is not None and clock.first_call_at is not None:
                    before_launch.append(clock.first_call_at - begin)
            else:
                hosts.append(wall - clock.seconds)
    return HostTime(statistics.median(hosts), statistics.median(before_launch) if before_launch else math.nan)


def python_calls(fn: Callable[[], object]) -> int:
    """Python function calls (builtins included) that one call of ``fn`` makes, counted by
    cProfile: unlike a time, the same on a busy and an idle machine. The garbage collector is
    paused meanwhile: its callbacks (hypothesis installs one, for instance) are not ``fn``'s calls,
    and when it runs depends on everything allocated before."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {fn!r}")
    collecting = gc.isenabled()
    gc.disable()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
        if collecting:
            gc.enable()
    return pstats.Stats(profiler).total_calls


def python_calls_per_step(opt) -> int:
    """Python calls of one steady-state ``opt.step()``: one step untimed first (it creates the
    state and fills the caches), then one step profiled. With ``reselect_every > 1`` a step
    between reselections makes fewer calls than one that reselects."""
    step = getattr(opt, "step", None)
    if not callable(step):
        raise TypeError(f"opt must be an optimizer with a step() method, got {type(opt).__name__}")
    step()
    return python_calls(step)
