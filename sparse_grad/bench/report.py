"""A benchmark run as a table, CSV, JSON (with the machine, card, versions and date) and a plot."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from .suite import Result, ideal_bytes

__all__ = ["machine_info", "plot", "table", "write_csv", "write_json"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where and when: CPU, cores, torch threads, card, versions, UTC date."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{p: _version(p) for p in ("triton", "numpy", "sparse_grad")}},
    }


def _number(value: float | None, width: int, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value`` formatted to ``width``, or "-" where it was not measured (NaN or None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{format(value if scale == 1.0 else scale * value, spec)}{suffix}".rjust(width)


def table(results: Sequence[Result]) -> str:
    """One row per result: synced and pipelined ms per step, the rate and % of ideal (synced),
    the speed-up vs torch fused AdamW both ways, host µs per step and Python calls per step;
    the host time before the first kernel launch where it was measured (CUDA). "-": not
    measured for that case."""
    before_launch = any(not math.isnan(r.host_before_launch_seconds) for r in results)
    lines = [f"{'shapes':<10} {'case':<22} {'density':>7} {'synced ms':>10} {'pipelined ms':>12} {'GB/s':>8} "
             f"{'% ideal':>8} {'vs fused':>9} {'pipelined vs fused':>18} {'host µs':>9}"
             + (f" {'pre-launch µs':>13}" if before_launch else "") + f" {'py calls':>8}"]
    for r in results:
        density = "" if r.density is None else f"{r.density:g}"
        lines.append(f"{r.shapes:<10} {r.case:<22} {density:>7} {_number(r.seconds, 10, '.3f', 1e3)} "
                     f"{_number(r.seconds_pipelined, 12, '.3f', 1e3)} {_number(r.gbps, 8, '.1f')} "
                     f"{_number(r.pct_ideal, 8, '.0f', suffix='%')} {_number(r.speedup, 9, '.2f', suffix='x')} "
                     f"{_number(r.speedup_pipelined, 18, '.2f', suffix='x')} {_number(r.host_seconds, 9, '.1f', 1e6)}"
                     + (f" {_number(r.host_before_launch_seconds, 13, '.1f', 1e6)}" if before_launch else "")
                     + f" {_number(r.python_calls, 8, 'd')}")
    return "\n".join(lines)


def write_csv(path: Path, results: Sequence[Result], meta: dict) -> None:
    """One row per result; the run's description repeated on every row, so rows stand alone."""
    flat_meta = {k: v for k, v in meta.items() if k != "versions"}
    flat_meta.update({f"{k}_version": v for k, v in meta.get("versions", {}).items()})
    rows = [{**r.as_dict(), **flat_meta} for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _null_for_nan(row: dict) -> dict:
    """``row`` with NaN (not measured) as None: JSON has no NaN, and strict readers refuse it."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def write_json(path: Path, results: Sequence[Result], meta: dict) -> None:
    """The run's description and one object per result; unmeasured values are null."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [_null_for_nan(r.as_dict()) for r in results]}, f, indent=1,
                  allow_nan=False)


def plot(path: Path, results: Sequence[Result], title: str) -> None:
    """Speed-up vs torch fused AdamW against density, one line per backend and shape set, with
    the ideal curve: the ideal bytes moved at the copy's bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for shapes in dict.fromkeys(r.shapes for r in results):
        rows = [r for r in results if r.shapes == shapes]
        copy = next(r for r in rows if r.case == "copy")
        fused = next(r for r in rows if r.case == "torch AdamW fused")
        bandwidth = copy.ideal_bytes / copy.seconds
        densities = sorted({r.density for r in rows if r.density is not None})
        if densities:
            grid = [min(densities) * (1.0 / min(densities)) ** (i / 99) for i in range(100)]
            params = copy.ideal_bytes / 8
            ax.plot(grid, [fused.seconds / (ideal_bytes(params, d) / bandwidth) for d in grid], "k--", lw=1,
                    label=f"ideal at copy bandwidth ({shapes})")
        for case in dict.fromkeys(r.case for r in rows if r.density is not None):
            points = sorted((r.density, r.speedup) for r in rows if r.case == case)
            ax.plot(*zip(*points), "o-", label=f"{case.split()[-1]} ({shapes})")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("speed-up vs torch AdamW fused")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
