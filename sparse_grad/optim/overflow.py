"""An overflowed AMP step changes nothing (docs/design.md §3.6): what it wrote on the host is undone.

GradScaler's ``found_inf`` is a device tensor; reading it before the step would stall the host
on every step. So the step runs as if it were finite, with every device write blended on
``found_inf`` (``torch.where``: moments, counts, score EMAs, error buffers, and the previous ids
if a reselection was due), and what only the host holds — the selection (its ids, age and draw
count), the compact slot table, a score EMA seeded on a param's first step — is recorded in an
:class:`Undo` before it changes. The flag is read afterwards: on CPU at once, on CUDA from a
pinned copy made at the step, when the next step (or ``state_dict()``, ``selected_blocks()``,
``load_state_dict()``) begins, waiting at most for the device to reach that copy. A step whose
host state a skip could not change (a reselection every step, ``selection="norm"``, a selection
and score EMAs already made) records nothing and reads nothing.

Compiled steps and steps captured in a CUDA graph keep the device blends only: the host cannot
read the flag there, so after an overflow their selection's age and draw count have moved on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .group_state import GroupState, Selection


@dataclass
class Undo:
    """A group's host state before an AMP step, restored if the step overflowed."""

    state: GroupState
    selection: tuple | None  # (key, block_ids, age, draw), or None: there was no selection
    compact: dict | None
    seeded: list[dict] = field(default_factory=list)  # param states whose score_ema the step creates

    @classmethod
    def of(cls, state: GroupState) -> "Undo":
        s = state.selection
        return cls(state, None if s is None else (s.key, s.block_ids, s.age, s.draw), state.compact)

    def apply(self) -> None:
        self.state.selection = None if self.selection is None else Selection(*self.selection)
        self.state.compact = self.compact
        for param_state in self.seeded:
            param_state.pop("score_ema", None)


class Overflow:
    """One AMP step's ``found_inf`` and the host changes to undo if it is nonzero."""

    def __init__(self, found_inf: torch.Tensor):
        self.found_inf = found_inf
        self.undos: list[Undo] = []
        self._flag: torch.Tensor | None = None
        self._event = None

    @classmethod
    def of(cls, found_inf: torch.Tensor | None) -> "Overflow | None":
        if found_inf is None or torch.compiler.is_compiling():
            return None
        if found_inf.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        return cls(found_inf)

    def close(self) -> "Overflow | None":
        """After the step: settle now (CPU), or start the flag's copy to the host and return self
        to be settled later (CUDA); None if there is nothing left to do."""
        if not self.undos:
            return None
        if self.found_inf.device.type != "cuda":
            self.settle()
            return None
        self._flag = torch.empty(1, dtype=torch.float32, pin_memory=True)
        self._flag.copy_(self.found_inf.reshape(1), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return self

    def settle(self) -> None:
        """Undo the step's host changes if it overflowed."""
        if self._event is not None:
            self._event.synchronize()
            overflowed = bool(self._flag[0] != 0)
        else:
            overflowed = bool(self.found_inf.reshape(()).item() != 0)
        if overflowed:
            for undo in reversed(self.undos):
                undo.apply()
        self.undos = []
