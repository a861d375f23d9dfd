"""SparseAdamW's selection (docs/design.md §3.2, §3.3), on device, no host sync: what a
reselection ranks (this step's scores, their EMA, the blend with a blueprint) and which blocks
it takes (density, scope, minima). The random draws are in :mod:`.random_draws`.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

from .. import ops
from ..ops import unchecked
from ..layout import BlockLayout


@functools.lru_cache(maxsize=64)
def _block_numels(numels: tuple[int, ...], block_size: int, device: torch.device) -> torch.Tensor:
    return BlockLayout.of_numels(numels, block_size).block_numels(device).float()


def scores_of(sqnorms: torch.Tensor, layout: BlockLayout, kind: str) -> torch.Tensor:
    """A block's score: ``"l2"`` its sum of squares (ranks like the L2 norm), ``"rms"`` its mean
    square (ranks like the RMS: a tensor's short last block is not penalized for its size)."""
    if kind == "l2":
        return sqnorms
    return sqnorms / _block_numels(layout.numels, layout.block_size, sqnorms.device)


_get_ema = operator.methodcaller("get", "score_ema")


def update_ema(states: list[dict], scores: torch.Tensor, layout: BlockLayout, beta: float,
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """``s ← β·s + (1 − β)·score`` per block, kept per param in ``state["score_ema"]``.

    A param's first observation initializes its EMA (no bias towards zero). ``skip``: a device
    bool scalar (an overflowed AMP step) that keeps the old values. Returns the group's EMA.
    Once every param has one, the group is updated as one vector (a constant number of ops
    whatever the number of params), with the same arithmetic per block.
    """
    if torch.compiler.is_compiling():  # dynamo traces plain loops, not C-level maps
        olds = [state.get("score_ema") for state in states]
        complete = all(old is not None for old in olds)
    else:
        olds = list(map(_get_ema, states))
        complete = type(None) not in set(map(type, olds))
    if complete:
        old = torch.cat(olds)
        new = old * beta + scores * (1.0 - beta)
        if skip is not None:
            new = torch.where(skip, old, new)
        # In place: a step captured in a CUDA graph must leave its results in the same tensors.
        torch._foreach_copy_(olds, list(new.split(layout.block_counts)))
        return new
    parts = []
    for t, state in enumerate(states):
        start, end = layout.block_range(t)
        current = scores[start:end]
        old = state.get("score_ema")
        if old is None:
            state["score_ema"] = old = current.clone()
        else:
            new = old * beta + current * (1.0 - beta)
            # In place: a step captured in a CUDA graph must leave its results in the same tensors.
            old.copy_(new if skip is None else torch.where(skip, old, new))
        parts.append(old)
    return torch.cat(parts)


def selection_key(group: dict, positions) -> tuple:
    """What a selection depends on besides the scores (the positions of the params that take
    part, and the shaping options): a change of any of it reselects."""
    return (tuple(positions), group["block_size"], group["density"], group["scope"], group["score"],
            group["min_blocks_per_tensor"], group["selection"], group["seed"])


def reselection_due(selection, key: tuple, group: dict) -> bool:
    """Whether a step with selection key ``key`` ranks new blocks: the group has no selection
    yet, its key changed, or (density < 1) the selection is ``reselect_every`` steps old."""
    return (selection is None or selection.key != key
            or (group["density"] < 1.0 and selection.age >= group["reselect_every"]))


@dataclass(frozen=True)
class Counts:
    """How many blocks a reselection takes, worked out once per bound step (sizes known on the
    host: the selection never syncs).

    ``scope="tensor"``: ``ks[t]`` of tensor ``t``'s ``sizes[t]`` blocks. ``"global"``: ``ks[0]``
    of the ``num_blocks``; with ``min_blocks_per_tensor``, ``minima[t]`` of each tensor first,
    then ``ks[0]`` more of the rest.
    """

    per_tensor: bool
    sizes: list[int]
    ks: list[int]
    num_blocks: int
    minima: list[int] | None

    @classmethod
    def of(cls, layout: BlockLayout, group: dict) -> "Counts":
        density, minimum = group["density"], group["min_blocks_per_tensor"]
        sizes = list(layout.block_counts)
        if group["scope"] == "tensor":
            ks = [max(ops.num_selected(density, n), min(minimum, n)) for n in sizes]
            return cls(True, sizes, ks, layout.num_blocks, None)
        k = ops.num_selected(density, layout.num_blocks)
        if minimum == 0:
            return cls(False, sizes, [k], layout.num_blocks, None)
        minima = [min(minimum, n) for n in sizes]
        return cls(False, sizes, [max(k - sum(minima), 0)], layout.num_blocks, minima)


def select(scores: torch.Tensor, counts: Counts, backend: str, cache: dict | None = None,
           first_pass=None) -> torch.Tensor:
    """The ids to update: ``ceil(density·n)`` of the group (``scope="global"``) or of every tensor
    (``"tensor"``), and at least ``min(min_blocks_per_tensor, its blocks)`` of every tensor.

    Global scope with a minimum: every tensor's own top blocks are taken first, then the
    ``max(ceil(density·n), Σ minima) − Σ minima`` best of the other blocks over the group.

    ``first_pass``: the histograms the norm pass that made ``scores`` filled (never with global
    minima, whose selections rank other scores; see ``functional._first_pass``).
    """
    def part(name):
        return None if cache is None else cache.setdefault(name, {})

    if counts.per_tensor:
        return unchecked.select_blocks(scores, counts.sizes, counts.ks, backend, part("per_tensor"), first_pass)
    if counts.minima is None:
        return unchecked.select_blocks(scores, [counts.num_blocks], counts.ks, backend, part("global"), first_pass)
    guaranteed = unchecked.select_blocks(scores, counts.sizes, counts.minima, backend, part("minima"))
    if counts.ks[0] == 0:
        return guaranteed
    # The guaranteed blocks are ranked last, not first: no score ranks above NaN or ties with
    # +inf strictly, but every other block (scores are never -inf; clamping makes sure) ranks
    # above -inf, so the rest never takes a guaranteed block again.
    rest = scores.clamp_min(-torch.finfo(torch.float32).max).index_fill(0, guaranteed, float("-inf"))
    others = unchecked.select_blocks(rest, [counts.num_blocks], counts.ks, backend, part("global"))
    return torch.cat([guaranteed, others]).sort().values


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` divided by their sum, on device. NaN is left out of the sum, so a NaN block
    stays NaN and still ranks first; an all-zero vector stays zero."""
    return scores / torch.nansum(scores).clamp_min(torch.finfo(torch.float32).tiny)


def blend(blueprint: torch.Tensor, scores: torch.Tensor, weight: float) -> torch.Tensor:
    """``α · b / Σb + (1 − α) · s / Σs``: both normalized, so they weigh the same whatever their scale."""
    return weight * normalized(blueprint) + (1.0 - weight) * normalized(scores)

