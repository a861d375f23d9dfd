"""A benchmark run as a table, CSV, JSON (with the machine, card, versions and date) and a plot."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
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


def table(results: Sequence[Result]) -> str:
    lines = [f"{'shapes':<10} {'case':<22} {'density':>7} {'median ms':>10} {'GB/s':>8} {'% ideal':>8} "
             f"{'vs fused':>9}"]
    for r in results:
        density = "" if r.density is None else f"{r.density:g}"
        lines.append(f"{r.shapes:<10} {r.case:<22} {density:>7} {1e3 * r.seconds:>10.3f} {r.gbps:>8.1f} "
                     f"{r.pct_ideal:>7.0f}% {r.speedup:>8.2f}x")
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


def write_json(path: Path, results: Sequence[Result], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [r.as_dict() for r in results]}, f, indent=1)


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
