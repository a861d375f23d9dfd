"""Summary statistics of block scores.

Vocabulary (used the same way in reports, blueprints and plots):

- a block's **score** or **gradient mass** is the sum of squares of the gradient over the block
  (what ``sparse_grad.ops.block_sqnorms`` returns); its **norm** is the square root of that.
- ``mean_norm``, ``median_norm`` and ``max_norm`` are taken over block norms.
- **shares** and the **concentration curve** are of mass: the share of the total held by the
  top ``ceil(p · n)`` blocks (the same count ``density=p`` selects).
- the **Gini coefficient** is of mass too, so it is one number for the same curve:
  ``G = 1 − 2 · (area under the Lorenz curve)``; 0 when every block holds the same mass,
  ``1 − 1/n`` when one block holds all of it.
- the **power-law fit** is of the ranked norms (``norm ∝ rank^−α``, see :mod:`.power_law`).
- the **recommended k** of a group is the smallest number of its blocks that holds
  ``target_share`` of its mass; ``recommended_density = k / n``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import ops
from .power_law import PowerLawFit, fit_power_law

__all__ = [
    "TOP_FRACTIONS",
    "BlockStats",
    "block_stats",
    "concentration_curve",
    "gini",
    "smallest_k_holding",
    "top_share",
]

TOP_FRACTIONS = (0.01, 0.05, 0.10, 0.20)


def _mass(scores) -> np.ndarray:
    mass = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.any(mass < 0) or not np.all(np.isfinite(mass)):
        raise ValueError("block scores must be finite and >= 0 (sums of squares)")
    return mass


def concentration_curve(scores) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction of blocks, share of mass)`` with the heaviest blocks first: point ``i`` is the
    share held by the ``i`` heaviest blocks, ``i = 0 .. n``. Shares are NaN if the mass is 0."""
    mass = np.sort(_mass(scores))[::-1]
    total = mass.sum()
    cumulative = np.concatenate([[0.0], np.cumsum(mass)])
    share = cumulative / total if total > 0 else np.full_like(cumulative, math.nan)
    return np.arange(mass.size + 1) / max(mass.size, 1), share


def top_share(scores, fraction: float) -> float:
    """Share of the mass held by the top ``ceil(fraction · n)`` blocks (NaN if the mass is 0)."""
    mass = np.sort(_mass(scores))[::-1]
    total = mass.sum()
    if total <= 0:
        return math.nan
    return float(mass[:ops.num_selected(fraction, mass.size)].sum() / total)


def gini(scores) -> float:
    """Gini coefficient of the mass (NaN if there is none): ``Σᵢ (2i − n − 1) mᵢ / (n Σ m)`` over
    the masses sorted ascending, ``i = 1 .. n``."""
    mass = np.sort(_mass(scores))
    total = mass.sum()
    if mass.size == 0 or total <= 0:
        return math.nan
    n = mass.size
    return float(np.sum((2 * np.arange(1, n + 1) - n - 1) * mass) / (n * total))


def smallest_k_holding(scores, target_share: float) -> int:
    """The fewest blocks that hold at least ``target_share`` of the mass (0 if there is none)."""
    mass = np.sort(_mass(scores))[::-1]
    total = mass.sum()
    if total <= 0:
        return 0
    cumulative = np.cumsum(mass) / total
    # Rounding can leave the full sum a hair under 1: never ask for more blocks than exist.
    return int(min(np.searchsorted(cumulative, target_share * (1 - 1e-12)) + 1, mass.size))


@dataclass(frozen=True)
class BlockStats:
    """Statistics of one group of blocks (a tensor, a submodule or the whole model)."""

    name: str
    num_blocks: int
    mass: float  # total gradient mass (sum of block scores)
    mean_norm: float
    median_norm: float
    max_norm: float
    top_shares: dict = field(default_factory=dict)  # {fraction: share of mass}, TOP_FRACTIONS
    gini: float = math.nan
    power_law: PowerLawFit | None = None
    recommended_k: int = 0
    recommended_density: float = math.nan
    target_share: float = math.nan

    def as_dict(self) -> dict:
        """JSON-ready: NaN becomes ``None``, share keys become strings like ``"0.2"``."""
        def clean(value):
            return None if isinstance(value, float) and math.isnan(value) else value
        return {
            "name": self.name, "num_blocks": self.num_blocks, "mass": clean(self.mass),
            "mean_norm": clean(self.mean_norm), "median_norm": clean(self.median_norm),
            "max_norm": clean(self.max_norm),
            "top_shares": {f"{p:g}": clean(v) for p, v in self.top_shares.items()},
            "gini": clean(self.gini),
            "power_law": None if self.power_law is None else self.power_law.as_dict(),
            "recommended_k": self.recommended_k,
            "recommended_density": clean(self.recommended_density),
            "target_share": clean(self.target_share),
        }


def block_stats(name: str, scores, *, target_share: float = 0.9, fit: bool = True) -> BlockStats:
    """All statistics of one group's block ``scores`` (see the module docstring)."""
    mass = _mass(scores)
    norms = np.sqrt(mass)
    k = smallest_k_holding(mass, target_share)
    return BlockStats(
        name=name,
        num_blocks=int(mass.size),
        mass=float(mass.sum()),
        mean_norm=float(norms.mean()) if mass.size else math.nan,
        median_norm=float(np.median(norms)) if mass.size else math.nan,
        max_norm=float(norms.max()) if mass.size else math.nan,
        top_shares={p: top_share(mass, p) for p in TOP_FRACTIONS},
        gini=gini(mass),
        power_law=fit_power_law(norms) if fit else None,
        recommended_k=k,
        recommended_density=k / mass.size if mass.size and k else math.nan,
        target_share=float(target_share),
    )
