"""MarginalReturnStopper: stop training when capability gained per resource spent runs low."""
from __future__ import annotations

import torch

from .. import _checks

__all__ = ["MarginalReturnStopper"]


class MarginalReturnStopper:
    r"""Stop when the marginal return CPR = ΔΨ/ΔΓ stays below ``eta``.

    Feed it one check at a time — ``update(psi, gamma)`` with the metric Ψ (higher is better,
    e.g. ``-val_loss``) and the resources Γ spent so far (e.g.
    ``ResourceMeter.gamma("device_hours")``). From the ``window + 1``-th check on, the windowed
    marginal return is

        CPR_t = (Ψ_t − Ψ_{t−window}) / (Γ_t − Γ_{t−window}),

    the mean of the per-check returns ΔΨ/ΔΓ over the last ``window`` checks, each weighted by
    the resources it cost (the plain mean when checks are evenly spaced in Γ). Training should
    stop once CPR_t < ``eta`` at ``patience`` consecutive checks; ``update`` then returns True
    (and keeps doing so).

    Units: ``eta`` is in Ψ per unit of Γ — e.g. loss improvement per device-hour.
    """

    def __init__(self, window: int = 5, eta: float = 0.0, patience: int = 3):
        self.window = _checks.positive_int(window, "window")
        self.patience = _checks.positive_int(patience, "patience")
        self.eta = _finite(eta, "eta")
        self.psi: list[float] = []
        self.gamma: list[float] = []
        self.returns: list[float] = []  # CPR_t for every check from the (window+1)-th on
        self.below = 0  # consecutive checks with CPR_t < eta
        self.stopped_at: int | None = None  # index of the check that triggered the stop

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def update(self, psi: float, gamma: float) -> bool:
        """Record a check; return whether training should stop."""
        psi = _finite(psi, "psi")
        gamma = _finite(gamma, "gamma")
        if self.gamma and gamma <= self.gamma[-1]:
            raise ValueError(f"gamma must increase from check to check: got {gamma} after {self.gamma[-1]}")
        self.psi.append(psi)
        self.gamma.append(gamma)
        if len(self.psi) > self.window:
            cpr = (psi - self.psi[-1 - self.window]) / (gamma - self.gamma[-1 - self.window])
            self.returns.append(cpr)
            self.below = self.below + 1 if cpr < self.eta else 0
            if self.stopped_at is None and self.below >= self.patience:
                self.stopped_at = len(self.psi) - 1
        return self.should_stop


def _finite(value, name: str) -> float:
    """A finite float from a real number or a one-element tensor (e.g. an undetached loss)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return _checks.finite(value, name)
