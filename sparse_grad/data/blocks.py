"""Which parameter blocks data selection scores against: the optimizer's current selection, a
blueprint's mask, explicit ids, or every block (docs/design.md §2 block numbering)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import _checks
from ..analysis.params import trainable_parameters
from ..layout import cached_layout, num_blocks_of

__all__ = ["ParamBlocks", "resolve_blocks"]


@dataclass(frozen=True)
class ParamBlocks:
    """Selected blocks of one parameter: ``block_ids`` are ascending, unique int64 ids local to
    the tensor (block ``b`` is its flat elements ``[b·block_size, (b+1)·block_size)``, the last
    one possibly shorter), on the CPU."""

    name: str
    param: torch.nn.Parameter
    block_size: int
    block_ids: torch.Tensor


def _ids_of(value, name: str, num_blocks: int) -> torch.Tensor:
    """Local block ids from a bool mask per block or from integer ids, checked."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"blocks[{name!r}] must be a tensor (bool mask per block or int ids), "
                        f"got {type(value).__name__}")
    value = value.detach().cpu()
    if value.dtype == torch.bool:
        if value.shape != (num_blocks,):
            raise ValueError(f"blocks[{name!r}] is a mask of shape {tuple(value.shape)}; the parameter "
                             f"has {num_blocks} blocks")
        return torch.nonzero(value).flatten()
    if value.is_floating_point() or value.is_complex() or value.dim() != 1:
        raise TypeError(f"blocks[{name!r}] must be a 1-D integer tensor of block ids or a bool mask, "
                        f"got {value.dtype} of shape {tuple(value.shape)}")
    ids = torch.unique(value.long())  # sorted
    if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= num_blocks):
        raise ValueError(f"blocks[{name!r}] has block ids outside [0, {num_blocks})")
    return ids


def _from_optimizer(optimizer, names: dict[int, str]) -> list[ParamBlocks]:
    selected = optimizer.selected_blocks()
    if not selected:  # before the first step: every block of the optimizer's params
        selected = []
        for index, group in enumerate(optimizer.param_groups):
            params = list(group["params"])
            n = sum(num_blocks_of(p.numel(), group["block_size"]) for p in params)
            selected.append((index, params, torch.arange(n), group["block_size"]))
    found = []
    for index, params, block_ids, block_size in selected:
        layout = cached_layout(tuple(p.numel() for p in params), block_size, None)
        ids = block_ids.detach().cpu()
        owner = layout.tensor_of_block(ids)
        for t, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(f"the optimizer's param_groups[{index}] holds a parameter of shape "
                                 f"{tuple(p.shape)} that is not a trainable parameter of the model")
            local = ids[owner == t] - layout.block_range(t)[0]
            if local.numel():
                found.append(ParamBlocks(names[id(p)], p, block_size, local))
    return found


def resolve_blocks(model: torch.nn.Module, blocks=None, *, block_size: int | None = None,
                   density: float | None = None, scope: str = "global") -> list[ParamBlocks]:
    """The selected blocks of ``model``'s trainable parameters, in the model's parameter order.

    ``blocks`` may be:

    - a :class:`~sparse_grad.SparseAdamW`: its current selection (``selected_blocks()``); before
      its first step, every block of its params;
    - a :class:`~sparse_grad.blueprint.Blueprint`: its ``to_mask(density, scope)``;
    - a mapping ``{parameter name: bool mask per block or int64 block ids}`` with ``block_size``;
    - ``None``: every block of every trainable parameter, with ``block_size``.

    Parameters with no selected block are left out.
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("model has no trainable parameters to score")
    names = {id(p): n for n, p in named}
    by_name = dict(named)
    order = {n: i for i, (n, _) in enumerate(named)}
    if callable(getattr(blocks, "selected_blocks", None)):
        found = _from_optimizer(blocks, names)
    else:
        if callable(getattr(blocks, "to_mask", None)):  # a Blueprint
            if density is None:
                raise ValueError("density is required to take the blocks from a blueprint")
            blocks.validate(model)
            block_size = blocks.block_size
            blocks = blocks.to_mask(_checks.density(density, "density"), scope)
        if block_size is None:
            raise ValueError("block_size is required unless blocks is a SparseAdamW or a Blueprint")
        block_size = _checks.positive_int(block_size, "block_size")
        if blocks is None:
            blocks = {n: torch.ones(num_blocks_of(p.numel(), block_size), dtype=torch.bool) for n, p in named}
        if not isinstance(blocks, Mapping):
            raise TypeError(f"blocks must be a SparseAdamW, a Blueprint, a mapping {{parameter name: block ids "
                            f"or mask}} or None, got {type(blocks).__name__}")
        found = []
        for name, value in blocks.items():
            if name not in by_name:
                raise ValueError(f"blocks names {name!r}, which is not a trainable parameter of the model")
            p = by_name[name]
            ids = _ids_of(value, name, num_blocks_of(p.numel(), block_size))
            if ids.numel():
                found.append(ParamBlocks(name, p, block_size, ids))
    return sorted(found, key=lambda b: order[b.name])
