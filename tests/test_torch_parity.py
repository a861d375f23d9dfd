"""SparseAdamW at density 1 against torch.optim.AdamW, checked the way torch checks its own
optimizers: bit for bit where the same arithmetic runs (the reference backend), and through the
generic optimizer inputs torch ships for AdamW."""
from __future__ import annotations

import pytest
import torch
from _utils import heavy_tailed

from sparse_grad import SparseAdamW

SHAPES = [(37, 5), (3,), (4, 4, 5), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [7, 16])
@pytest.mark.parametrize("foreach", [False, True])
def test_reference_backend_is_bit_identical_to_torch_adamw(dtype, block_size, foreach):
    # torch computes the bias corrections on the host in Python floats (one correctly rounded
    # division): the reference backend does the same per distinct block step count, so even fp64
    # parameters agree to the last bit.
    params = [torch.nn.Parameter(heavy_tailed(s, dtype)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = SparseAdamW(params, density=1.0, block_size=block_size, backend="reference", **hyper)
    adamw = torch.optim.AdamW(theirs, foreach=foreach, **hyper)
    for _ in range(12):
        for p, q in zip(params, theirs):
            p.grad = heavy_tailed(p.shape, dtype)
            q.grad = p.grad.clone()
        ours.step()
        adamw.step()
    for p, q in zip(params, theirs):
        assert torch.equal(p, q), (p - q).abs().max()
        assert torch.equal(ours.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"])
