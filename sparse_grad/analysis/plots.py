"""Plots of a heavy-tail analysis (matplotlib: ``pip install "sparse_grad[plots]"``).

Figures are drawn on ``matplotlib.figure.Figure`` objects and written with ``savefig``, without
pyplot, so they work headless and never change the caller's matplotlib backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .monitor import GradientSnapshot
from .report import ROOT, HeavyTailReport
from .stats import TOP_FRACTIONS, concentration_curve

__all__ = ["plot_concentration", "plot_module_heatmap", "plot_ranked_norms", "save_heavy_tail_figure",
           "save_module_heatmap"]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "sparse_grad[plots]"') from None
    return Figure(figsize=(width, height), layout="constrained")


def _all_scores(snapshot: GradientSnapshot) -> np.ndarray:
    return np.concatenate([s.double().numpy() for s in snapshot.scores.values()])


def plot_ranked_norms(ax, scores: np.ndarray, report: HeavyTailReport) -> None:
    """Block norms by rank on log-log axes, with the power-law fit over its tail."""
    norms = np.sort(np.sqrt(scores))[::-1]
    norms = norms[norms > 0]
    ranks = np.arange(1, norms.size + 1)
    ax.loglog(ranks, norms, ".", markersize=2, color="tab:blue", label="blocks")
    fit = report.overall.power_law
    if fit is not None:
        tail = ranks[:fit.tail_blocks]
        ax.loglog(tail, fit.ranked_line(tail), "-", color="tab:red", linewidth=1.5,
                  label=f"fit: α = {fit.alpha:.2f} ± {fit.alpha_stderr:.2f} (top {fit.tail_blocks})")
    ax.set_xlabel("rank")
    ax.set_ylabel("block gradient norm")
    ax.set_title("ranked block norms")
    ax.legend(loc="lower left", fontsize="small")


def plot_concentration(ax, scores: np.ndarray, report: HeavyTailReport) -> None:
    """Share of the gradient mass held by the heaviest fraction of blocks."""
    fraction, share = concentration_curve(scores)
    ax.plot(fraction, share, color="tab:blue", label=f"Gini {report.overall.gini:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="gray", label="uniform")
    for p in TOP_FRACTIONS:
        s = report.overall.top_shares[p]
        ax.plot([p], [s], "o", color="tab:red", markersize=4)
        ax.annotate(f"{p:.0%}: {s:.0%}", (p, s), textcoords="offset points", xytext=(6, -10), fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of blocks (heaviest first)")
    ax.set_ylabel("share of gradient mass")
    ax.set_title("concentration curve")
    ax.legend(loc="lower right", fontsize="small")


def plot_module_heatmap(ax, snapshot: GradientSnapshot, depth: int | None = None) -> None:
    """Each submodule's share of every recorded step's gradient mass."""
    modules, shares = snapshot.module_history(depth)
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(0.5, shares.shape[1] * snapshot.history_every + 0.5, len(modules) - 0.5, -0.5))
    ax.set_yticks(range(len(modules)), [m or ROOT for m in modules], fontsize="small")
    ax.set_xlabel("step")
    ax.set_title("share of gradient mass per submodule")
    ax.figure.colorbar(image, ax=ax, label="share of the step's mass")


def save_heavy_tail_figure(snapshot: GradientSnapshot, report: HeavyTailReport, path: str | os.PathLike,
                           *, dpi: int = 80) -> Path:
    """Ranked norms with the fit, and the concentration curve, side by side, as a PNG."""
    scores = _all_scores(snapshot)
    fig = _figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    plot_ranked_norms(left, scores, report)
    plot_concentration(right, scores, report)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_module_heatmap(snapshot: GradientSnapshot, path: str | os.PathLike, *, depth: int | None = None,
                        dpi: int = 80) -> Path:
    """The per-submodule heatmap over steps, as a PNG."""
    modules, _ = snapshot.module_history(depth)
    fig = _figure(9.0, 1.2 + 0.22 * len(modules))
    plot_module_heatmap(fig.subplots(), snapshot, depth)
    fig.savefig(path, dpi=dpi)
    return Path(path)
