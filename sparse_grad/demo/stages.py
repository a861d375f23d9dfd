"""The two stages of the demo: dense pretraining that records a blueprint, and a generic runner
that trains one stage-2 :class:`~.variants.Variant` and measures it.

:func:`run_variant` knows nothing about the variants it runs: it takes the start weights, the
training batches and the validation batches, so other experiments (e.g. data selection) reuse it.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from .. import _checks
from ..analysis import GradientMonitor, GradientSnapshot, HeavyTailReport
from ..blueprint import Blueprint
from ..cpr import MarginalReturnStopper, ResourceMeter
from ..cpr.meter import optimizer_state_bytes
from .model import lm_loss
from ..analysis.churn import MaskChurn
from ..progress import Progress
from .variants import Variant

__all__ = ["Stage1Result", "VariantResult", "evaluate", "run_stage1", "run_variant", "tensor_bytes"]

Batch = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_batches: Sequence[Batch], device: torch.device) -> list[float]:
    """Mean next-byte loss of ``model`` on each of ``val_batches`` (the same batches every call)."""
    was_training = model.training
    model.eval()
    losses = [lm_loss(model, x.to(device), y.to(device)).item() for x, y in val_batches]
    model.train(was_training)
    return losses


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MeteredSegments:
    """ResourceMeter readings summed over the training segments between evaluations, so that Γ
    counts training only (each evaluation would otherwise add the same cost to every variant)."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer):
        self.device, self.optimizer = device, optimizer
        self.totals = {"elapsed_s": 0.0, "device_hours": 0.0, "memory_gib_hours": 0.0, "state_gib_hours": 0.0}
        self.energy_j: float | None = 0.0
        self.energy_note = ""
        self.memory_source = ""
        self.peak_memory_gib = 0.0
        self._meter: ResourceMeter | None = None

    def begin(self) -> None:
        self._meter = ResourceMeter(self.device).start()
        self._handle = self._meter.attach(self.optimizer)

    def end(self) -> None:
        if self._meter is None:
            return
        self._handle.remove()
        self._meter.stop()
        report = self._meter.report()
        self._meter = None
        for key in self.totals:
            self.totals[key] += getattr(report, key) or 0.0
        self.peak_memory_gib = max(self.peak_memory_gib, report.peak_memory_gib or 0.0)
        self.memory_source = report.memory_source
        if report.energy_j is None:
            self.energy_j, self.energy_note = None, report.energy_unavailable or ""
        elif self.energy_j is not None:
            self.energy_j += report.energy_j
            self.energy_note = report.energy_source or ""

    def as_dict(self) -> dict:
        return {**self.totals, "peak_memory_gib": self.peak_memory_gib, "memory_source": self.memory_source,
                "energy_j": self.energy_j, "energy_note": self.energy_note}


# --------------------------------------------------------------------------------------------
# Stage 1


@dataclass
class Stage1Result:
    steps: int
    stopped_by: str  # "stopper" (marginal return below eta) or "cap" (the step cap)
    curve: list[dict]  # {"step", "train_loss", "val_loss", "device_s"} at every check
    cpr: list[float]  # the stopper's windowed marginal returns, Ψ (−val loss) per million tokens
    eta: float
    resources: dict
    train_loss_start: float
    blueprint_path: str
    state: dict[str, torch.Tensor] = field(repr=False)  # the model's weights at the end (CPU copies)
    snapshot: GradientSnapshot = field(repr=False)
    report: HeavyTailReport = field(repr=False)

    def summary(self) -> dict:
        # Field by field: asdict() would deep-copy the weights and the snapshot.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("state", "snapshot", "report")}
        overall = self.report.overall
        fit = overall.power_law
        d["heavy_tail"] = {"blocks": overall.num_blocks, "gini": overall.gini,
                           "top_shares": {f"{p:g}": s for p, s in overall.top_shares.items()},
                           "power_law_alpha": fit.alpha if fit else None,
                           "power_law_tail_blocks": fit.tail_blocks if fit else None,
                           "power_law_ks": fit.ks if fit else None,
                           "recommended_density": overall.recommended_density}
        return d


