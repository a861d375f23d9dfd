"""What SparseAdamW.load_state_dict checks before it changes anything (docs/design.md §4).

Each check names the first parameter (or state entry) that does not fit the optimizer's params.
"""
from __future__ import annotations

import torch

from ..layout import num_blocks_of
from . import compact_state, options, sharding


def check_param_state(state: dict, p: torch.Tensor, group: dict, name: str) -> None:
    """Raise unless a saved per-param state fits param ``p`` under the saved ``group``."""
    blocks = num_blocks_of(p.numel(), group["block_size"])
    dtype = options.state_dtype(group, p)
    expected = {"exp_avg": (tuple(p.shape), dtype), "exp_avg_sq": (tuple(p.shape), dtype),
                "error": (tuple(p.shape), dtype), "block_step": ((blocks,), torch.int32),
                "score_ema": ((blocks,), torch.float32)}
    required = ("exp_avg", "exp_avg_sq", "block_step") if group["state_layout"] == "dense" else ()
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


def loaded_compact(state: dict, saved_group: dict, params: list, index: int) -> dict:
    """A saved group's compact state, checked against this group's params and on their device."""
    name = f"state_dict['compact'][{index}]"
    if sharding.is_dtensor(params[0]):
        raise ValueError(f"{name} is compact state of FSDP2-sharded params, which state_dict() keeps per rank: "
                         "checkpoint it with sparse_grad.distributed.optimizer_state_dict / "
                         "load_optimizer_state_dict (any world size)")
    if saved_group["state_layout"] != "compact":
        raise ValueError(f"{name} is given, but the saved group's state_layout is {saved_group['state_layout']!r}")
    dtype = options.state_dtype(saved_group, params[0])
    compact_state.check_saved(state, [p.numel() for p in params], saved_group["block_size"], dtype, name,
                         lambda j: f"param_groups[{index}]['params'][{j}]")
    return {key: value.to(device=params[0].device, copy=True) for key, value in state.items()}
