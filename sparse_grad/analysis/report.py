"""The heavy-tail report: block statistics per tensor, per submodule and for the whole model."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .stats import TOP_FRACTIONS, BlockStats, block_stats

__all__ = ["HeavyTailReport", "heavy_tail_report", "module_of", "scores_to_numpy"]

ROOT = "(root)"  # how reports print the module path "" (parameters of the model itself)


def module_of(name: str, depth: int | None = None) -> str:
    """The submodule a parameter belongs to: its path without the last component
    (``"blocks.layers.0.linear1.weight"`` → ``"blocks.layers.0.linear1"``), cut to the first
    ``depth`` components if given (depth 3 → ``"blocks.layers.0"``); ``""`` for the model itself."""
    parts = name.split(".")[:-1]
    return ".".join(parts if depth is None else parts[:depth])


def scores_to_numpy(scores: Mapping[str, object]) -> dict[str, np.ndarray]:
    """``{name: 1-D float64 array}`` from tensors (any device) or array-likes; checks the values."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping of parameter name to block scores, got {type(scores).__name__}")
    out = {}
    for name, value in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores keys must be parameter names (str), got {type(name).__name__}")
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64).numpy()
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"scores[{name!r}] must be 1-D (one score per block), got shape {array.shape}")
        if np.any(array < 0) or not np.all(np.isfinite(array)):
            raise ValueError(f"scores[{name!r}] must be finite and >= 0 (sums of squares)")
        out[name] = array
    return out


@dataclass(frozen=True)
class HeavyTailReport:
    """Statistics (:class:`BlockStats`) of the whole model, each submodule and each tensor."""

    overall: BlockStats
    modules: dict  # {module path: BlockStats}, in the order the modules first appear
    tensors: dict  # {parameter name: BlockStats}
    depth: int | None
    target_share: float
    block_size: int | None = None
    steps: int | None = None
    accumulate: str | None = None

    def as_dict(self) -> dict:
        """JSON-ready form (NaN as ``None``)."""
        return {
            "block_size": self.block_size, "steps": self.steps, "accumulate": self.accumulate,
            "depth": self.depth, "target_share": self.target_share,
            "overall": self.overall.as_dict(),
            "modules": {m: s.as_dict() for m, s in self.modules.items()},
            "tensors": {t: s.as_dict() for t, s in self.tensors.items()},
        }

    def to_text(self, *, per_tensor: bool = False) -> str:
        """A printable report: a summary, then one row per submodule (and per tensor)."""
        o = self.overall
        title = f"heavy-tail report: {o.num_blocks:,} blocks"
        if self.block_size is not None:
            title += f" of {self.block_size} elements"
        if self.steps is not None:
            title += f", {self.steps} step{'s' if self.steps != 1 else ''}"
            title += f" ({self.accumulate})" if self.accumulate else ""
        legend = ("mass = sum of squares of a block's gradient; shares and Gini are of mass; "
                  "‖g‖ = block norm; α: ‖g‖ ∝ rank^-α (Hill MLE on the tail)")
        lines = [title, legend, ""]
        shares = ", ".join(f"top {p:.0%} hold {_pct(o.top_shares[p])}" for p in TOP_FRACTIONS)
        lines.append(f"all blocks: {shares} of the mass; Gini {_num(o.gini, 3)}")
        if o.power_law is not None:
            f = o.power_law
            lines.append(f"  α = {f.alpha:.3f} ± {f.alpha_stderr:.3f} on the top {f.tail_blocks:,} blocks "
                         f"(norm > {f.xmin:.3g}; KS distance {f.ks:.3f}, "
                         f"{'a plausible power law' if f.plausible else 'rejected as a power law at 5%'})")
        lines.append(f"  {_pct(self.target_share)} of the mass lies in {o.recommended_k:,} blocks "
                     f"(density {_num(o.recommended_density, 4)})")
        lines.append("")
        lines += _table("module", self.modules, o.mass)
        if per_tensor:
            lines.append("")
            lines += _table("tensor", self.tensors, o.mass)
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _table(label: str, rows: Mapping[str, BlockStats], total_mass: float) -> list[str]:
    width = max([len(label)] + [len(name or ROOT) for name in rows])
    tops = "".join(f"{f'top{p:.0%}':>8}" for p in TOP_FRACTIONS)
    header = (f"{label:<{width}} {'blocks':>7} {'mass':>7} {'mean‖g‖':>9} {'med‖g‖':>9} {'max‖g‖':>9}"
              f"{tops} {'Gini':>6} {'α':>6} {'±':>5} {'tail':>6} {'KS':>6} {'k':>6} {'density':>8}")
    lines = [header]
    for name, s in rows.items():
        fit = s.power_law
        fit_cells = (f"{fit.alpha:>6.2f} {fit.alpha_stderr:>5.2f} {fit.tail_blocks:>6} {fit.ks:>6.3f}"
                     if fit is not None else f"{'-':>6} {'-':>5} {'-':>6} {'-':>6}")
        share = s.mass / total_mass if total_mass > 0 else math.nan
        lines.append(
            f"{name or ROOT:<{width}} {s.num_blocks:>7} {_pct(share):>7} {s.mean_norm:>9.3g} "
            f"{s.median_norm:>9.3g} {s.max_norm:>9.3g}"
            + "".join(f"{_pct(s.top_shares[p]):>8}" for p in TOP_FRACTIONS)
            + f" {_num(s.gini, 3):>6} {fit_cells} {s.recommended_k:>6} {_num(s.recommended_density, 3):>8}")
    return lines


def heavy_tail_report(scores: Mapping[str, object], *, depth: int | None = None, target_share: float = 0.9,
                      block_size: int | None = None, steps: int | None = None,
                      accumulate: str | None = None) -> HeavyTailReport:
    """Statistics of block ``scores`` for the whole model, each submodule and each tensor.

    Args:
        scores: ``{parameter name: 1-D block scores}`` (tensors on any device or arrays), e.g.
            ``GradientMonitor.scores()`` or one step's ``ops.block_sqnorms`` split per tensor.
        depth: submodules are parameter paths without the last component, cut to ``depth``
            components if given (see :func:`module_of`).
        target_share: the share of mass the recommended ``k`` of each group must hold.
        block_size, steps, accumulate: where the scores came from, for the printed header.
    """
    if depth is not None:
        _checks.positive_int(depth, "depth")
    target_share = _checks.unit_interval(target_share, "target_share")
    if target_share == 0.0:
        raise ValueError("target_share must be in (0, 1], got 0.0")
    arrays = scores_to_numpy(scores)
    if not arrays:
        raise ValueError("scores is empty: no parameters to report on")
    grouped: dict[str, list[np.ndarray]] = {}
    for name, array in arrays.items():
        grouped.setdefault(module_of(name, depth), []).append(array)
    return HeavyTailReport(
        overall=block_stats("", np.concatenate(list(arrays.values())), target_share=target_share),
        modules={m: block_stats(m, np.concatenate(parts), target_share=target_share) for m, parts in grouped.items()},
        tensors={name: block_stats(name, array, target_share=target_share) for name, array in arrays.items()},
        depth=depth, target_share=target_share, block_size=block_size, steps=steps, accumulate=accumulate)
