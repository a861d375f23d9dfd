"""Distributed checkpoints of SparseAdamW, resumable at another world size.

``SparseAdamW.state_dict()`` is the state of one process: under FSDP2 its compact slabs hold this
rank's parts of the selected blocks, and its selection and slot tables live outside the per-param
state that ``torch.distributed.checkpoint.state_dict.get_state_dict`` collects. The functions
here give ``torch.distributed.checkpoint`` (DCP) a state dict in world-size-independent form::

    {"state": {param index: {"exp_avg":    like the param (a DTensor, Shard(0), under FSDP2),
                             "exp_avg_sq": like the param,
                             "block_step": int32 [blocks of the full param], the same on every rank,
                             "score_ema":  fp32 [blocks of the full param]   (score_ema > 0 only),
                             "error":      like the param                   (error_feedback only)}},
     "sparse_grad": bytes: the param groups' options, each group's selection (global block ids,
                    age, draw) and which entries above hold state (the rest are placeholders)}

Compact state is written in this dense form (its moments scattered into zeros, its per-slot counts
into the per-block counts; unselected blocks have no moments in compact state, so nothing is
lost) and rebuilt from it on load, for the new world size's shards. A checkpoint is therefore as
large as dense state on disk, and saving compact state briefly allocates dense moments.

Usage (every rank)::

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from sparse_grad.distributed import optimizer_state_dict, load_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": optimizer_state_dict(opt)}, checkpoint_id=path)
    # resume, any world size: build model, fully_shard and SparseAdamW as before, then
    state = {"model": get_model_state_dict(model), "optim": optimizer_state_dict(opt)}  # the template
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    load_optimizer_state_dict(opt, state["optim"])
"""
from __future__ import annotations

import io

import torch
import torch.distributed as dist

from .layout import num_blocks_of
from .optim import SparseAdamW, checkpoint, compact_state, options as group_options, sharding
from .optim.group_state import Selection

__all__ = ["load_optimizer_state_dict", "optimizer_state_dict"]

FORMAT = 1
_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "error")


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, SparseAdamW):
        raise TypeError(f"optimizer must be a sparse_grad.SparseAdamW, got {type(optimizer).__name__}")


