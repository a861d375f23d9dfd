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


class SelectedRowsLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward gives ``weight`` a gradient on ``rows`` only
    (zeros elsewhere); the input's and the bias's gradients are complete."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        ctx.save_for_backward(x, weight, rows)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rows = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad.mm(weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            flat_x = x.reshape(-1, x.shape[-1])
            grad_w.index_copy_(0, rows, flat_grad.index_select(1, rows).t().mm(flat_x))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b, None


def selected_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         rows: torch.Tensor) -> torch.Tensor:
    """:class:`SelectedRowsLinear` with autocast's casts done first, as autocast does them for
    ``F.linear`` (so the backward sees the dtypes the forward used, and the casts' own backward
    returns the gradient in the params' dtypes, as without it)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return SelectedRowsLinear.apply(x, weight, bias, rows)
