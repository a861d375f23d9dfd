"""What the next step of a param group will read of its gradients (docs/design.md §11), for
code that computes gradients and wants to compute only those (``sparse_grad.nn.sparse_backward``).

A step reads every block's gradient when it ranks new blocks (a reselection), and also when
clipping (``max_grad_norm``: the norm is over the whole gradient), error feedback (unselected
blocks add to the buffer), a score hook (it sees every block's score) or ``density=1`` needs it.
Otherwise it reads the gradient of the selected blocks only, and the rest may be left unset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .group_state import GroupState
from .selection import reselection_due, selection_key


@dataclass(frozen=True)
class GroupPlan:
    """The next step of param group ``index``, as far as its gradients go.

    ``reselects``: the step will rank new blocks. ``reads_all``: it reads every block's gradient
    (a reselection, or an option that needs the whole gradient: ``reason`` says which).
    Otherwise it reads only ``block_ids`` (ascending int64, numbered by
    :class:`~sparse_grad.BlockLayout` over ``params`` with ``block_size``); ``params`` are the
    params the selection was made over. ``block_ids`` is the optimizer's own tensor: read-only.
    """

    index: int
    reselects: bool
    reads_all: bool
    reason: str | None
    params: list[torch.Tensor]
    block_ids: torch.Tensor | None
    block_size: int


def taking_part(group: dict, state: GroupState) -> list[int]:
    """The positions of the group's params that take part in the step: those with a .grad or
    whose gradient is in the group's compact slab."""
    covered = {} if state.compact_grad is None else state.compact_grad.covered
    return [j for j, p in enumerate(group["params"]) if p.grad is not None or id(p) in covered]


def group_plan(index: int, group: dict, state: GroupState, hooked: bool) -> GroupPlan:
    """The plan of one group, from its options and current selection, without writing anything.

    The params that will take part are the ones with a grad now (or a compact one); before any has a .grad (the
    backward has not run yet, or ``zero_grad`` set them to None) those of the current selection.
    """
    selection = state.selection
    with_grad = [j for j, p in enumerate(group["params"]) if p.grad is not None]
    if not with_grad and selection is not None:  # (a compact gradient's params count once a .grad exists)
        with_grad = list(selection.key[0])
    else:
        with_grad = taking_part(group, state)
    key = selection_key(group, with_grad)
    reselects = reselection_due(selection, key, group)
    reason = ("the step reselects" if reselects else
              "density is 1" if group["density"] == 1.0 else
              "max_grad_norm clips by the whole gradient's norm" if group["max_grad_norm"] is not None else
              "error_feedback keeps the unselected blocks' gradient" if group["error_feedback"] else
              "a score hook sees every block's score" if hooked else None)
    if selection is None:
        return GroupPlan(index, reselects, True, reason, [], None, group["block_size"])
    params = [group["params"][j] for j in selection.key[0]]
    return GroupPlan(index, reselects, reason is not None, reason, params, selection.block_ids,
                     selection.key[1])
