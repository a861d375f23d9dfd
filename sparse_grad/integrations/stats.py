"""What the trainer callbacks log (:mod:`.hf`, :mod:`.lightning`): one implementation, so both
report the same figures under the same names.

Figures (keys prefixed ``sparse_grad/``):

``grad_gini``, ``grad_top_share``   Gini coefficient of the per-block gradient mass, and the share
                                     of it in the top ``top_fraction`` of blocks, over the steps
                                     since the last log (a :class:`~sparse_grad.analysis.GradientMonitor`
                                     fed by SparseAdamW's score hook, reset at each log)
``mask_churn``                       mean share of the selected blocks that were new from one step
                                     to the next, since the last log
``device_hours``, ``memory_gib_hours``, ``state_gib_hours``, ``peak_memory_gib``, ``energy_j``
                                     the :class:`~sparse_grad.cpr.ResourceMeter` totals since the
                                     start of training (energy only where a counter is readable)
``cpr``                              at each evaluation: ΔΨ/ΔΓ since the previous one, Ψ the
                                     evaluation metric (negated where lower is better) and Γ the
                                     chosen resource
``cpr_windowed``                     the :class:`~sparse_grad.cpr.MarginalReturnStopper`'s windowed
                                     return, once it has one

Cost: the score hook makes every SparseAdamW step run its norm pass (see
``SparseAdamW.register_score_hook``); ``gradient_stats=False`` avoids it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _checks
from ..analysis import GradientMonitor, MaskChurn, gini, top_share
from ..cpr import RESOURCES, MarginalReturnStopper, ResourceMeter

__all__ = ["PREFIX", "TrainingStats"]

PREFIX = "sparse_grad/"


class TrainingStats:
    """Gradient statistics, resource figures and CPR of one training run.

    Args:
        gradient_stats: log the gradient Gini, top share and mask churn (needs SparseAdamW,
            all of whose groups share one block size).
        resources: log the ResourceMeter figures.
        stopper: a :class:`~sparse_grad.cpr.MarginalReturnStopper`, fed at every evaluation;
            when it says stop, :meth:`evaluated` returns True.
        metric: the name of the evaluation metric Ψ is taken from.
        greater_is_better: False for a loss (Ψ = −metric).
        resource: the Γ of CPR, one of ``sparse_grad.cpr.RESOURCES``.
        top_fraction: the fraction of blocks whose share of the mass ``grad_top_share`` is.
    """

    def __init__(self, *, gradient_stats: bool = True, resources: bool = True,
                 stopper: MarginalReturnStopper | None = None, metric: str = "eval_loss",
                 greater_is_better: bool = False, resource: str = "device_hours", top_fraction: float = 0.05):
        self.gradient_stats = _checks.flag(gradient_stats, "gradient_stats")
        self.resources = _checks.flag(resources, "resources")
        if stopper is not None and not isinstance(stopper, MarginalReturnStopper):
            raise TypeError(f"stopper must be a sparse_grad.cpr.MarginalReturnStopper, got {type(stopper).__name__}")
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"metric must be a metric name, got {metric!r}")
        self.stopper = stopper
        self.metric = metric
        self.greater_is_better = _checks.flag(greater_is_better, "greater_is_better")
        self.resource = _checks.choice(resource, RESOURCES, "resource")
        self.top_fraction = _checks.density(top_fraction, "top_fraction")
        self.monitor: GradientMonitor | None = None
        self.churn: MaskChurn | None = None
        self.meter: ResourceMeter | None = None
        self._handles: list = []
        self._churn_at_log = 0
        self._last: tuple[float, float] | None = None  # (psi, gamma) at the previous evaluation

    def begin(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start: attach the monitor and the churn hook to ``optimizer``, start the meter."""
        self.end()
        if self.gradient_stats:
            if not hasattr(optimizer, "register_score_hook"):
                raise TypeError(f"gradient_stats needs SparseAdamW's score hook; the optimizer is "
                                f"{type(optimizer).__name__} (pass gradient_stats=False)")
            sizes = {g["block_size"] for g in optimizer.param_groups}
            if len(sizes) != 1:
                raise ValueError(f"gradient_stats needs one block size in all param groups, got {sorted(sizes)}")
            self.monitor = GradientMonitor(model, block_size=sizes.pop())
            self.churn = MaskChurn()
            self._handles = [self.monitor.attach(optimizer), optimizer.register_score_hook(self.churn)]
        if self.resources or self.stopper is not None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self.meter = ResourceMeter(device, optimizer=optimizer).start()
            self._handles.append(self.meter.attach(optimizer))
        self._last = None
        self._churn_at_log = 0

    def figures(self) -> dict[str, float]:
        """The figures since the last call (gradient statistics, churn) and so far (resources)."""
        out: dict[str, float] = {}
        if self.monitor is not None and self.monitor.steps:
            scores = self.monitor.scores()
            mass = np.concatenate([s.detach().cpu().numpy() for s in scores.values()]) if scores else np.zeros(0)
            out[PREFIX + "grad_gini"] = gini(mass)
            out[PREFIX + "grad_top_share"] = top_share(mass, self.top_fraction)
            self.monitor.reset()
        if self.churn is not None:
            self.churn.flush()
            recent = self.churn.churn[self._churn_at_log:]
            self._churn_at_log = len(self.churn.churn)
            if recent:
                out[PREFIX + "mask_churn"] = float(np.mean(recent))
        if self.meter is not None and self.resources:
            report = self.meter.report()
            for key in ("device_hours", "memory_gib_hours", "state_gib_hours", "peak_memory_gib", "energy_j"):
                value = getattr(report, key)
                if value is not None:
                    out[PREFIX + key] = float(value)
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def evaluated(self, value: float) -> tuple[dict[str, float], bool]:
        """Record an evaluation's metric: ``({"sparse_grad/cpr": ..., ...}, stop)``."""
        value = _checks.finite(value, self.metric)
        if self.meter is None:
            return {}, False
        psi = value if self.greater_is_better else -value
        gamma = self.meter.gamma(self.resource)
        out = {}
        if self._last is not None and gamma > self._last[1]:
            out[PREFIX + "cpr"] = (psi - self._last[0]) / (gamma - self._last[1])
        stop = False
        if self.stopper is not None and (self._last is None or gamma > self._last[1]):
            stop = self.stopper.update(psi, gamma)
            if self.stopper.returns:
                out[PREFIX + "cpr_windowed"] = self.stopper.returns[-1]
        self._last = (psi, gamma)
        return out, stop

    def end(self) -> None:
        """Stop the meter and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.meter is not None:
            self.meter.stop()
