"""``state_layout="compact"`` (docs/design.md §4): moments only for the selected blocks of a param group.

A group's compact state is a slot table and moment slabs::

    slot_of_block  int32 [blocks of all the group's params]   slot of each block, -1 = none
    block_of_slot  int64 [capacity]                           block of each slot, ascending
    exp_avg        [capacity, block_size]                     row i: moments of block_of_slot[i]
    exp_avg_sq     [capacity, block_size]
    block_step     int32 [capacity]                           per-slot step counts
    param_numels   int64 [params of the group]                what the state was made for

Block ids here count over *all* of the group's params (so they survive a param losing its grad);
the update kernel takes ids over the params that take part, row ``i`` for id ``i``. The capacity is
the number of selected blocks. Policy at a reselection: a block that stays keeps its moments and
step count; a block entering gets zeroed moments and step 0; a block leaving frees its slot and
its moments are dropped (if it comes back, it starts afresh, like a new AdamW). Everything is
done on device with sizes known on the host: no sync.
"""
from __future__ import annotations

import functools

import torch

from ..layout import num_blocks_of
from . import options

# The slot table; beside it, one slab per moment of the update rule (AdamW's exp_avg and
# exp_avg_sq above; SGD's momentum_buffer, Lion's exp_avg).
TABLE_KEYS = ("slot_of_block", "block_of_slot", "block_step", "param_numels")


@functools.lru_cache(maxsize=32)
def _shift(numels: tuple[int, ...], positions: tuple[int, ...], block_size: int,
           device: torch.device) -> torch.Tensor | None:
    """Per block of the params taking part, what to add to its id to count over all params
    (``None`` when every param takes part)."""
    if positions == tuple(range(len(numels))):
        return None
    counts = [num_blocks_of(n, block_size) for n in numels]
    firsts = [sum(counts[:j]) for j in range(len(counts))]
    taking_part = [counts[j] for j in positions]
    shifts = [firsts[j] - sum(taking_part[:t]) for t, j in enumerate(positions)]
    return torch.repeat_interleave(torch.tensor(shifts, dtype=torch.int64),
                                   torch.tensor(taking_part)).to(device)


def group_ids(block_ids: torch.Tensor, numels: tuple[int, ...], positions: tuple[int, ...],
              block_size: int) -> torch.Tensor:
    """Ids over the params taking part → ids over all of the group's params."""
    shift = _shift(numels, positions, block_size, block_ids.device)
    return block_ids if shift is None else block_ids + shift[block_ids]


