"""The norm pass alone (ops.block_sqnorms) per backend, grad dtype and block size, against a
plain read of the same grads (torch.sum): ideal bytes are one read of every grad."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import ops
from _cases import DTYPES, TIMED_BACKENDS, params_of, skip_unless_timed
from _report import record


def test_read(benchmark, timed, device, shape_set, shape_list):
    flat = torch.cat([p.grad.reshape(-1) for p in params_of(shape_list, device)])
    total = {}
    timed(lambda: total.setdefault("sum", torch.sum(flat)))
    assert torch.isfinite(total["sum"])
    record(benchmark, "read", shape_set, flat.numel(), 4 * flat.numel(), baseline="read")


@pytest.mark.parametrize("block_size", [1024, 4096])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_block_sqnorms(benchmark, timed, device, quick, shape_set, shape_list, backend, dtype, block_size):
    skip_unless_timed(backend, device)
    grads = [p.grad for p in params_of(shape_list, device, DTYPES[dtype])]
    out = {}
    timed(lambda: out.__setitem__("scores", ops.block_sqnorms(grads, block_size, backend=backend)))
    if quick:  # fp32 sums of up to block_size squares, added in another order than the reference's
        expected = ops.block_sqnorms(grads, block_size, backend="reference")
        torch.testing.assert_close(out["scores"].cpu(), expected.cpu(), atol=0.0, rtol=1e-4)
    n = sum(g.numel() for g in grads)
    record(benchmark, f"block_sqnorms {backend} {dtype} b={block_size}", shape_set, n,
           n * grads[0].element_size(), baseline="read")
