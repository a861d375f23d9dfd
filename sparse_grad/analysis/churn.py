"""Mask churn: how much of SparseAdamW's selection is new from one step to the next."""
from __future__ import annotations

import torch

__all__ = ["MaskChurn"]


class MaskChurn:
    """Records, per step, the share of SparseAdamW's selected blocks that were not selected at the
    group's previous step: as a score hook (``opt.register_score_hook(churn)``, every group step)
    or by :meth:`observe` after each step (no hook: the step's cost is unchanged).

    The hook only clones each group step's id vector (on device, no sync); :meth:`flush`, called
    outside the timed step, compares them on the host and appends one value to ``churn`` per
    call (pooled over the groups and steps since the last flush).
    """

    def __init__(self):
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.previous: dict[int, torch.Tensor] = {}
        self.churn: list[float] = []

    def __call__(self, optimizer, group_index, params, scores, block_ids) -> None:
        self.pending.setdefault(group_index, []).append(block_ids.detach().clone())

    def observe(self, optimizer) -> None:
        """Record ``optimizer``'s current selection (``SparseAdamW.selected_blocks()``), once after
        each step, instead of registering as a score hook: a score hook makes every step read
        every gradient (the norm pass, and full weight gradients under sparse_backward), which
        would change what a step between reselections costs."""
        for index, _, block_ids, _ in optimizer.selected_blocks():
            self.pending.setdefault(index, []).append(block_ids.detach().clone())

    def flush(self) -> float | None:
        """Compare the recorded selections; returns the new churn value (None: nothing to compare)."""
        changed = total = 0
        for index, ids_list in self.pending.items():
            for ids in ids_list:
                ids = ids.cpu()
                before = self.previous.get(index)
                if before is not None:
                    changed += int((~torch.isin(ids, before)).sum())
                    total += ids.numel()
                self.previous[index] = ids
        self.pending.clear()
        if not total:
            return None
        self.churn.append(changed / total)
        return self.churn[-1]
