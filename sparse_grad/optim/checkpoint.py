"""What a sparse optimizer's load_state_dict checks before it changes anything (docs/design.md §4).

Each check names the first parameter (or state entry) that does not fit the optimizer's params.
"""
from __future__ import annotations

import torch

from .. import _checks
from ..layout import num_blocks_of
from . import compact_state, options, sharding
from .group_state import Selection
from .rules import ADAMW


def check_param_state(state: dict, p: torch.Tensor, group: dict, name: str, rule=None) -> None:
    """Raise unless a saved per-param state fits param ``p`` under the saved ``group`` and the
    optimizer's update ``rule`` (:mod:`.rules`; None: AdamW's)."""
    rule = rule or ADAMW
    blocks = num_blocks_of(p.numel(), group["block_size"])
    dtype = options.state_dtype(group, p)
    moments = rule.moments(group)
    expected = {**{key: (tuple(p.shape), dtype) for key in moments},
                "error": (tuple(p.shape), dtype), "block_step": ((blocks,), torch.int32),
                "score_ema": ((blocks,), torch.float32)}
    required = (*moments, "block_step") if group["state_layout"] == "dense" else ()
    for key in required:
        if key not in state:
            raise ValueError(f"state_dict does not fit {name}: its state has no {key}")
    if group["state_layout"] == "compact":  # moments live in the group's slabs
        expected = {key: expected[key] for key in ("error", "score_ema")}
    for key, value in state.items():
        if key not in expected:
            raise ValueError(f"state_dict does not fit {name}: unknown state {key!r}")
        shape, want = expected[key]
        if key == "block_step" and value.numel() != blocks:
            raise ValueError(f"state_dict does not fit {name}: its block_step has "
                             f"{value.numel()} blocks, expected {blocks}")
        if tuple(value.shape) != shape:
            raise ValueError(f"state_dict does not fit {name}: its {key} has shape "
                             f"{tuple(value.shape)}, expected {shape} (the parameter's is {tuple(p.shape)})")
        if value.dtype != want:
            raise ValueError(f"state_dict does not fit {name}: its {key} is {value.dtype}, "
                             f"expected {want} (state_dtype={group['state_dtype']})")
    if "block_step" in state:
        check_counts(state["block_step"], f"the state of {name}: its block_step")
    for key in rule.nonnegative:
        if key in state:
            check_second_moment(state[key], f"the state of {name}: its {key}")


def loaded_compact(state: dict, saved_group: dict, params: list, index: int, name: str, rule=None,
                   per_slot: dict | None = None) -> dict:
    """A saved group's compact state, checked against this group's params and on their device;
    ``per_slot``: its per-slot vectors besides the step counts (see ``compact_state.create``)."""
    if sharding.is_dtensor(params[0]):
        raise ValueError(f"{name} is compact state of FSDP2-sharded params, which state_dict() keeps per rank: "
                         "checkpoint it with sparse_grad.distributed.optimizer_state_dict / "
                         "load_optimizer_state_dict (any world size)")
    if saved_group["state_layout"] != "compact":
        raise ValueError(f"{name} is given, but the saved group's state_layout is {saved_group['state_layout']!r}")
    rule = rule or ADAMW
    dtype = options.state_dtype(saved_group, params[0])
    compact_state.check_saved(state, [p.numel() for p in params], saved_group["block_size"], dtype, name,
                              lambda j: f"param_groups[{index}]['params'][{j}]", rule.moments(saved_group), per_slot)
    check_counts(state["block_step"], f"{name}['block_step']")
    for key in rule.nonnegative:
        if key in state:  # (a moment only some options keep: RMSprop's, Adam's amsgrad)
            check_second_moment(state[key], f"{name}[{key!r}]")
    return {key: value.to(device=params[0].device, copy=True) for key, value in state.items()}


# A saved step count the next step can still add one to in int32.
MAX_STEP = 2**31 - 2


def check_counts(value: torch.Tensor, name: str) -> None:
    """Per-block step counts must be counts: ≥ 0, and not so large that the next step overflows."""
    if value.numel() and (int(value.min()) < 0 or int(value.max()) > MAX_STEP):
        raise ValueError(f"{name} holds step counts outside [0, {MAX_STEP}]")


def check_second_moment(value: torch.Tensor, name: str) -> None:
    """A second moment is a mean of squares: a negative one would make the update NaN."""
    if value.numel() and bool((value < 0).any()):
        raise ValueError(f"{name} holds negative values: a second moment cannot be negative")


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def loaded_selection(saved, params: list, name: str):
    """A saved selection (``Selection.state_dict()``), checked against the group's ``params`` and
    copied to their device."""
    if not isinstance(saved, dict) or not {"key", "block_ids", "age"} <= set(saved) <= set(SELECTION_KEYS):
        raise ValueError(f"{name} must be a dict with keys {SELECTION_KEYS}")
    if not params:
        raise ValueError(f"{name} is given, but the group has no params to select from")
    key = saved["key"]
    if not isinstance(key, (tuple, list)) or len(key) != len(KEY_FIELDS):
        raise ValueError(f"{name}['key'] must be a tuple {KEY_FIELDS}")
    positions, block_size = key[0], key[1]
    if (not isinstance(positions, (tuple, list)) or any(isinstance(j, bool) or not isinstance(j, int) for j in positions)
            or list(positions) != sorted(set(positions)) or (positions and not 0 <= positions[0] <= positions[-1] < len(params))):
        raise ValueError(f"{name}['key'][0] must be ascending positions of the group's {len(params)} params, "
                         f"got {positions!r}")
    _checks.block_size(block_size, f"{name}['key'][1]")
    ids = saved["block_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1 or sharding.is_dtensor(ids):
        raise ValueError(f"{name}['block_ids'] must be a 1-D int64 tensor")
    num_blocks = sum(num_blocks_of(params[j].numel(), block_size) for j in positions)
    if ids.numel() > num_blocks:
        raise ValueError(f"{name}['block_ids'] holds {ids.numel()} ids, but the params it was made for "
                         f"have {num_blocks} blocks")
    if ids.numel() and not (int(ids[0]) >= 0 and int(ids[-1]) < num_blocks and bool((ids[1:] > ids[:-1]).all())):
        raise ValueError(f"{name}['block_ids'] must be strictly ascending ids in [0, {num_blocks})")
    age, draw = _count(saved["age"], f"{name}['age']"), _count(saved.get("draw", 0), f"{name}['draw']")
    key = (tuple(positions), *key[1:])
    return Selection(key, ids.to(device=params[0].device, copy=True), age, draw)


SELECTION_KEYS = ("key", "block_ids", "age", "draw")
KEY_FIELDS = ("positions", "block_size", "density", "scope", "score", "min_blocks_per_tensor", "selection", "seed")


def check_compact_selection(compact: dict, selection, numels: tuple, block_size: int, name: str) -> None:
    """The compact slabs hold exactly the selected blocks, in order: the step reads slab row i for
    the selection's i-th block until the next reselection."""
    if selection is None or selection.key[1] != block_size:
        return  # no selection the next step could keep: it reselects and reassigns the slots
    ids = compact_state.group_ids(selection.block_ids.to(compact["block_of_slot"].device), numels,
                                  selection.key[0], block_size)
    if not torch.equal(ids, compact["block_of_slot"]):
        raise ValueError(f"{name} holds the moments of other blocks than the group's selection")
