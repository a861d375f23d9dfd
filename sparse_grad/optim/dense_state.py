"""Dense per-param state (docs/design.md §4): moments like the param, one step count per block."""
from __future__ import annotations

import torch

from ..layout import num_blocks_of


def init_dense_state(state: dict, param: torch.Tensor, dtype: torch.dtype, block_size: int,
                     device: torch.device, moments: tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> None:
    """A param's dense state on its first step: the update rule's ``moments`` like the param (a
    DTensor's sharded like it) and one int32 step count per block of the full tensor, on
    ``device``. A moment the rule needs later (SGD's momentum set above 0 mid-run) starts at zero."""
    # Contiguous also beside a strided param: the kernels read state flat, block by block.
    for key in moments:
        if key not in state:
            state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    if "block_step" not in state:
        state["block_step"] = torch.zeros(num_blocks_of(param.numel(), block_size), dtype=torch.int32,
                                          device=device)


def init_error(state: dict, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A param's error-feedback buffer (``error_feedback=True``), zero on its first step."""
    if "error" not in state:
        state["error"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    return state["error"]
