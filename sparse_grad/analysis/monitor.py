"""GradientMonitor: accumulate per-block gradient mass over steps, on device, from the scores a
step computes anyway; GradientSnapshot: what it holds, on the host, for reports and files."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from .. import _checks, ops
from .files import load_tensors, save_tensors
from .params import look_up, trainable_parameters
from .report import HeavyTailReport, heavy_tail_report, module_of

__all__ = ["GradientMonitor", "GradientSnapshot"]

ACCUMULATE = ("mean", "ema")
SNAPSHOT_KIND = "sparse_grad.monitor"
SNAPSHOT_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class GradientSnapshot:
    """A monitor's accumulated block scores and per-step history, on the host.

    Attributes:
        names, shapes, dtypes: the monitored parameters, in ``model.named_parameters()`` order.
        block_size: elements per block.
        steps: optimizer steps (or ``update()`` calls) recorded.
        accumulate: ``"mean"`` or ``"ema(beta=…)"``.
        scores: ``{name: fp32 [num_blocks]}`` accumulated block scores (gradient mass).
        history: fp32 ``[rows, tensors]``: each recorded step's mass per tensor (one row every
            ``history_every`` steps).
        history_every: steps between history rows.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    block_size: int
    steps: int
    accumulate: str
    scores: dict[str, torch.Tensor]
    history: torch.Tensor
    history_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, saved in the JSON header

    def report(self, *, depth: int | None = None, target_share: float = 0.9) -> HeavyTailReport:
        """The heavy-tail report of the accumulated scores (see :func:`heavy_tail_report`)."""
        return heavy_tail_report(self.scores, depth=depth, target_share=target_share,
                                 block_size=self.block_size, steps=self.steps, accumulate=self.accumulate)

    def module_history(self, depth: int | None = None) -> tuple[list[str], np.ndarray]:
        """Submodules and each one's share of the step's gradient mass per history row:
        ``(modules, shares [modules, rows])``; a column of a step with no mass is NaN."""
        modules: list[str] = []
        rows = []
        for name in self.names:
            module = module_of(name, depth)
            if module not in modules:
                modules.append(module)
            rows.append(modules.index(module))
        mass = np.zeros((len(modules), self.history.shape[0]))
        np.add.at(mass, np.asarray(rows, dtype=np.int64), self.history.to(torch.float64).numpy().T)
        totals = mass.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return modules, np.where(totals > 0, mass / totals, math.nan)

    def save(self, path: str | os.PathLike) -> None:
        """Write a monitor dump (safetensors + JSON header), read back by :meth:`load`."""
        header = {"format_version": SNAPSHOT_VERSION, "names": self.names, "shapes": [list(s) for s in self.shapes],
                      "dtypes": self.dtypes, "block_size": self.block_size, "steps": self.steps,
                      "accumulate": self.accumulate, "history_every": self.history_every, "extra": self.extra}
        tensors = {f"scores/{name}": s for name, s in self.scores.items()}
        tensors["history"] = self.history
        save_tensors(path, tensors, SNAPSHOT_KIND, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientSnapshot:
        """Read a monitor dump written by :meth:`save`."""
        tensors, h = load_tensors(path, SNAPSHOT_KIND, "sparse_grad monitor dump")
        if h.get("format_version") != SNAPSHOT_VERSION:
            raise ValueError(f"{path}: monitor dump format {h.get('format_version')!r}; this sparse_grad "
                             f"reads format {SNAPSHOT_VERSION}")
        missing = [n for n in h["names"] if f"scores/{n}" not in tensors]
        if missing or "history" not in tensors:
            raise ValueError(f"{path}: the monitor dump lacks the tensor "
                             f"{'scores/' + missing[0] if missing else 'history'!r}")
        return cls(names=h["names"], shapes=[tuple(s) for s in h["shapes"]], dtypes=h["dtypes"],
                   block_size=h["block_size"], steps=h["steps"], accumulate=h["accumulate"],
                   scores={n: tensors[f"scores/{n}"] for n in h["names"]}, history=tensors["history"],
                   history_every=h["history_every"], extra=h.get("extra", {}))


class GradientMonitor:
    """Per-block gradient mass of a model's trainable parameters, accumulated over steps.

    Feed it either from :class:`~sparse_grad.SparseAdamW`, which hands over the block scores it
    computes anyway::

        monitor = GradientMonitor(model, block_size=4096)
        handle = monitor.attach(opt)            # = opt.register_score_hook(monitor.hook)

    or, with any other optimizer, by calling ``monitor.update()`` after ``backward()``: one
    multi-tensor ``sparse_grad.ops.block_sqnorms`` launch over the grads.

    Everything stays on the parameters' device: each step does a few gather/scatter ops on
    ``[num_blocks]`` vectors and no host sync. Data moves to the host only in :meth:`snapshot`,
    :meth:`report` and :meth:`save`.

    Args:
        model: its ``named_parameters()`` with ``requires_grad`` are monitored, in that order
            (contiguous, one device; as for SparseAdamW).
        block_size: elements per block; must equal the optimizer group's block size.
        accumulate: ``"mean"``: a block's score is the mean of its scores over the steps in
            which it had a gradient. ``"ema"``: an exponential moving average with factor
            ``beta`` over those steps, bias-corrected like Adam's moments
            (``ema / (1 − beta^count)``), so recent steps weigh more. A non-finite score (an
            overflowed step) is not counted.
        beta: EMA factor in [0, 1).
        history_every: record each tensor's total mass every this many steps (4 bytes per
            tensor per row, for the per-module heatmap).
    """

    def __init__(self, model: torch.nn.Module, block_size: int = 4096, *, accumulate: str = "mean",
                 beta: float = 0.9, history_every: int = 1):
        named = trainable_parameters(model)
        self.block_size = _checks.positive_int(block_size, "block_size")
        self.accumulate = _checks.choice(accumulate, ACCUMULATE, "accumulate")
        self.beta = _checks.beta(beta, "beta")
        self.history_every = _checks.positive_int(history_every, "history_every")
        if not named:
            raise ValueError("model has no parameters with requires_grad=True to monitor")
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        try:
            self.layout = ops.BlockLayout(self._params, self.block_size, name="params")
        except (TypeError, ValueError) as err:  # name the parameter, not its position
            index = re.match(r"params\[(\d+)\]", str(err))
            if index is None:
                raise
            raise type(err)(f"model parameter {self.names[int(index.group(1))]!r}: {err}") from None
        self._position = {id(p): i for i, p in enumerate(self._params)}
        self._maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def reset(self) -> None:
        """Forget everything recorded."""
        n = self.layout.num_blocks
        self._value = torch.zeros(n, dtype=torch.float32, device=self.device)  # mean, or raw EMA
        self._count = torch.zeros(n, dtype=torch.int32, device=self.device)  # steps seen per block
        self._history: list[torch.Tensor] = []
        self._steps: dict[tuple, int] = {}

    @property
    def steps(self) -> int:
        """Optimizer steps recorded (the most any score source — a param group, or update() — saw)."""
        return max(self._steps.values(), default=0)

    def attach(self, optimizer) -> RemovableHandle:
        """Register :meth:`hook` on a SparseAdamW (``optimizer.register_score_hook``); its param
        groups must use the monitor's block size."""
        register = getattr(optimizer, "register_score_hook", None)
        if register is None:
            raise TypeError(f"{type(optimizer).__name__} has no register_score_hook; with it, call "
                            "monitor.update() after backward() instead")
        for i, group in enumerate(optimizer.param_groups):
            self._check_block_size(group, i)
        return register(self.hook)

    def _check_block_size(self, group: dict, index: int) -> None:
        if group.get("block_size", self.block_size) != self.block_size:
            raise ValueError(f"the optimizer's param_groups[{index}] uses block_size {group['block_size']}, "
                             f"the monitor {self.block_size}")

    def hook(self, optimizer, group_index: int, params, scores: torch.Tensor, block_ids: torch.Tensor) -> None:
        """A SparseAdamW score hook: record the scores of one param group's step."""
        self._check_block_size(optimizer.param_groups[group_index], group_index)
        self._record(("group", id(optimizer), group_index), list(params), scores,
                     f"param_groups[{group_index}]")

    @torch.no_grad()
    def update(self) -> None:
        """Score the model's current grads (one ``ops.block_sqnorms`` launch) and record them.

        Parameters whose grad is None take no part; with no grads at all nothing is recorded."""
        params, grads = [], []
        for name, p in zip(self.names, self._params):
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                raise TypeError(f"the grad of {name} is sparse; the monitor needs dense gradients")
            params.append(p)
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
        if not params:
            return
        scores = ops.block_sqnorms(grads, self.block_size)
        self._record(("update",), params, scores, "the model")

    def _maps_for(self, source: tuple, params: list[torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Device index tensors for ``params``' blocks: the monitor's block ids, and each block's
        tensor position (cached per source and parameter list)."""
        key = (source, tuple(map(id, params)))
        if key not in self._maps:
            positions = look_up(params, self._position, f"{where}['params']",
                                "a trainable parameter of the monitored model")
            ranges = [torch.arange(*self.layout.block_range(t)) for t in positions]
            counts = torch.tensor([self.layout.block_counts[t] for t in positions])
            self._maps[key] = (torch.cat(ranges).to(self.device),
                               torch.repeat_interleave(torch.tensor(positions), counts).to(self.device))
        return self._maps[key]

    def _record(self, source: tuple, params: list[torch.Tensor], scores: torch.Tensor, where: str) -> None:
        blocks, tensor_of_block = self._maps_for(source, params, where)
        if scores.shape != blocks.shape:
            raise ValueError(f"{where}: got {scores.numel()} block scores for {blocks.numel()} blocks of "
                             f"{self.block_size} elements")
        scores = scores.to(torch.float32)
        # An overflowed step (inf/NaN grads, e.g. one GradScaler skips) is not an observation:
        # masked on device, so one bad step cannot poison a block's mean for the rest of the run.
        valid = torch.isfinite(scores)
        scores = torch.where(valid, scores, 0.0)
        count = self._count.index_select(0, blocks) + valid
        old = self._value.index_select(0, blocks)
        if self.accumulate == "mean":
            new = old + (scores - old) / count.clamp_min(1)  # running mean, stable in fp32
        else:
            new = old * self.beta + scores * (1.0 - self.beta)
        self._count.index_copy_(0, blocks, count)
        self._value.index_copy_(0, blocks, torch.where(valid, new, old))
        step = self._steps[source] = self._steps.get(source, 0) + 1
        if (step - 1) % self.history_every == 0:
            row = (step - 1) // self.history_every
            while len(self._history) <= row:
                self._history.append(torch.zeros(len(self.names), dtype=torch.float32, device=self.device))
            self._history[row].index_add_(0, tensor_of_block, scores)

    def _accumulated(self) -> torch.Tensor:
        if self.accumulate == "mean":
            return self._value.clone()
        correction = 1.0 - torch.pow(torch.tensor(self.beta, dtype=torch.float32, device=self.device), self._count)
        return torch.where(self._count > 0, self._value / correction.clamp_min(1e-30), 0.0)

    def scores(self) -> dict[str, torch.Tensor]:
        """``{name: fp32 [num_blocks]}`` accumulated block scores, on the model's device (0 for
        blocks that never had a gradient)."""
        flat = self._accumulated()
        return {name: flat[slice(*self.layout.block_range(t))] for t, name in enumerate(self.names)}

    def snapshot(self) -> GradientSnapshot:
        """Copy what the monitor holds to the host."""
        history = (torch.stack(self._history) if self._history
                   else torch.zeros(0, len(self.names), dtype=torch.float32, device=self.device))
        return GradientSnapshot(
            names=list(self.names), shapes=[tuple(p.shape) for p in self._params],
            dtypes=[dtype_name(p.dtype) for p in self._params], block_size=self.block_size,
            steps=self.steps, accumulate="mean" if self.accumulate == "mean" else f"ema(beta={self.beta:g})",
            scores={n: s.cpu() for n, s in self.scores().items()}, history=history.cpu(),
            history_every=self.history_every)

    def report(self, *, depth: int | None = None, target_share: float = 0.9) -> HeavyTailReport:
        """The heavy-tail report of what has been recorded (see :func:`heavy_tail_report`)."""
        return self.snapshot().report(depth=depth, target_share=target_share)

    def save(self, path: str | os.PathLike) -> None:
        """Write a monitor dump; ``python -m sparse_grad analyze --dump PATH`` reads it."""
        self.snapshot().save(path)
