"""Compact gradients (docs/design.md §11): a param group's gradient on the selected blocks only,
one slab ``[len(block_ids), block_size]`` whose row ``i`` is the gradient of ``block_ids[i]`` (the
rows of compact state, §4), which the update kernel reads directly (``compact_grads=True``).

Code that computes only the gradients a step reads (``sparse_grad.nn.sparse_backward(...,
compact_grads=True)``) asks :meth:`SparseOptimizer.compact_grad` for the slab and adds into the
rows of the params it covers; those params' ``.grad`` stays None. At the step, the other params
of the group that take part add their dense grads' selected blocks into the slab (a gather,
cost ∝ density), the update reads the slab, and the slab is dropped (``zero_grad`` drops it too).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import num_blocks_of


@dataclass
class CompactGrad:
    """A group's compact gradient: made for the selection's ``block_ids`` (its own tensor), the
    params whose gradient is only here (``covered``: their ids, in the order asked)."""

    block_ids: torch.Tensor
    slab: torch.Tensor
    covered: dict[int, torch.Tensor] = field(default_factory=dict)


def gather_blocks(src: torch.Tensor, starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[len(starts), block_size]``: row ``i`` is ``src.flatten()[starts[i]:][:block_size]``, zeros
    past the end of ``src`` (a tensor's partial last block). The index is made per call (8 bytes
    an element, freed on return): kept, it would outweigh the slab it fills."""
    flat = src.reshape(-1)
    index = starts[:, None] + torch.arange(block_size, device=starts.device)
    past = index >= flat.numel()
    return flat[index.clamp_(max=max(flat.numel() - 1, 0))].masked_fill_(past, 0)


def block_rows(block_ids: torch.Tensor, numels: list[int], block_size: int) -> list[tuple[int, int]]:
    """Per param (of ``numels``, in the block numbering), the slab rows ``[lo, hi)`` of its
    selected blocks (ids ascending): one host sync."""
    firsts = [0]
    for n in numels:
        firsts.append(firsts[-1] + num_blocks_of(n, block_size))
    bounds = torch.searchsorted(block_ids, torch.tensor(firsts, device=block_ids.device)).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def add_dense_grads(compact: CompactGrad, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                    block_size: int) -> torch.Tensor:
    """The slab the update reads: ``compact.slab`` plus the selected blocks of the dense grads
    (params not covered, or a covered param that also got a dense grad, e.g. a tied weight).
    Returns the slab (written in place)."""
    slab, ids = compact.slab, compact.block_ids
    rows = block_rows(ids, [p.numel() for p in params], block_size)
    first = 0
    for p, g, (lo, hi) in zip(params, grads, rows):
        if g is not None and hi > lo:
            slab[lo:hi].add_(gather_blocks(g, (ids[lo:hi] - first) * block_size, block_size))
        first += num_blocks_of(p.numel(), block_size)
    return slab
