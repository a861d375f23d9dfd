"""Triton backend: multi-tensor kernels from ``sparse_grad.triton_kernels``, selection included
(one launch per op for a group of one dtype; ``topk_select`` stays the reference it is tested
against)."""
from __future__ import annotations

from . import triton_kernels

_kernels = triton_kernels()
block_sqnorms = _kernels.block_sqnorms
select_blocks = _kernels.select_blocks
FirstPass = _kernels.FirstPass
sparse_adamw_step = _kernels.sparse_adamw_step
sparse_sgd_step = _kernels.sparse_sgd_step
sparse_lion_step = _kernels.sparse_lion_step

__all__ = ["FirstPass", "block_sqnorms", "select_blocks", "sparse_adamw_step", "sparse_lion_step", "sparse_sgd_step"]
