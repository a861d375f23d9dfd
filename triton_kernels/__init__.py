"""Triton kernels of sparse_grad, installed as ``sparse_grad.triton_kernels``.

One launch covers every tensor of a list: kernels read each tensor's base address from an int64
pointer table and the owning tensor of each block from an int32 block->tensor map. On CPU tensors
they run under ``TRITON_INTERPRET=1`` (set it before this package is imported).
"""
from .block_sqnorms import block_sqnorms, launch_block_sqnorms
from .select_blocks import FirstPass, launch_select_blocks, select_blocks
from .sparse_adamw import launch_sparse_adamw, sparse_adamw_step, sparse_lion_step, sparse_sgd_step
from .tables import BlockMap, block_map, clear_cache

__all__ = [
    "BlockMap",
    "FirstPass",
    "block_map",
    "block_sqnorms",
    "clear_cache",
    "launch_block_sqnorms",
    "launch_select_blocks",
    "launch_sparse_adamw",
    "select_blocks",
    "sparse_adamw_step",
    "sparse_lion_step",
    "sparse_sgd_step",
]
