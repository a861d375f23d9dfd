r"""Influence-ranked data selection, coordinated with the parameter selection.

An example ``j``'s score is the gradient it would send into the currently selected blocks:

    T_j = Σ_{i ∈ selected blocks} ‖∂L(z_j)/∂θ_i‖₂

the cross-influence ``|∂L(z_j)/∂θ_i|`` (a block's gradient norm) summed over the selected
blocks: an L2,1 norm of the per-example gradient restricted to those blocks. It is
computed from per-block squared norms (:class:`~sparse_grad.data.PerExampleNorms`). Summing
norms rather than squared norms ranks by how many selected blocks an example moves as well as by
how hard: with squared norms one very large block would decide the ranking, which the
parameter selection already accounts for.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from .blocks import resolve_blocks
from .per_example import PerExampleNorms, batch_size_of, split_batch

__all__ = ["DataSelection", "InfluenceSampler", "InfluenceSelector", "top_indices"]

SELECTIONS = ("influence", "random")


def _fraction(value) -> float:
    return _checks.density(value, "data_fraction")


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores``, best first; ties to the lower index. A NaN score
    (an example whose loss or gradient is not finite) ranks below every number."""
    ranked = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    return torch.sort(ranked, descending=True, stable=True).indices[:k]


@dataclass(frozen=True)
class DataSelection:
    """The chosen examples of a candidate batch: ``indices`` (int64, best first) and every
    candidate's ``scores`` (``[B]``)."""

    indices: torch.Tensor
    scores: torch.Tensor


class InfluenceSelector:
    """Scores candidate examples by the gradient they send into selected parameter blocks and
    keeps the top ``data_fraction`` of them.

    Args:
        model: the model being trained; scoring never writes its parameters, their ``.grad`` or
            any optimizer state (one forward and one ``torch.autograd.grad`` to the hooked
            layers' outputs, plus the torch.func fallback where needed).
        per_example_loss: ``per_example_loss(model, batch) -> Tensor [B]``: one loss per example
            (a sequence's mean token loss, say), examples along dim 0 of every tensor of
            ``batch``.
        blocks: which blocks count (see :func:`~sparse_grad.data.resolve_blocks`): a
            :class:`~sparse_grad.SparseAdamW` (its current selection, re-read at every call; before
            its first step every block of its params), a
            :class:`~sparse_grad.blueprint.Blueprint` (with ``density``, ``scope``), a mapping
            ``{name: mask or ids}`` (with ``block_size``), or ``None`` (every block).
        data_fraction: share of the candidates :meth:`select` keeps, in (0, 1]:
            ``ceil(data_fraction · B)`` examples.
        chunk_size: score at most this many candidates per pass (bounds memory; None: all).
        block_size, density, scope: for ``blocks`` given as a mapping, None or a blueprint.
        linear_method: see :class:`~sparse_grad.data.PerExampleNorms`.
    """

    def __init__(self, model: nn.Module, per_example_loss: Callable, *, blocks=None, data_fraction: float = 0.3,
                 chunk_size: int | None = None, block_size: int | None = None, density: float | None = None,
                 scope: str = "global", linear_method: str = "auto"):
        self.data_fraction = _fraction(data_fraction)
        self.chunk_size = None if chunk_size is None else _checks.positive_int(chunk_size, "chunk_size")
        self.norms = PerExampleNorms(model, per_example_loss, linear_method=linear_method)
        self.model = model
        self._blocks, self._options = blocks, {"block_size": block_size, "density": density, "scope": scope}
        resolve_blocks(model, blocks, **self._options)  # bad blocks fail here, not at the first score

    def blocks(self):
        """The selected blocks scores are taken over now (a list of
        :class:`~sparse_grad.data.ParamBlocks`)."""
        return resolve_blocks(self.model, self._blocks, **self._options)

    def block_sqnorms(self, batch) -> torch.Tensor:
        """``[B, selected blocks]``: every candidate's squared gradient norm in every selected block."""
        blocks = self.blocks()
        B = batch_size_of(batch)
        step = self.chunk_size or B
        parts = [self.norms.block_sqnorms(split_batch(batch, torch.arange(s, min(s + step, B))), blocks)
                 for s in range(0, B, step)] if step < B else [self.norms.block_sqnorms(batch, blocks)]
        return torch.cat(parts, 0)

    def score(self, batch) -> torch.Tensor:
        """``T_j`` for every candidate ``j`` of ``batch`` (``[B]``; see the module doc)."""
        return self.block_sqnorms(batch).sqrt().sum(1)

    def select(self, batch) -> DataSelection:
        """The top ``ceil(data_fraction · B)`` candidates of ``batch`` by :meth:`score`."""
        scores = self.score(batch)
        return DataSelection(top_indices(scores, _checks.num_selected(self.data_fraction, scores.numel())), scores)


