"""Per-block sums of squares over a whole list of tensors, in one launch per dtype."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .select_blocks import BINS, FirstPass, _digit, _key_of
from .tables import (TL_DTYPES, block_map, cached_tables, compute_dtype, element_offsets, group_by, launch_config,
                     vector_width)


@triton.jit
def _block_sqnorms_kernel(
    out_ptr,  # fp32 [num_blocks]
    base_ptr,  # DTYPE: the first tensor of group `group`
    offsets_ptr,  # int64 [T]: where each tensor starts, in elements from its group's base_ptr
    numels_ptr,  # int64 [T]
    first_block_ptr,  # int64 [T]
    block_tensor_ptr,  # int32 [num_blocks]
    groups_ptr,  # int64 [T]: dtype group of each tensor; this launch handles `group`
    hist_ptr,  # int32 [3, S, BINS]: a selection's histograms (FIRST_PASS), its first pass filled here
    block_size,
    group,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # cdiv(block_size, CHUNK)
    VEC: tl.constexpr,  # elements per 16 bytes if every tensor of the group and block_size allow it, else 1
    FIRST_PASS: tl.constexpr,  # 0: sums only; 1: and the selection's first pass, one segment; 2: a segment per tensor
    BINS: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor_ptr + block)
    in_group = tl.load(groups_ptr + t) == group
    # Element offsets from a pointer argument, not addresses read from a table: the compiler
    # knows an argument's alignment (16 bytes when it is), never a loaded address's.
    offset = tl.load(offsets_ptr + t)
    start = (block - tl.load(first_block_ptr + t)) * block_size
    if VEC > 1:  # checked on the host: every tensor and every block start on 16 bytes
        offset = tl.multiple_of(offset, VEC)
        start = tl.multiple_of(start, VEC)
    x_ptr = base_ptr + offset
    end = tl.minimum(start + block_size, tl.load(numels_ptr + t))
    end = tl.where(in_group, end, start)  # another launch handles this block: read nothing
    acc = tl.zeros([CHUNK], dtype=ACC_DTYPE)
    if end - start == NUM_CHUNKS * CHUNK:  # a full block (CHUNK divides block_size): no mask
        for chunk in range(NUM_CHUNKS):
            x = tl.load(x_ptr + start + chunk * CHUNK + tl.arange(0, CHUNK)).to(ACC_DTYPE)
            acc += x * x
    else:  # a tensor's partial last block: the same sums, lane for lane, with zeros past the end
        for chunk in range(NUM_CHUNKS):
            offsets = start + chunk * CHUNK + tl.arange(0, CHUNK)
            x = tl.load(x_ptr + offsets, mask=offsets < end, other=0.0).to(ACC_DTYPE)
            acc += x * x
    sqnorm = tl.sum(acc, axis=0).to(tl.float32)
    tl.store(out_ptr + block, sqnorm, mask=in_group)
    if FIRST_PASS > 0:
        # The key of the very fp32 value stored, so the selection's later passes (which read it
        # back) see the histogram they would have built. Each dtype's launch adds only its blocks.
        segment = t.to(tl.int64) if FIRST_PASS == 2 else 0
        tl.atomic_add(hist_ptr + segment * BINS + _digit(_key_of(sqnorm), 0), 1, mask=in_group, sem="relaxed")


def launch_block_sqnorms(
    out: torch.Tensor,
    base: torch.Tensor,
    offsets: torch.Tensor,
    numels: torch.Tensor,
    first_block: torch.Tensor,
    block_tensor: torch.Tensor,
    groups: torch.Tensor,
    block_size: int,
    group: int,
    dtype: torch.dtype,
    chunk: int | None = None,
    num_warps: int | None = None,
    vec: int = 1,
    first_pass: FirstPass | None = None,
) -> None:
    """Launch over ``out.numel()`` blocks, described by raw tables (see :mod:`.tables`):
    ``offsets[t]`` is where tensor t starts, in elements from the tensor ``base`` (of ``dtype``);
    ``vec`` > 1 (see :func:`vector_width`) lets the compiler load ``vec`` elements at once;
    ``first_pass``: the selection histograms this launch's blocks add their first digits to."""
    _block_sqnorms_kernel[(out.numel(),)](
        out, base, offsets, numels, first_block, block_tensor, groups,
        out if first_pass is None else first_pass.hist,  # not read without FIRST_PASS
        block_size, group,
        DTYPE=TL_DTYPES[dtype],
        ACC_DTYPE=compute_dtype(dtype),
        VEC=vec,
        FIRST_PASS=0 if first_pass is None else 2 if first_pass.per_tensor else 1,
        BINS=BINS,
        **launch_config(block_size, out.device, 2048, chunk, num_warps),
    )


def block_sqnorms(tensors: Sequence[torch.Tensor], block_size: int, cache: dict | None = None,
                  first_pass: FirstPass | None = None) -> torch.Tensor:
    """fp32 ``[num_blocks]`` sums of squares of every block of every (contiguous) tensor.

    ``cache``: a dict the caller keeps while these tensors stay where they are (the tables built
    on the first call are reused from it). ``first_pass``: a selection's histograms, zeroed, to
    which every block adds the first digit of its sum's rank key (the selection of these sums
    then skips its first pass; see :class:`~.select_blocks.FirstPass`).
    """
    prepared = None if cache is None else cache.get("block_sqnorms")
    if prepared is None:
        prepared = _tables(tensors, block_size)
        if cache is not None:
            cache["block_sqnorms"] = prepared
    bmap, offsets, group_table, dtypes, bases, vecs = prepared
    out = torch.empty(bmap.num_blocks, dtype=torch.float32, device=tensors[0].device)
    if bmap.num_blocks == 0:
        return out
    for g, dtype in enumerate(dtypes):
        launch_block_sqnorms(out, tensors[bases[g]], offsets, bmap.numels, bmap.first_block, bmap.block_tensor,
                             group_table, block_size, g, dtype, vec=vecs[g], first_pass=first_pass)
    return out


def _tables(tensors: Sequence[torch.Tensor], block_size: int):
    """The block map, the device offset table, the dtype groups of a list of tensors, the index
    of each group's base tensor and its vector width. Indices, not tensors: a cache entry must
    not keep freed grads alive."""
    device = tensors[0].device
    bmap = block_map(tuple(t.numel() for t in tensors), block_size, device)
    groups, dtypes = group_by([t.dtype for t in tensors])
    bases = [groups.index(g) for g in range(len(dtypes))]
    offsets = element_offsets(tensors, [tensors[bases[g]] for g in groups])
    offsets, group_table = cached_tables((offsets, tuple(groups)), device)
    vecs = [vector_width([t for t, tg in zip(tensors, groups) if tg == g], block_size) for g in range(len(dtypes))]
    return bmap, offsets, group_table, dtypes, bases, vecs
