"""The demo's PNG plots (matplotlib, drawn without pyplot like :mod:`sparse_grad.analysis.plots`)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..analysis.plots import _figure, save_heavy_tail_figure
from .experiment import TASKS, DemoResults

__all__ = ["save_all"]

COLORS = {"dense": "black", "norm": "tab:blue", "random": "tab:orange", "blueprint": "tab:green",
          "compact": "tab:purple", "interval": "tab:cyan", "fixed-layer": "tab:red"}
DPI = 90


def _style(summary, densities: Sequence[float]) -> dict:
    styles = ["-", "--", ":", "-."]
    line = "-" if summary.density in (None, 1.0) else styles[sorted(densities).index(summary.density) % 4] \
        if summary.density in densities else "-"
    return {"color": COLORS.get(summary.family, "gray"), "linestyle": line, "linewidth": 1.4}


def _mean_curve(summary, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The curve averaged over repeats (all repeats evaluate at the same steps)."""
    steps = np.array([p["step"] for p in summary.runs[0].curve])
    xs = np.array([statistics.fmean(r.curve[i][key] for r in summary.runs) for i in range(len(steps))])
    ys = np.array([statistics.fmean(r.curve[i]["val_loss"] for r in summary.runs) for i in range(len(steps))])
    return xs, ys


def save_all(results: DemoResults, summaries, out_dir: Path) -> list[Path]:
    densities = sorted({s.density for s in summaries if s.density not in (None, 1.0)})
    paths = [save_heavy_tail_figure(results.stage1.snapshot, results.stage1.report, out_dir / "heavy_tail.png",
                                    dpi=DPI)]

    fig = _figure(9.0, 4.2)
    left, right = fig.subplots(1, 2)
    stage1 = results.stage1.curve
    left.plot([p["step"] for p in stage1], [p["val_loss"] for p in stage1], "o-", color="black", markersize=3)
    left.set_title(f"stage 1: Python source ({results.stage1.stopped_by} stop)")
    left.set_xlabel("step")
    left.set_ylabel("validation loss (nats/byte)")
    for s in summaries:
        steps, losses = _mean_curve(s, "step")
        right.plot(steps, losses, label=s.name, **_style(s, densities))
    right.set_title(f"stage 2: {TASKS[results.config.task]}")
    right.set_xlabel("step")
    right.set_ylabel("held-out loss (nats/byte)")
    right.legend(fontsize="x-small", ncol=2)
    fig.savefig(out_dir / "loss_vs_step.png", dpi=DPI)
    paths.append(out_dir / "loss_vs_step.png")

    fig = _figure(9.0, 4.2)
    left, right = fig.subplots(1, 2)
    for s in summaries:
        seconds, losses = _mean_curve(s, "device_s")
        left.plot(seconds, losses, label=s.name, **_style(s, densities))
    left.set_xlabel("training time, device-seconds (ResourceMeter)")
    left.set_ylabel("held-out loss (nats/byte)")
    left.set_title("stage 2: loss vs resource")
    left.legend(fontsize="x-small", ncol=2)
    # Final loss against the share of blocks updated per step (the update's cost); dense at 1,
    # the fixed-layer baseline at the share of parameters it trains.
    for family in ("norm", "random", "blueprint", "compact"):
        points = sorted((s.density, s.val_loss) for s in summaries if s.family == family)
        if points:
            right.plot(*zip(*points), "o-", color=COLORS[family], label=family, markersize=4)
    for s in summaries:
        if s.family in ("dense", "fixed-layer"):
            x = 1.0 if s.family == "dense" else s.trained_fraction
            right.plot([x], [s.val_loss], "s", color=COLORS[s.family], label=s.name, markersize=6)
    right.set_xscale("log")
    right.set_xlabel("share of parameters updated per step (log)")
    right.set_ylabel("final held-out loss")
    right.set_title(f"after {results.config.stage2_steps} steps")
    right.legend(fontsize="x-small")
    fig.savefig(out_dir / "loss_vs_resource.png", dpi=DPI)
    paths.append(out_dir / "loss_vs_resource.png")

    fig = _figure(9.0, 3.6)
    ax = fig.subplots()
    window = max(1, results.config.stage2_steps // 30)
    for s in summaries:
        churn = s.runs[0].churn
        if not churn:
            continue
        smooth = np.convolve(churn, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(2 + window - 1, 2 + window - 1 + smooth.size), smooth, label=s.name, **_style(s, densities))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share of selected blocks new")
    ax.set_title(f"stage 2: mask churn between consecutive steps (moving mean over {window})")
    ax.legend(fontsize="x-small", ncol=3)
    fig.savefig(out_dir / "mask_churn.png", dpi=DPI)
    paths.append(out_dir / "mask_churn.png")
    return paths