def run_stage1(model: torch.nn.Module, train: Iterable[Batch], val_batches: Sequence[Batch], *, steps: int,
               lr: float, weight_decay: float, block_size: int, check_every: int, stopper: MarginalReturnStopper,
               blueprint_path, device: torch.device, target_share: float = 0.9,
               blueprint_beta: float | None = None, progress: bool = True) -> Stage1Result:
    """Dense AdamW "pretraining" with a GradientMonitor and a ResourceMeter, stopped by
    ``stopper`` or after ``steps``; saves the blueprint of the recorded block scores to
    ``blueprint_path``: their mean over the stage, or with ``blueprint_beta`` their exponential
    moving average with that factor (a second monitor), which weighs the last ~1/(1 − beta) steps
    most: the blueprint of where training ended, not of its early transient.

    The stopper sees Ψ = −validation loss and Γ = training tokens in millions: compute for a
    fixed model, and unlike device-hours the same on every machine, so where stage 1 stops does
    not depend on how busy the machine is. The ResourceMeter's readings go into the result."""
    _checks.positive_int(steps, "steps")
    _checks.positive_int(check_every, "check_every")
    monitor = GradientMonitor(model, block_size=block_size)
    late = None if blueprint_beta is None else GradientMonitor(model, block_size=block_size, accumulate="ema",
                                                                 beta=blueprint_beta)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    meter = _MeteredSegments(device, opt)
    bar = Progress(steps, "stage 1: dense AdamW on Python source", enabled=progress)
    curve, window, stopped_by, step, first = [], [], "cap", 0, None
    meter.begin()
    for step, (x, y) in enumerate(train, 1):
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        monitor.update()
        if late is not None:
            late.update()
        opt.step()
        window.append(loss.item())
        first = window[0] if first is None else first
        if step % check_every == 0 or step == steps:
            meter.end()
            val = statistics.fmean(evaluate(model, val_batches, device))
            device_s = meter.totals["elapsed_s"]
            curve.append({"step": step, "train_loss": statistics.fmean(window), "val_loss": val, "device_s": device_s})
            window = []
            bar.update(0, f"val loss {val:.3f}")
            if stopper.update(-val, step * x.numel() / 1e6):
                stopped_by = "stopper"
                bar.update(1)
                break
            meter.begin()
        bar.update(1)
        if step >= steps:
            break
    meter.end()
    if not curve:
        raise ValueError("train gave no batches")
    bar.close(f"{step} steps ({'stopped: marginal return below eta' if stopped_by == 'stopper' else 'step cap'})")

    snapshot = monitor.snapshot()
    report = snapshot.report(target_share=target_share)
    recorded = snapshot if late is None else late.snapshot()
    Blueprint.from_monitor(recorded, target_share=target_share).save(blueprint_path)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return Stage1Result(steps=step, stopped_by=stopped_by, curve=curve, cpr=list(stopper.returns), eta=stopper.eta,
                        resources=meter.as_dict(), train_loss_start=first, blueprint_path=str(blueprint_path),
                        state=state, snapshot=snapshot, report=report)


# --------------------------------------------------------------------------------------------
# Stage 2


@dataclass
class VariantResult:
    name: str
    family: str
    density: float | None
    seed: int
    steps: int
    curve: list[dict]  # {"step", "train_loss", "val_loss", "device_s"}; step 0 = the start weights
    val_losses: list[float]  # final loss on each validation batch (for paired comparisons)
    val_loss: float
    val_stderr: float  # standard error of val_loss over the validation batches
    optimizer_ms: float  # median time of optimizer.step()
    step_ms: float  # median time of a whole step (forward, backward, optimizer)
    state_bytes: int  # optimizer-state tensors at the end
    trained_fraction: float  # parameters given to the optimizer / all parameters
    footprint_bytes: int  # parameters + grads + optimizer state at the end of a step
    resources: dict  # ResourceMeter totals over the training segments
    churn: list[float] = field(default_factory=list)  # per step: share of selected blocks new since the last step
    note: str = ""
    hyper: dict = field(default_factory=dict)  # the variant's tunable hyper-parameters (lr, ...) in this run
    tune_loss: float | None = None  # final mean loss on the tuning split (hyper-parameters are chosen by it)
    twin_of: str | None = None  # the variant this one trains to the same numbers as (Variant.twin_of)

    def as_dict(self) -> dict:
        return asdict(self)


