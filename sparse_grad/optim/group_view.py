"""What a step needs to know about where a param group's tensors live (docs/design.md §3, §8).

A group view maps the group's blocks (numbered over the full params that take part, the
selection's numbering) to the tensors the kernels run on. :class:`PlainGroup` is the common
case: the kernels run on the params themselves and the two numberings are one.
:class:`~sparse_grad.optim.sharding.ShardedGroup` (FSDP2 DTensors) runs them on this rank's
pieces of the params and reduces the scores over the ranks. The functional step
(:mod:`.functional`) is written once against this interface.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from ..ops import unchecked


class PlainGroup:
    """A group of plain tensors on one device: kernel tensors, blocks and ids are the group's own."""

    sharded = False

    def __init__(self, layout: BlockLayout, all_numels: tuple[int, ...]):
        self.layout = layout  # the selection's blocks: the params that take part
        self.kernel_layout = layout
        self.device = layout.device
        self.compact_numels = list(all_numels)  # compact state counts blocks over all the group's params

    def local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """This process's part of each tensor (here: the tensor)."""
        return tensors

    def kernel_tensors(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the kernels run on, from local tensors shaped like the params."""
        return local

    def has_work(self) -> bool:
        return True

    def block_sqnorms(self, grads: list[torch.Tensor], backend: str, cache: dict | None,
                      first_pass=None) -> torch.Tensor:
        """The group's block sums of squares (the norm pass); ``first_pass``: see
        :func:`sparse_grad.ops.unchecked.first_pass`."""
        return unchecked.block_sqnorms(grads, self.layout.block_size, backend, cache, first_pass)

    def kernel_ids(self, block_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """The selected blocks as ids over the kernel tensors."""
        return block_ids

    def compact_ids(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Selected ids over all the group's params → the compact slot table's ids."""
        return group_ids

    def block_steps(self, per_param: list[torch.Tensor]) -> list[torch.Tensor]:
        """The kernel tensors' per-block step counts, from the params' (dense state)."""
        return per_param
