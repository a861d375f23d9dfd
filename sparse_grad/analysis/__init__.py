"""Gradient influence analysis: how concentrated the gradient mass is over blocks.

- :class:`GradientMonitor` accumulates per-block gradient mass over steps (from SparseAdamW's
  score hook, or one ``ops.block_sqnorms`` launch per ``update()`` for any optimizer).
- :func:`heavy_tail_report` turns block scores into per-tensor, per-submodule and whole-model
  statistics (:mod:`.stats`), including a power-law fit of the ranked norms (:mod:`.power_law`).
- :class:`MaskChurn` records how much of SparseAdamW's selection changes from step to step.
- :mod:`.plots` draws them (matplotlib, the ``plots`` extra).
"""
from .churn import MaskChurn
from .monitor import GradientMonitor, GradientSnapshot
from .power_law import PowerLawFit, fit_power_law
from .report import HeavyTailReport, heavy_tail_report, module_of
from .stats import (
    BlockStats,
    block_stats,
    concentration_curve,
    gini,
    smallest_k_holding,
    top_share,
)

__all__ = [
    "BlockStats",
    "GradientMonitor",
    "GradientSnapshot",
    "HeavyTailReport",
    "MaskChurn",
    "PowerLawFit",
    "block_stats",
    "concentration_curve",
    "fit_power_law",
    "gini",
    "heavy_tail_report",
    "module_of",
    "smallest_k_holding",
    "top_share",
]