def run_variant(variant: Variant, make_model: Callable[[], torch.nn.Module],
                train: Iterable[Batch] | Callable[[torch.nn.Module], Iterable[Batch]],
                val_batches: Sequence[Batch], *, steps: int, eval_every: int, device: torch.device, seed: int = 0,
                progress: bool = True, label: str | None = None,
                loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
                tune_batches: Sequence[Batch] | None = None) -> VariantResult:
    """Train ``variant`` for ``steps`` steps on ``train`` from ``make_model()`` (a fresh model
    with the start weights, on ``device``) and measure it.

    ``train`` is an iterable of ``(inputs, targets)`` batches, or a callable that receives the
    model being trained and returns one (for batches chosen by looking at the model, e.g. data
    selection); the batches are drawn lazily, one per step, outside the timed region.

    Evaluates on ``val_batches`` at the start and every ``eval_every`` steps; times
    ``optimizer.step()`` alone and the whole step (synchronizing on CUDA); meters the resources
    of the training steps (not the evaluations) with :class:`~sparse_grad.cpr.ResourceMeter`;
    records the mask churn of SparseAdamW from its selection after each step. With ``tune_batches`` (a split
    disjoint from ``val_batches``), the final model is also evaluated on them: ``tune_loss``, what
    hyper-parameters are chosen by, so the reported ``val_loss`` stays an unbiased estimate.
    """
    _checks.positive_int(steps, "steps")
    _checks.positive_int(eval_every, "eval_every")
    model = make_model()
    opt = variant.build(model, seed)
    if callable(train) and not hasattr(train, "__iter__"):
        train = train(model)
    params = list(model.parameters())
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    trained_fraction = sum(p.numel() for p in params if id(p) in trained) / sum(p.numel() for p in params)
    churn = MaskChurn()
    observe = churn.observe if hasattr(opt, "selected_blocks") else None
    meter = _MeteredSegments(device, opt)
    start_losses = evaluate(model, val_batches, device)
    curve = [{"step": 0, "train_loss": None, "val_loss": statistics.fmean(start_losses), "device_s": 0.0}]
    bar = Progress(steps, label or f"stage 2: {variant.name}", enabled=progress)
    opt_times, step_times, window, footprint = [], [], [], 0
    meter.begin()
    for step, (x, y) in enumerate(train, 1):
        x, y = x.to(device), y.to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        opt_times.append(t2 - t1)
        step_times.append(t2 - t0)
        window.append(loss.item())
        if observe is not None:
            observe(opt)
            churn.flush()
        if step == 1:  # parameters, grads and state are all allocated after the first step
            footprint = (tensor_bytes(params) + tensor_bytes(p.grad for p in params)
                         + optimizer_state_bytes(opt))
        if step % eval_every == 0 or step == steps:
            meter.end()
            losses = evaluate(model, val_batches, device)
            curve.append({"step": step, "train_loss": statistics.fmean(window), "val_loss": statistics.fmean(losses),
                          "device_s": meter.totals["elapsed_s"]})
            window = []
            bar.update(0, f"val loss {curve[-1]['val_loss']:.3f}")
            meter.begin()
        bar.update(1)
        if step >= steps:
            break
    meter.end()
    bar.close()
    if curve[-1]["step"] != steps:
        raise ValueError(f"train gave {curve[-1]['step']} batches, fewer than steps={steps}")
    val_loss, val_stderr = mean_and_stderr(losses)
    tune_loss = statistics.fmean(evaluate(model, tune_batches, device)) if tune_batches else None
    skip = min(2, len(opt_times) - 1)  # the first steps allocate state
    return VariantResult(
        name=variant.name, family=variant.family, density=variant.density, seed=seed, steps=steps, curve=curve,
        val_losses=losses, val_loss=val_loss, val_stderr=val_stderr,
        optimizer_ms=1e3 * statistics.median(opt_times[skip:]), step_ms=1e3 * statistics.median(step_times[skip:]),
        state_bytes=optimizer_state_bytes(opt), trained_fraction=trained_fraction, footprint_bytes=footprint,
        resources=meter.as_dict(), churn=churn.churn, note=variant.note, hyper=dict(variant.hyper),
        tune_loss=tune_loss, twin_of=variant.twin_of)
