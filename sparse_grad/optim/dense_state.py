"""Dense per-param state (docs/design.md §4): moments like the param, one step count per block."""
from __future__ import annotations

import torch

from ..layout import num_blocks_of


def init_dense_state(state: dict, param: torch.Tensor, dtype: torch.dtype, block_size: int,
                     device: torch.device) -> None:
    """A param's dense state on its first step: moments like the param (a DTensor's sharded like
    it) and one int32 step count per block of the full tensor, on ``device``."""
    if "block_step" in state:
        return
    # Contiguous also beside a strided param: the kernels read state flat, block by block.
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    state["block_step"] = torch.zeros(num_blocks_of(param.numel(), block_size), dtype=torch.int32, device=device)


def init_error(state: dict, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A param's error-feedback buffer (``error_feedback=True``), zero on its first step."""
    if "error" not in state:
        state["error"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
    return state["error"]