def _view(optimizer: SparseAdamW, index: int) -> sharding.ShardedGroup:
    """The group's params as pieces of their full tensors: this rank's shards under FSDP2, the
    whole tensors otherwise."""
    group = optimizer.param_groups[index]
    params = group["params"]
    sharded = sharding.whole_group(params, group["block_size"], f"param_groups[{index}]")
    if sharded is not None:
        return sharded
    return sharding.cached(tuple(p.numel() for p in params), tuple((0, p.numel()) for p in params),
                           group["block_size"], params[0].device, None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if sharding.is_dtensor(t) else t


def _keys(group: dict) -> list[str]:
    keys = ["exp_avg", "exp_avg_sq", "block_step"]
    if group["score_ema"] > 0.0:
        keys.append("score_ema")
    if group["error_feedback"]:
        keys.append("error")
    return keys


def _placeholder(key: str, p: torch.Tensor, group: dict) -> torch.Tensor:
    if key in _PER_ELEMENT:
        return torch.zeros_like(p, dtype=group_options.state_dtype(group, p))
    dtype = torch.int32 if key == "block_step" else torch.float32
    return torch.zeros(num_blocks_of(p.numel(), group["block_size"]), dtype=dtype, device=_local(p).device)


def _padded(view: sharding.ShardedGroup, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces as rows of a ``[blocks, block_size]`` slab (zeros past each piece's end)."""
    block_size = view.kernel_layout.block_size
    rows = pieces[0].new_zeros(view.kernel_layout.num_blocks, block_size) if pieces else None
    for t, piece in enumerate(pieces):
        start, _ = view.kernel_layout.block_range(t)
        rows.view(-1)[start * block_size:start * block_size + piece.numel()] = piece
    return rows


def _unpad(view: sharding.ShardedGroup, rows: torch.Tensor, pieces: list[torch.Tensor]) -> None:
    block_size = view.kernel_layout.block_size
    for t, piece in enumerate(pieces):
        start, _ = view.kernel_layout.block_range(t)
        piece.copy_(rows.view(-1)[start * block_size:start * block_size + piece.numel()])


def _compact_to_dense(optimizer: SparseAdamW, index: int, entries: list[dict]) -> None:
    """Scatter the group's compact slabs into the (zeroed) dense entries."""
    group, view = optimizer.param_groups[index], _view(optimizer, index)
    state = optimizer.group_state(index).compact
    rows = state["block_of_slot"]  # this rank's piece blocks over all the group's params
    for key in ("exp_avg", "exp_avg_sq"):
        pieces = view.pieces([_local(e[key]) for e in entries])
        if pieces:
            padded = _padded(view, pieces)
            padded[rows] = state[key]
            _unpad(view, padded, pieces)
    steps = torch.zeros(view.global_layout.num_blocks, dtype=torch.int32, device=view.piece_global.device)
    steps[view.piece_global[rows]] = state["block_step"]
    if view.process_group is not None:  # a rank holding no part of a block does not know its count
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=view.process_group)
    for e, part in zip(entries, steps.split(view.global_layout.block_counts)):
        e["block_step"].copy_(part)
    del group


def optimizer_state_dict(optimizer: SparseAdamW) -> dict:
    """The optimizer's state in world-size-independent form (see the module doc), ready for
    ``torch.distributed.checkpoint.save``, or as the template ``dcp.load`` fills in. Collective
    under FSDP2 with compact state: call it on every rank."""
    _check_optimizer(optimizer)
    state, present, pid = {}, {}, 0
    for i, group in enumerate(optimizer.param_groups):
        compact = group["state_layout"] == "compact" and optimizer.group_state(i).compact is not None
        entries = []
        for p in group["params"]:
            own = optimizer.state.get(p, {})
            entry, have = {}, []
            for key in _keys(group):
                dense_key = key in ("exp_avg", "exp_avg_sq", "block_step") and group["state_layout"] == "compact"
                if key in own and not dense_key:
                    entry[key] = own[key]
                    have.append(key)
                else:
                    entry[key] = _placeholder(key, p, group)
                    if dense_key and compact:
                        have.append(key)
            state[pid], present[pid] = entry, have
            entries.append(entry)
            pid += 1
        if compact:
            _compact_to_dense(optimizer, i, entries)
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} | {"num_params": len(g["params"])}
              for g in optimizer.param_groups]
    selections = {i: {**selection.state_dict(), "block_ids": selection.block_ids.tolist()}
                  for i, selection in _selections(optimizer)}
    meta = {"format": FORMAT, "param_groups": groups, "selections": selections, "present": present}
    buffer = io.BytesIO()
    torch.save(meta, buffer)
    return {"state": state, "sparse_grad": buffer.getvalue()}


def _selections(optimizer: SparseAdamW) -> list[tuple[int, Selection]]:
    states = (optimizer.group_state(i) for i in range(len(optimizer.param_groups)))
    return [(i, state.selection) for i, state in enumerate(states) if state.selection is not None]


