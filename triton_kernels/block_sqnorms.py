"""Per-block sums of squares over a whole list of tensors, in one launch per dtype."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .tables import TL_DTYPES, block_map, launch_config, compute_dtype, cached_tables, group_by


@triton.jit
def _block_sqnorms_kernel(
    out_ptr,  # fp32 [num_blocks]
    tensor_ptrs_ptr,  # int64 [T]: base address of each tensor
    numels_ptr,  # int64 [T]
    first_block_ptr,  # int64 [T]
    block_tensor_ptr,  # int32 [num_blocks]
    groups_ptr,  # int64 [T]: dtype group of each tensor; this launch handles `group`
    block_size,
    group,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # cdiv(block_size, CHUNK)
):
    block = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor_ptr + block)
    in_group = tl.load(groups_ptr + t) == group
    x_ptr = tl.load(tensor_ptrs_ptr + t).to(tl.pointer_type(DTYPE))
    start = (block - tl.load(first_block_ptr + t)) * block_size
    end = tl.minimum(start + block_size, tl.load(numels_ptr + t))
    end = tl.where(in_group, end, start)  # another launch handles this block: read nothing
    acc = tl.zeros([CHUNK], dtype=ACC_DTYPE)
    for chunk in range(NUM_CHUNKS):
        offsets = start + chunk * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + offsets, mask=offsets < end, other=0.0).to(ACC_DTYPE)
        acc += x * x
    tl.store(out_ptr + block, tl.sum(acc, axis=0).to(tl.float32), mask=in_group)


def launch_block_sqnorms(
    out: torch.Tensor,
    tensor_ptrs: torch.Tensor,
    numels: torch.Tensor,
    first_block: torch.Tensor,
    block_tensor: torch.Tensor,
    groups: torch.Tensor,
    block_size: int,
    group: int,
    dtype: torch.dtype,
    chunk: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch over ``out.numel()`` blocks, described by raw tables (see :mod:`.tables`)."""
    _block_sqnorms_kernel[(out.numel(),)](
        out, tensor_ptrs, numels, first_block, block_tensor, groups, block_size, group,
        DTYPE=TL_DTYPES[dtype],
        ACC_DTYPE=compute_dtype(dtype),
        **launch_config(block_size, out.device, 2048, chunk, num_warps),
    )


def block_sqnorms(tensors: Sequence[torch.Tensor], block_size: int, cache: dict | None = None) -> torch.Tensor:
    """fp32 ``[num_blocks]`` sums of squares of every block of every (contiguous) tensor.

    ``cache``: a dict the caller keeps while these tensors stay where they are (the tables built
    on the first call are reused from it).
    """
    prepared = None if cache is None else cache.get("block_sqnorms")
    if prepared is None:
        prepared = _tables(tensors, block_size)
        if cache is not None:
            cache["block_sqnorms"] = prepared
    bmap, ptrs, group_table, dtypes = prepared
    out = torch.empty(bmap.num_blocks, dtype=torch.float32, device=tensors[0].device)
    if bmap.num_blocks == 0:
        return out
    for g, dtype in enumerate(dtypes):
        launch_block_sqnorms(out, ptrs, bmap.numels, bmap.first_block, bmap.block_tensor,
                             group_table, block_size, g, dtype)
    return out


def _tables(tensors: Sequence[torch.Tensor], block_size: int):
    """The block map, the device pointer table and the dtype groups of a list of tensors."""
    device = tensors[0].device
    bmap = block_map(tuple(t.numel() for t in tensors), block_size, device)
    groups, dtypes = group_by([t.dtype for t in tensors])
    ptrs, group_table = cached_tables((tuple(t.data_ptr() for t in tensors), tuple(groups)), device)
    return bmap, ptrs, group_table, dtypes
