"""A Linear layer's backward that computes the weight gradient of some rows only
(docs/design.md §11).

A row-major ``[out, in]`` weight cut into flat blocks of ``block_size`` elements: a block covers
whole rows or a slice of one row, so the rows a set of blocks touches are known from the block
ids alone, and their gradient is one GEMM over the gathered rows of the output gradient. Rows
that are computed hold the exact gradient (the same dot products as torch's); the others are 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..optim.compact_grads import gather_blocks


def rows_of_blocks(block_ids: torch.Tensor, first_block: int, end_block: int, numel: int, row_len: int,
                   block_size: int, num_rows: int) -> torch.Tensor:
    """The ascending rows (int64, on the ids' device) of a ``[num_rows, row_len]`` tensor that the
    blocks ``block_ids`` in ``[first_block, end_block)`` touch; the tensor's first block is
    ``first_block``. One host sync (the number of rows fixes the GEMM's shape)."""
    local = block_ids[(block_ids >= first_block) & (block_ids < end_block)] - first_block
    first_row = local * block_size // row_len
    last_row = ((local + 1) * block_size).clamp(max=numel).sub(1) // row_len
    # +1 at a block's first row and -1 after its last: the running sum is > 0 on covered rows.
    marks = torch.zeros(num_rows + 1, dtype=torch.int64, device=block_ids.device)
    ones = torch.ones_like(first_row)
    marks.index_add_(0, first_row, ones).index_add_(0, last_row + 1, -ones)
    return (marks.cumsum(0)[:-1] > 0).nonzero().squeeze(1)


def block_starts(local_ids: torch.Tensor, rows: torch.Tensor, row_len: int, block_size: int) -> torch.Tensor:
    """Where each block (local ids, ascending) starts in the flat ``[len(rows), row_len]`` result
    of the rows GEMM. A block's rows are consecutive and all in ``rows``, so its elements are
    consecutive there too: its start, less the rows skipped before its first row."""
    start = local_ids * block_size
    first_row = start // row_len
    skipped = first_row - torch.searchsorted(rows, first_row)
    return start - skipped * row_len


class SelectedRowsLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward gives ``weight`` a gradient on ``rows`` only
    (zeros elsewhere); the input's and the bias's gradients are complete.

    ``compact``: None, or ``(slab_rows, starts, block_size)``: the weight's selected blocks'
    gradient is added into ``slab_rows`` (its rows of the group's compact gradient), gathered
    from the rows GEMM at ``starts`` (:func:`block_starts`), and ``weight`` gets no gradient. The
    slab is kept on ctx, not saved: each backward adds into it in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, compact=None):
        ctx.save_for_backward(x, weight, rows)
        ctx.has_bias = bias is not None
        ctx.compact = compact
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rows = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad.mm(weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            rows_grad = flat_grad.index_select(1, rows).t().mm(flat_x)
            if ctx.compact is None:
                grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
                grad_w.index_copy_(0, rows, rows_grad)
            else:
                slab_rows, starts, block_size = ctx.compact
                slab_rows.add_(gather_blocks(rows_grad, starts, block_size))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b, None, None


def selected_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         rows: torch.Tensor, compact: tuple | None = None) -> torch.Tensor:
    """:class:`SelectedRowsLinear` with autocast's casts done first, as autocast does them for
    ``F.linear`` (so the backward sees the dtypes the forward used, and the casts' own backward
    returns the gradient in the params' dtypes, as without it)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return SelectedRowsLinear.apply(x, weight, bias, rows, compact)
