"""Energy counters that exist on real hardware: NVML for NVIDIA GPUs, RAPL for CPU packages.

Each reader reports the joules used since it was made; a reader that cannot get a real reading
raises :class:`EnergyUnavailable` with the reason, and the meter then reports energy as
unavailable. Nothing here estimates energy from anything but these counters.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["DEFAULT_POWERCAP_ROOT", "EnergyUnavailable", "NvmlEnergy", "RaplEnergy", "energy_reader"]

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # packages; their subzones (intel-rapl:0:0) are inside them


class EnergyUnavailable(RuntimeError):
    """No real energy reading exists here; the message says why."""


def read_counter(path: Path) -> int:
    """An integer sysfs counter (a separate function so tests can stand in for the hardware)."""
    return int(path.read_text().strip())


class RaplEnergy:
    """CPU package energy from the RAPL counters under ``/sys/class/powercap``.

    Sums the top-level ``intel-rapl:N`` zones (AMD's packages appear under the same name) and
    handles each counter's wrap at ``max_energy_range_uj``; sample at least once per wrap period
    (minutes at full load). Reading needs permission (root on most kernels since 2020).
    """

    source = "RAPL (powercap)"

    def __init__(self, root: str | Path = DEFAULT_POWERCAP_ROOT):
        root = Path(root)
        zones = sorted(p for p in root.glob("intel-rapl:*") if _PACKAGE_ZONE.match(p.name)) if root.is_dir() else []
        if not zones:
            raise EnergyUnavailable(f"no RAPL package counters under {root}")
        self._zones = zones
        try:
            self._last = [read_counter(z / "energy_uj") for z in zones]
            self._ranges = [read_counter(z / "max_energy_range_uj") for z in zones]
        except PermissionError:
            raise EnergyUnavailable(f"the RAPL counters under {root} are not readable (permission denied; "
                                    "reading them needs root or a relaxed sysfs mode)") from None
        except (OSError, ValueError) as err:
            raise EnergyUnavailable(f"the RAPL counters under {root} cannot be read: {err}") from None
        self._microjoules = 0

    def joules(self, now: float) -> float:
        """Joules used since this reader was made (``now`` is unused: the counter is cumulative)."""
        for i, zone in enumerate(self._zones):
            value = read_counter(zone / "energy_uj")
            delta = value - self._last[i]
            if delta < 0:  # the counter wrapped around
                delta += self._ranges[i] + 1
            self._microjoules += delta
            self._last[i] = value
        return self._microjoules * 1e-6


class NvmlEnergy:
    """GPU energy from NVML (the optional ``nvidia-ml-py`` package): the board's total-energy
    counter where the GPU has one (Volta and newer), else its power reading integrated over the
    samples (trapezoids; as good as the sampling rate)."""

    def __init__(self, device: torch.device, now: float):
        try:
            import pynvml
        except ImportError:
            raise EnergyUnavailable("NVML needs the nvidia-ml-py package (pip install nvidia-ml-py)") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._handle = self._handle_of(device)
        except pynvml.NVMLError as err:
            raise EnergyUnavailable(f"NVML is not usable: {err}") from None
        try:
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.source = "NVML total energy counter"
        except pynvml.NVMLError:
            self._start_mj = None
            try:
                self._last_watts = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3
            except pynvml.NVMLError as err:
                raise EnergyUnavailable(f"NVML has neither an energy counter nor a power reading: {err}") from None
            self._last_time = now
            self._joules = 0.0
            self.source = "NVML power, integrated over samples"

    def _handle_of(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:  # CUDA_VISIBLE_DEVICES may renumber devices; the UUID does not change
            try:
                return self._nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except self._nvml.NVMLError:
                pass
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def joules(self, now: float) -> float:
        """Joules used since this reader was made."""
        if self._start_mj is not None:
            return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1e3
        watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3
        self._joules += 0.5 * (watts + self._last_watts) * (now - self._last_time)
        self._last_watts, self._last_time = watts, now
        return self._joules


def energy_reader(device: torch.device, now: float, powercap_root: str | Path = DEFAULT_POWERCAP_ROOT):
    """The reader for ``device`` (NVML for CUDA, RAPL for CPU); raises :class:`EnergyUnavailable`."""
    if device.type == "cuda":
        return NvmlEnergy(device, now)
    if device.type == "cpu":
        return RaplEnergy(powercap_root)
    raise EnergyUnavailable(f"no energy counter is known for {device.type} devices")
