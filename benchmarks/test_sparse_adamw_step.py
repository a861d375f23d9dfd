"""The masked AdamW update alone (ops.sparse_adamw_step) per backend, dtype and density, on
fixed random block ids. Ideal bytes: 28 B/param·density in fp32 (16 in bf16: 2 B per read or
write of param, grad and moments... 14 B/param·density), against a plain copy."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import ops
from sparse_grad.layout import num_blocks_of
from _cases import DTYPES, TIMED_BACKENDS, assert_close, params_of, skip_unless_timed
from _report import record

BLOCK_SIZE = 4096
HYPER = dict(block_size=BLOCK_SIZE, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


@pytest.mark.parametrize("density", [1.0, 0.05, 0.01])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_sparse_adamw_step(benchmark, timed, device, quick, shape_set, shape_list, backend, dtype, density):
    skip_unless_timed(backend, device)
    params = [p.detach() for p in params_of(shape_list, device, DTYPES[dtype])]
    grads = [p.grad for p in params_of(shape_list, device, DTYPES[dtype])]
    exp_avgs = [torch.randn_like(p) * 1e-3 for p in params]
    exp_avg_sqs = [torch.rand_like(p) * 1e-6 for p in params]
    steps = [torch.zeros(num_blocks_of(p.numel(), BLOCK_SIZE), dtype=torch.int32, device=device) for p in params]
    layout = ops.BlockLayout(params, BLOCK_SIZE)
    k = ops.num_selected(density, layout.num_blocks)
    ids = torch.randperm(layout.num_blocks, device=device)[:k].sort().values
    state = [params, exp_avgs, exp_avg_sqs, steps]
    before = [[t.clone() for t in ts] for ts in state]
    timed(lambda: ops.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, ids, backend=backend, **HYPER))
    if quick:  # one call: the reference from the same inputs must agree
        ops.sparse_adamw_step(before[0], grads, before[1], before[2], before[3], ids, backend="reference", **HYPER)
        for actual, expected in zip(state, before):
            assert_close(actual, expected, DTYPES[dtype] if actual is not steps else torch.float32)
    n = sum(p.numel() for p in params)
    moved = 7 * params[0].element_size() * n * k / layout.num_blocks
    record(benchmark, f"sparse_adamw_step {backend} {dtype} d={density:g}", shape_set, n, moved)
