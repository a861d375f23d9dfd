"""A param group's own state beside the per-param state (docs/design.md §4): the current
selection, compact moment slabs, and caches derived from them.

Per-param state (moments, block step counts, score EMAs, error buffers) lives in
``optimizer.state`` as torch keeps it; what belongs to the group as a whole lives here, one
:class:`GroupState` per param group, which saves and restores its own part of a state dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """The block ids a param group updates until its next reselection."""

    key: tuple  # (positions of params with a grad, block_size, density, scope, score, minima, selection, seed)
    block_ids: torch.Tensor
    age: int  # steps taken with these ids
    draw: int = 0  # how many selections the group has made (selection="random" hashes it)

    def state_dict(self) -> dict:
        return {"key": self.key, "block_ids": self.block_ids, "age": self.age, "draw": self.draw}



class GroupState:
    """The selection, compact slabs and caches of one param group.

    Replacing the state (load, clear) drops the group's bound step, which holds tensors of the
    old state (docs/design.md §9).

    ``state_dict()`` hands out one live record, kept current after every step, as torch hands out
    its live per-param state dicts: a state dict held across a step then shows that step
    everywhere, never new moments beside an old selection (docs/design.md §4).
    """

    def __init__(self) -> None:
        self.selection: Selection | None = None
        self.compact: dict[str, torch.Tensor] | None = None  # see compact_state
        self.blueprint_scores: dict[tuple, torch.Tensor] = {}  # (positions, block_size) → fp32 scores
        self.caches: dict = {}  # derived from the selection (a sharded group's local ids)
        self.bound = None  # the group's bound step (see .binding), valid while this state is
        self.record: dict | None = None  # what state_dict() handed out, if it was called
        self._numels: tuple | None = None  # (compact["param_numels"], its values on the host)
        self.compact_grad = None  # the next step's compact gradient (see .compact_grads), if any

    def compact_numels(self) -> tuple[int, ...]:
        """The element counts of the params the compact state was made for (a resized param is
        refused at the next bind), read back once per state: a CUDA read waits for the device."""
        numels = self.compact["param_numels"]
        if self._numels is None or self._numels[0] is not numels:
            self._numels = (numels, tuple(numels.tolist()))
        return self._numels[1]

    def made_compact(self, compact: dict, numels: list[int]) -> None:
        """A step created compact state for params of these element counts (known on the host)."""
        self.compact = compact
        self._numels = (compact["param_numels"], tuple(numels))

    def clear(self) -> None:
        """Forget the selection and compact state (the blueprint's scores stay valid)."""
        self.selection, self.compact, self.caches, self.bound = None, None, {}, None
        self.compact_grad = None
        self.refresh()

    def set(self, selection: Selection | None, compact: dict | None) -> None:
        """Replace the selection and compact state (a checked load)."""
        self.clear()
        self.selection, self.compact = selection, compact
        self.refresh()

    def state_dict(self) -> dict:
        """This group's part of ``SparseAdamW.state_dict()``: ``{"selection": ..., "compact": ...}``,
        each present only if the group has one; the same live dict on every call."""
        if self.record is None:
            self.record = {}
        self.refresh()
        return self.record

    def refresh(self) -> None:
        """Bring the record handed out by :meth:`state_dict` up to date (after a step or load)."""
        record = self.record
        if record is None:
            return
        record.clear()
        if self.selection is not None:
            record["selection"] = self.selection.state_dict()
        if self.compact is not None:
            record["compact"] = dict(self.compact)