class InfluenceSampler:
    """Training batches chosen from candidate pools, every ``refresh_every`` steps.

    At each refresh it draws a pool of ``ceil(refresh_every · batch_size / data_fraction)``
    candidates with ``draw(n, generator)``, keeps ``refresh_every · batch_size`` of them — the
    highest-scoring by ``selector`` (``selection="influence"``) or uniformly at random
    (``"random"``, the control: same pools, no scoring) — shuffles them and yields them as
    ``refresh_every`` batches of ``batch_size``. The same ``seed`` (and model state) gives the
    same batches. Iterating never ends; take as many batches as there are steps.

    Args:
        selector: an :class:`InfluenceSelector` (its ``data_fraction`` sets the pool size).
        draw: ``draw(n, generator) -> batch`` of ``n`` candidates (examples along dim 0), using
            only ``generator`` for randomness.
        batch_size: examples per yielded batch.
        refresh_every: R, steps between refreshes (a pool serves R batches; scores get staler
            as the model and the parameter selection move on).
        seed: seeds the generator given to ``draw`` and used for the random choice and shuffle.
        selection: ``"influence"`` or ``"random"``.

    Counters for cost accounting: ``pools``, ``candidates`` (examples drawn), ``scored``
    (examples scored) and ``scoring_s`` (wall-clock seconds spent scoring).
    """

    def __init__(self, selector: InfluenceSelector, draw: Callable, *, batch_size: int, refresh_every: int = 1,
                 seed: int = 0, selection: str = "influence"):
        if not isinstance(selector, InfluenceSelector):
            raise TypeError(f"selector must be an InfluenceSelector, got {type(selector).__name__}")
        if not callable(draw):
            raise TypeError(f"draw must be callable, got {type(draw).__name__}")
        self.selector, self.draw = selector, draw
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.refresh_every = _checks.positive_int(refresh_every, "refresh_every")
        self.seed = _checks.non_negative_int(seed, "seed")
        self.selection = _checks.choice(selection, SELECTIONS, "selection")
        keep = self.refresh_every * self.batch_size
        self.pool_size = math.ceil(keep / selector.data_fraction - keep * 1e-12)
        self.pools = self.candidates = self.scored = 0
        self.scoring_s = 0.0

    def __iter__(self) -> Iterator:
        generator = torch.Generator().manual_seed(self.seed)
        keep = self.refresh_every * self.batch_size
        while True:
            pool = self.draw(self.pool_size, generator)
            n = batch_size_of(pool)
            if n != self.pool_size:
                raise ValueError(f"draw({self.pool_size}, generator) returned {n} candidates")
            self.pools += 1
            self.candidates += n
            if self.selection == "influence":
                start = time.perf_counter()
                chosen = top_indices(self.selector.score(pool), keep).cpu()
                self.scoring_s += time.perf_counter() - start
                self.scored += n
            else:
                chosen = torch.randperm(n, generator=generator)[:keep]
            chosen = chosen[torch.randperm(keep, generator=generator)]
            for r in range(self.refresh_every):
                yield split_batch(pool, chosen[r * self.batch_size:(r + 1) * self.batch_size])
