"""Mask churn: how much of SparseAdamW's selection is new from one step to the next."""
from __future__ import annotations

import torch

__all__ = ["MaskChurn"]


class MaskChurn:
    """A SparseAdamW score hook (``opt.register_score_hook(churn)``) that records, per step, the
    share of the selected blocks that were not selected at the group's previous step.

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
