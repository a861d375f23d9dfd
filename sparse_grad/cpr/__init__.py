"""Compute per resource (CPR = ΔΨ/ΔΓ): judge training by capability gained per resource spent.

- :class:`ResourceMeter` accounts Γ (device-hours, memory × time, optimizer state × time,
  energy where a real counter exists).
- Ψ is whatever metric you pass (e.g. negative validation loss).
- :class:`MarginalReturnStopper` says when the windowed marginal return falls below a
  threshold for long enough.
"""
from .energy import EnergyUnavailable
from .meter import RESOURCES, ResourceMeter, ResourceReport
from .stopper import MarginalReturnStopper

__all__ = ["RESOURCES", "EnergyUnavailable", "MarginalReturnStopper", "ResourceMeter", "ResourceReport"]