def load_optimizer_state_dict(optimizer: SparseAdamW, state_dict: dict) -> None:
    """Load what :func:`optimizer_state_dict` gave (after ``dcp.load`` filled it in), into an
    optimizer over the same params in the same order, sharded over any number of ranks.
    Checked before anything changes."""
    _check_optimizer(optimizer)
    if not isinstance(state_dict, dict) or set(state_dict) != {"state", "sparse_grad"}:
        raise ValueError("state_dict must be what sparse_grad.distributed.optimizer_state_dict returned")
    meta = state_dict["sparse_grad"]
    if isinstance(meta, (bytes, bytearray)):
        try:  # tensors, numbers, strings, dtypes and containers only: nothing is unpickled
            meta = torch.load(io.BytesIO(meta), weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means a file we did not write
            raise ValueError(f"state_dict['sparse_grad'] cannot be read as a sparse_grad.distributed "
                             f"checkpoint: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("state_dict['sparse_grad'] is not a sparse_grad.distributed checkpoint")
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer {len(optimizer.param_groups)}")
    pid, selections = 0, {}
    for i, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        where = f"state_dict param group {i}"
        if saved["num_params"] != len(group["params"]):
            raise ValueError(f"{where} has {saved['num_params']} params, the optimizer's {len(group['params'])}")
        options = {k: v for k, v in saved.items() if k != "num_params"}
        group_options.check_group({**optimizer.defaults, **options}, where, optimizer.blueprint is not None)
        for key in ("block_size", "state_layout", "state_dtype", "score_ema", "error_feedback"):
            if options[key] != group[key] and not (key == "score_ema" and (options[key] > 0) == (group[key] > 0)):
                raise ValueError(f"{where} was saved with {key}={options[key]!r}, the optimizer has "
                                 f"{group[key]!r}: build the optimizer with the same options")
        for j, p in enumerate(group["params"]):
            entry = state_dict["state"].get(pid + j)
            if not isinstance(entry, dict) or set(entry) != set(_keys(options)):
                raise ValueError(f"state_dict['state'][{pid + j}] must hold {_keys(options)}")
            for key, value in entry.items():
                want = _placeholder(key, p, options)
                if (not isinstance(value, torch.Tensor) or value.shape != want.shape or value.dtype != want.dtype
                        or sharding.is_dtensor(value) != sharding.is_dtensor(want)):
                    raise ValueError(f"state_dict['state'][{pid + j}][{key!r}] does not fit "
                                     f"param_groups[{i}]['params'][{j}] of shape {tuple(p.shape)}")
        if meta["selections"].get(i) is not None:
            selections[i] = _loaded_selection(meta["selections"][i], group["params"], f"{where}'s selection")
        pid += len(group["params"])
    # Checked: write.
    optimizer.state.clear()
    for i in range(len(optimizer.param_groups)):
        optimizer.group_state(i).clear()
    pid = 0
    for i, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        group.update({k: v for k, v in saved.items() if k != "num_params"})
        selection, compact = selections.get(i), None
        entries = []
        for j, p in enumerate(group["params"]):
            entry, have = state_dict["state"][pid + j], meta["present"][pid + j]
            entries.append(entry)
            own = {key: entry[key].detach().clone() for key in have  # not shared with the state dict
                   if group["state_layout"] == "dense" or key in ("score_ema", "error")}
            if own:
                optimizer.state[p] = own
        if group["state_layout"] == "compact" and selection is not None:
            compact = _dense_to_compact(optimizer, i, selection, entries)
        optimizer.group_state(i).set(selection, compact)
        pid += len(group["params"])


def _loaded_selection(saved, params: list, name: str) -> Selection:
    """A selection as :func:`optimizer_state_dict` saved it (ids as a list), checked."""
    ids = saved.get("block_ids") if isinstance(saved, dict) else None
    if not isinstance(ids, list) or not all(type(b) is int for b in ids):
        raise ValueError(f"{name}['block_ids'] must be a list of ints")
    return checkpoint.loaded_selection({**saved, "block_ids": torch.tensor(ids, dtype=torch.int64)}, params, name)


def _dense_to_compact(optimizer: SparseAdamW, index: int, selection: Selection, entries: list[dict]) -> dict:
    """The group's compact state, for this rank's shards, rebuilt from the dense form and the
    selection."""
    group, view = optimizer.param_groups[index], _view(optimizer, index)
    ids = compact_state.group_ids(selection.block_ids, tuple(p.numel() for p in group["params"]),
                             tuple(selection.key[0]), group["block_size"])
    local = view.local_of_global[ids]
    mine = local >= 0
    local, ids = local[mine], ids[mine]
    dtype = group_options.state_dtype(group, group["params"][0])
    state = compact_state.create(list(view.kernel_layout.numels), group["block_size"], dtype, view.piece_global.device)
    state = compact_state.reassign(state, local)
    for key in ("exp_avg", "exp_avg_sq"):
        pieces = view.pieces([_local(e[key]) for e in entries])
        if pieces:
            state[key].copy_(_padded(view, pieces)[local])
    steps = torch.cat([e["block_step"] for e in entries])
    state["block_step"].copy_(steps[ids])
    return state
