"""ResourceMeter: the resources Γ a training run spends, from real readings only."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.hooks import RemovableHandle

from .. import _checks
from .energy import DEFAULT_POWERCAP_ROOT, EnergyUnavailable, energy_reader

__all__ = ["RESOURCES", "ResourceMeter", "ResourceReport"]

RESOURCES = ("device_hours", "memory_gib_hours", "state_gib_hours", "energy_j")
GIB = 2.0**30


@dataclass(frozen=True)
class ResourceReport:
    """What a :class:`ResourceMeter` measured. A resource without a reading is ``None``, with the
    reason in ``*_unavailable``: never an estimate from something else."""

    elapsed_s: float
    device_hours: float  # wall-clock hours × 1 device
    memory_gib_hours: float | None  # memory in use (see memory_source) integrated over time
    memory_source: str
    peak_memory_gib: float | None
    state_gib_hours: float | None  # tracked optimizer-state bytes integrated over time
    energy_j: float | None
    energy_source: str | None
    energy_unavailable: str | None  # why energy_j is None
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _process_rss_bytes() -> tuple[int, str]:
    """Resident memory of this process now (Linux), else its peak so far."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE"), "process RSS (/proc/self/statm)"
    except (OSError, ValueError, IndexError):
        # Unix only, so imported here, where /proc is missing, rather than at the top.
        from resource import RUSAGE_SELF, getrusage

        peak = getrusage(RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024), "process peak RSS (getrusage)"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state``, plus SparseAdamW's compact moment slabs, which
    live per param group beside ``optimizer.state`` (each saved group's ``"sparse_grad"`` entry)."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    if any(g.get("state_layout") == "compact" for g in optimizer.param_groups):
        tensors += [t for group in optimizer.state_dict()["param_groups"]
                    for t in group.get("sparse_grad", {}).get("compact", {}).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


class ResourceMeter:
    """Accounts the resources Γ of a run, as a context manager and a per-step callback.

    ::

        with ResourceMeter("cuda") as meter:
            meter.attach(opt)                       # samples after every opt.step()
            ...
            gamma = meter.gamma("device_hours")     # Γ so far; pair it with your metric Ψ

    Resources (``gamma(resource)``):

    - ``device_hours``: wall-clock time since ``start()`` × 1 device.
    - ``memory_gib_hours``: memory × time, integrated over samples. On CUDA the memory of an
      interval is ``torch.cuda.max_memory_allocated`` (the peak: weights, grads, optimizer
      state and activations), and the peak is reset at every sample; on CPU it is the
      process's resident set (RSS) at the sample.
    - ``state_gib_hours``: bytes of the attached optimizer's state tensors × time.
    - ``energy_j``: joules from NVML (CUDA, needs ``nvidia-ml-py``) or RAPL counters under
      ``powercap_root`` (CPU), when readable; otherwise unavailable (``report()`` says why,
      and ``gamma("energy_j")`` raises).

    Samples are taken by ``sample()`` (called by the attached optimizer's step, by
    ``gamma()`` and ``report()``, and at exit); memory × time uses the reading at the end of
    each interval, so sample about once per step.

    Args:
        device: the device doing the work (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        optimizer: whose state bytes to track (or use :meth:`attach`).
        energy: try to read energy (False: report it unavailable without touching counters).
        powercap_root: where the RAPL counters live.
        clock: seconds, monotonic (a parameter for tests).
    """

    def __init__(self, device: str | torch.device = "cpu", *, optimizer: torch.optim.Optimizer | None = None,
                 energy: bool = True, powercap_root: str | os.PathLike = DEFAULT_POWERCAP_ROOT,
                 clock: Callable[[], float] = time.perf_counter):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {device!r} is not a torch device: {err}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device}, but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._want_energy = _checks.flag(energy, "energy")
        self._powercap_root = powercap_root
        self._clock = clock
        self._running = False
        self._started = False

    def start(self) -> ResourceMeter:
        """Start (or restart) metering from zero."""
        now = self._clock()
        self._start = self._last = now
        self._memory_gib_hours = 0.0
        self._state_gib_hours = 0.0
        self._peak_memory = 0
        self._samples = 0
        self._energy = None
        self._energy_j = 0.0
        self._energy_unavailable = "energy reading was not requested (energy=False)"
        if self._want_energy:
            try:
                self._energy = energy_reader(self.device, now, self._powercap_root)
                self._energy_unavailable = None
            except EnergyUnavailable as err:
                self._energy_unavailable = str(err)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._memory_source = ("torch.cuda.max_memory_allocated (peak per interval)" if self.device.type == "cuda"
                               else _process_rss_bytes()[1])
        self._running = self._started = True
        return self

    def stop(self) -> None:
        """Take a last sample and stop; the totals stay readable."""
        if self._running:
            self.sample()
            self._running = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Sample after every ``optimizer.step()`` and track its state bytes."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.sample())

    def _memory_bytes(self) -> int:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        return _process_rss_bytes()[0]

    def sample(self) -> None:
        """Account the time since the last sample (a no-op unless started and running)."""
        if not self._running:
            return
        now = self._clock()
        hours = max(now - self._last, 0.0) / 3600.0
        memory = self._memory_bytes()
        self._peak_memory = max(self._peak_memory, memory)
        self._memory_gib_hours += memory / GIB * hours
        if self.optimizer is not None:
            self._state_gib_hours += optimizer_state_bytes(self.optimizer) / GIB * hours
        if self._energy is not None:
            try:
                self._energy_j = self._energy.joules(now)
            except (OSError, ValueError, RuntimeError) as err:
                # A counter that stops being readable makes the whole energy figure unknown.
                self._energy, self._energy_unavailable = None, f"the energy counter stopped being readable: {err}"
        self._last = now
        self._samples += 1

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("the ResourceMeter has not been started (use `with ResourceMeter() as meter:` "
                               "or meter.start())")

    def report(self) -> ResourceReport:
        """Totals so far (samples first if running)."""
        self._check_started()
        self.sample()
        elapsed = self._last - self._start
        return ResourceReport(
            elapsed_s=elapsed, device_hours=elapsed / 3600.0,
            memory_gib_hours=self._memory_gib_hours, memory_source=self._memory_source,
            peak_memory_gib=self._peak_memory / GIB if self._samples else None,
            state_gib_hours=self._state_gib_hours if self.optimizer is not None else None,
            energy_j=self._energy_j if self._energy is not None else None,
            energy_source=self._energy.source if self._energy is not None else None,
            energy_unavailable=self._energy_unavailable, samples=self._samples)

    def gamma(self, resource: str = "device_hours") -> float:
        """Γ so far in one resource (see the class docstring); raises if it has no reading."""
        resource = _checks.choice(resource, RESOURCES, "resource")
        report = self.report()
        if resource == "energy_j" and report.energy_j is None:
            raise ValueError(f"energy_j has no reading here: {report.energy_unavailable}")
        if resource == "state_gib_hours" and report.state_gib_hours is None:
            raise ValueError("state_gib_hours needs an optimizer (ResourceMeter(optimizer=...) or meter.attach(opt))")
        return getattr(report, resource)
