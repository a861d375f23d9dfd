"""Triton backend: multi-tensor kernels from ``sparse_grad.triton_kernels``; selection on device."""
from __future__ import annotations

from . import triton_kernels
from .topk_select import select_blocks

_kernels = triton_kernels()
block_sqnorms = _kernels.block_sqnorms
sparse_adamw_step = _kernels.sparse_adamw_step

__all__ = ["block_sqnorms", "select_blocks", "sparse_adamw_step"]
