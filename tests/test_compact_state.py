"""Compact optimizer state (DESIGN §4): moments only for the selected blocks, in slabs."""
import pytest
import torch

from sparse_grad import library, ops
from _utils import assert_same, heavy_tailed, snapshot
from test_sparse_adamw_step import HYPER, make_state, num_blocks, random_ids

SHAPES = [(37,), (5, 13), (1,), (16,)]


def to_slabs(exp_avgs, exp_avg_sqs, block_steps, ids, block_size):
    """The dense state of the blocks ``ids`` as compact slabs (row i: block ids[i], zero-padded)."""
    layout = ops.BlockLayout(exp_avgs, block_size)
    slabs = []
    for moments in (exp_avgs, exp_avg_sqs):
        rows = []
        for b in ids.tolist():
            t = int(layout.tensor_of_block(torch.tensor([b])))
            local = b - layout.block_range(t)[0]
            row = moments[t].reshape(-1)[local * block_size:(local + 1) * block_size]
            rows.append(torch.cat([row, row.new_zeros(block_size - row.numel())]))
        slabs.append(torch.stack(rows) if rows else moments[0].new_zeros(0, block_size))
    steps = torch.cat(block_steps)[ids.cpu()].to(ids.device)
    return slabs[0], slabs[1], steps


@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.float64, torch.float64)])
def test_compact_step_equals_dense_step(case, param_dtype, state_dtype):
    device, backend = case
    params, grads, exp_avgs, exp_avg_sqs, steps = make_state(SHAPES, 8, param_dtype, param_dtype, device)
    exp_avgs = [m.to(state_dtype) for m in exp_avgs]
    exp_avg_sqs = [v.to(state_dtype) for v in exp_avg_sqs]
    ids = random_ids(num_blocks(SHAPES, 8), 5, device)
    m, v, s = to_slabs(exp_avgs, exp_avg_sqs, steps, ids, 8)
    compact_params = [p.clone() for p in params]
    coef = torch.full((1,), 0.75, device=device)
    library.sparse_adamw_step(compact_params, grads, [m], [v], [s], ids, 8, 1e-2, 0.9, 0.99, 1e-8, 0.1, False,
                              backend, coef, None, True)
    ops.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, ids, block_size=8, backend=backend,
                          grad_coef=coef, lr=1e-2, beta2=0.99, weight_decay=0.1)
    assert_same(compact_params, params)
    assert_same((m, v, s), to_slabs(exp_avgs, exp_avg_sqs, steps, ids, 8))


def test_compact_step_with_found_inf_changes_nothing(case):
    device, backend = case
    params, grads, exp_avgs, exp_avg_sqs, steps = make_state(SHAPES, 8, torch.float32, torch.float32, device)
    ids = random_ids(num_blocks(SHAPES, 8), 4, device)
    slabs = list(to_slabs(exp_avgs, exp_avg_sqs, steps, ids, 8))
    before = snapshot((params, slabs))
    library.sparse_adamw_step(params, grads, [slabs[0]], [slabs[1]], [slabs[2]], ids, 8, *HYPER.values(),
                              backend, None, torch.ones(1, device=device), True)
    assert_same((params, slabs), before)