def create(numels: list[int], block_size: int, dtype: torch.dtype, device: torch.device,
           moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq"), per_slot: dict | None = None) -> dict:
    """An empty compact state (capacity 0) for a group of params with these element counts,
    with a slab per moment of the update rule and a vector per entry of ``per_slot`` (key →
    dtype: a per-block scalar beside the step count, as sparsify keeps NAdam's mu_product)."""
    num_blocks = sum(num_blocks_of(n, block_size) for n in numels)
    return {"param_numels": torch.tensor(numels, dtype=torch.int64, device=device),
            "slot_of_block": torch.full((num_blocks,), -1, dtype=torch.int32, device=device),
            "block_of_slot": torch.empty(0, dtype=torch.int64, device=device),
            **{key: torch.empty(0, block_size, dtype=dtype, device=device) for key in moments},
            **{key: torch.empty(0, dtype=vector_dtype, device=device) for key, vector_dtype in (per_slot or {}).items()},
            "block_step": torch.empty(0, dtype=torch.int32, device=device)}


def moment_keys(state: dict) -> tuple[str, ...]:
    """The slabs (and per-slot vectors) of a compact state, in the update rule's order."""
    return tuple(key for key in state if key not in TABLE_KEYS)


def reassign(state: dict, ids: torch.Tensor, fills: dict | None = None) -> dict:
    """The state for the new selection ``ids`` (group ids, ascending): slot i holds block ids[i];
    staying blocks keep moments and counts, entering ones start from zero, or from
    ``fills[key]`` (Adagrad's initial accumulator, NAdam's mu_product 1) (see the module doc)."""
    k = ids.numel()
    old = state["slot_of_block"][ids].long()
    kept = old >= 0
    fills = fills or {}
    if state["block_of_slot"].numel() == 0:  # nothing to keep (and nothing to index)
        gather = lambda key, slab: slab.new_full((k,) + tuple(slab.shape[1:]), fills.get(key, 0))  # noqa: E731
    else:
        index = old.clamp(min=0)

        def gather(key, slab):
            rows = slab[index]
            mask = kept.view((k,) + (1,) * (slab.dim() - 1))
            return torch.where(mask, rows, torch.full((), fills.get(key, 0), dtype=slab.dtype, device=slab.device))
    slot_of_block = torch.full_like(state["slot_of_block"], -1)
    slot_of_block[ids] = torch.arange(k, dtype=torch.int32, device=ids.device)
    new = {"param_numels": state["param_numels"], "slot_of_block": slot_of_block, "block_of_slot": ids.clone(),
           **{key: gather(key, state[key]) for key in moment_keys(state)},
           "block_step": gather("block_step", state["block_step"])}
    if state["block_of_slot"].numel() != k:
        return new
    # Same capacity: write into the existing tensors, so that a step captured in a CUDA graph
    # leaves its state where the next replay reads it.
    for key, value in new.items():
        if value is not state[key]:
            state[key].copy_(value)
    return state


def check_saved(state: dict, numels: list[int], block_size: int, dtype: torch.dtype, name: str,
                param_name, moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq"), per_slot: dict | None = None) -> None:
    """Raise unless a saved compact state fits params with these element counts, the update
    rule's ``moments`` and per-slot vectors (``per_slot``: key → dtype, as :func:`create`); a
    param that does not fit is named by ``param_name(j)``."""
    per_slot = per_slot or {}
    keys = TABLE_KEYS + tuple(moments) + tuple(per_slot)
    if not isinstance(state, dict) or set(state) != set(keys):
        raise ValueError(f"{name} must hold {keys}")
    saved = state["param_numels"]
    if not isinstance(saved, torch.Tensor) or saved.dim() != 1:
        raise ValueError(f"{name}['param_numels'] must be a 1-D tensor")
    saved = saved.tolist()  # a load is not a step: reading a few counts back is fine
    for j, (n, m) in enumerate(zip(saved, numels)):
        if n != m:
            raise ValueError(f"state_dict does not fit {param_name(j)}: its compact state was made for "
                             f"{n} elements, the parameter has {m}")
    if len(saved) != len(numels):
        raise ValueError(f"{name} was made for {len(saved)} params, the group has {len(numels)}")
    num_blocks = sum(num_blocks_of(n, block_size) for n in numels)
    capacity = state["block_of_slot"].numel()
    expected = {"slot_of_block": ((num_blocks,), torch.int32), "block_of_slot": ((capacity,), torch.int64),
                **{key: ((capacity, block_size), dtype) for key in moments},
                **{key: ((capacity,), vector_dtype) for key, vector_dtype in per_slot.items()},
                "block_step": ((capacity,), torch.int32)}
    for key, (shape, want) in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != want:
            raise ValueError(f"{name}[{key!r}] does not fit: expected {want} of shape {shape}, got "
                             f"{getattr(value, 'dtype', type(value).__name__)} "
                             f"{tuple(getattr(value, 'shape', ()))}")
    slots = state["block_of_slot"]
    if capacity and not (int(slots[0]) >= 0 and int(slots[-1]) < num_blocks and bool((slots[1:] > slots[:-1]).all())):
        raise ValueError(f"{name}['block_of_slot'] must be strictly ascending block ids in [0, {num_blocks})")
    table = torch.full((num_blocks,), -1, dtype=torch.int32, device=slots.device)
    table[slots] = torch.arange(capacity, dtype=torch.int32, device=slots.device)
    if not torch.equal(table, state["slot_of_block"].to(slots.device)):
        raise ValueError(f"{name}['slot_of_block'] does not match its block_of_slot (each slot's block "
                         "must point back at that slot, every other block at -1)")


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def check_compact(state: dict | None, group: dict, where: str, whole=None) -> None:
    """Raise unless a group's compact state (if any) fits its layout option, block size and
    state dtype. ``whole``: the sharded view of all the group's params (FSDP2), else None."""
    if group["state_layout"] == "dense":
        if state is not None:
            raise ValueError(f"{where}['state_layout'] is 'dense', but the group has compact state")
        return
    dtypes = {options.state_dtype(group, p) for p in group["params"]}
    if len(dtypes) > 1:
        raise ValueError(f"{where}['state_layout'] is 'compact', which keeps one state dtype per group, "
                         f"but its params have several ({sorted(map(str, dtypes))}): set state_dtype")
    if state is None:
        return
    blocks = sum(num_blocks_of(p.numel(), group["block_size"]) for p in group["params"])
    if whole is not None:  # slots of this rank's blocks only
        blocks = whole.kernel_layout.num_blocks
    slabs = [state[key] for key in moment_keys(state) if state[key].dim() == 2]  # none for SGD without momentum
    if any(slab.shape[1] != group["block_size"] for slab in slabs) or state["slot_of_block"].numel() != blocks:
        raise ValueError(f"{where}['block_size'] is {group['block_size']}, but the group's compact "
                         "state was made with another block size")
    if slabs and slabs[0].dtype not in dtypes:
        raise ValueError(f"{where}['state_dtype'] is {group['state_dtype']}, but the group's compact "
                         f"state is {slabs[0].dtype}")
