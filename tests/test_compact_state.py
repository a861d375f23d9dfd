"""Compact optimizer state (docs/design.md §4): moments only for the selected blocks, in slabs."""
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
    ops.sparse_adamw_step(compact_params, grads, [m], [v], [s], ids, block_size=8, backend=backend,
                          grad_coef=coef, lr=1e-2, beta2=0.99, weight_decay=0.1, compact=True)
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
    hyper = ops.hyper_table([HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")], device)
    library.sparse_adamw_step(params, grads, [slabs[0]], [slabs[1]], [slabs[2]], ids, hyper, 8, HYPER["maximize"],
                              backend, None, torch.ones(1, device=device), True)
    assert_same((params, slabs), before)


# --- SparseAdamW(state_layout="compact") -------------------------------------------------------

from sparse_grad import SparseAdamW  # noqa: E402
from test_sparse_adamw import bad_group_values_change_nothing, clone_params, make_params, run  # noqa: E402


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_compact_equals_dense_while_the_selection_stays(case, dtype, state_dtype):
    device, backend = case
    params = make_params(device, dtype)
    other = clone_params(params)
    kwargs = dict(lr=1e-2, density=0.3, block_size=8, reselect_every=100, state_dtype=state_dtype, backend=backend)
    dense, compact = SparseAdamW(params, **kwargs), SparseAdamW(other, state_layout="compact", **kwargs)
    grads = [[heavy_tailed(p.shape, dtype, device) for p in params] for _ in range(6)]
    run(dense, params, grads)
    run(compact, other, grads)
    assert_same([p.detach() for p in other], [p.detach() for p in params])
    slabs = compact.group_state(0).compact
    layout = ops.BlockLayout(params, 8)
    ids = slabs["block_of_slot"].cpu()
    want = to_slabs([dense.state[p]["exp_avg"] for p in params], [dense.state[p]["exp_avg_sq"] for p in params],
                    [dense.state[p]["block_step"] for p in params], ids, 8)
    assert_same((slabs["exp_avg"].cpu(), slabs["exp_avg_sq"].cpu(), slabs["block_step"].cpu()),
                tuple(t.cpu() for t in want))
    assert ids.numel() == ops.num_selected(0.3, layout.num_blocks)
    assert all("exp_avg" not in compact.state[p] for p in other)


def test_entering_blocks_start_from_zero_and_leaving_blocks_free_their_slot(case):
    """Compact = dense whose unselected blocks are reset to zero moments and step 0 after each step."""
    device, backend = case
    params = make_params(device)
    other = clone_params(params)
    kwargs = dict(lr=1e-2, density=0.2, block_size=8, backend=backend)
    dense, compact = SparseAdamW(params, **kwargs), SparseAdamW(other, state_layout="compact", **kwargs)
    layout = ops.BlockLayout(params, 8)
    for _ in range(5):
        grads = [heavy_tailed(p.shape, device=device) for p in params]
        run(compact, other, [grads])
        run(dense, params, [grads])
        chosen = dense.group_state(0).selection.block_ids.cpu()
        keep = torch.zeros(layout.num_blocks, dtype=torch.bool).index_fill(0, chosen, True)
        for t, p in enumerate(params):
            start, end = layout.block_range(t)
            block_keep = keep[start:end].to(device)
            st = dense.state[p]
            st["block_step"].mul_(block_keep)
            elems = block_keep.repeat_interleave(8)[:p.numel()].view_as(p)
            st["exp_avg"].mul_(elems)
            st["exp_avg_sq"].mul_(elems)
        assert_same([p.detach() for p in other], [p.detach() for p in params])
        slabs = compact.group_state(0).compact
        assert torch.equal(slabs["block_of_slot"].cpu(), chosen)
        slot = slabs["slot_of_block"].cpu()
        assert torch.equal(slot[chosen], torch.arange(chosen.numel(), dtype=torch.int32))
        assert int((slot >= 0).sum()) == chosen.numel()


def test_compact_state_bytes_scale_with_density():
    """Optimizer-state bytes per parameter <= 8 * density + 0.1 on a real model (fp32)."""
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 2)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    x = torch.randn(4, 16, 256)
    measured = {}
    for layout, density in (("compact", 0.05), ("compact", 0.01), ("dense", 0.05)):
        opt = SparseAdamW(model.parameters(), lr=1e-4, density=density, block_size=1024, state_layout=layout)
        for _ in range(2):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        state = opt.state_dict()
        tensors = [t for s in state["state"].values() for t in s.values()]
        tensors += [t for group in state["param_groups"] for t in group["sparse_grad"].get("compact", {}).values()]
        measured[layout, density] = sum(t.numel() * t.element_size() for t in tensors) / numel
    assert measured["compact", 0.05] <= 8 * 0.05 + 0.1
    assert measured["compact", 0.01] <= 8 * 0.01 + 0.1
    assert measured["dense", 0.05] >= 8  # for scale: two fp32 moments per parameter
    print(f"state bytes/param on {numel} params: {measured}")


def test_a_param_without_grad_keeps_no_slot(case):
    device, backend = case
    params = make_params(device)
    opt = SparseAdamW(params, lr=1e-2, density=0.5, block_size=8, state_layout="compact", backend=backend)
    full = ops.BlockLayout(params, 8)
    grads = [heavy_tailed(p.shape, device=device) for p in params]
    grads[1] = None
    run(opt, params, [grads])
    slabs = opt.group_state(0).compact
    slot = slabs["slot_of_block"].cpu()
    start, end = full.block_range(1)
    assert (slot[start:end] == -1).all()  # ids count over all params: params[1]'s blocks are skipped
    ids = slabs["block_of_slot"].cpu()
    assert torch.equal(slot[ids], torch.arange(ids.numel(), dtype=torch.int32))
    assert not ((ids >= start) & (ids < end)).any()


def test_bad_state_layout_input_changes_nothing():
    params = make_params("cpu")
    with pytest.raises(ValueError, match="state_layout must be one of"):
        SparseAdamW(params, state_layout="sparse")
    mixed = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))]
    opt = SparseAdamW(mixed, state_layout="compact", block_size=4)
    before = snapshot([p.detach() for p in mixed])
    with pytest.raises(ValueError, match=r"keeps one state dtype per group, but its params have several"):
        run(opt, mixed, [[torch.randn(8), torch.randn(8, dtype=torch.bfloat16)]])
    assert_same([p.detach() for p in mixed], before)
    assert opt.group_state(0).compact is None and not opt.state
    opt = SparseAdamW(params, density=0.5, block_size=8, state_layout="compact")
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    for p in params:
        p.grad = heavy_tailed(p.shape)
    bad_group_values_change_nothing(opt, params, [
        ("state_layout", "dense", ValueError, r"\['state_layout'\] is 'dense', but the group has compact"),
        ("block_size", 4, ValueError, r"\['block_size'\] is 4, but the group's compact state")])
    before = snapshot(([p.detach() for p in params], opt.state_dict()))
    bad = snapshot(opt.state_dict())
    compact = bad["param_groups"][0]["sparse_grad"]["compact"]
    compact["exp_avg"] = compact["exp_avg"][:, :4]
    with pytest.raises(ValueError, match=r"\['sparse_grad'\]\['compact'\]\['exp_avg'\] does not fit"):
        opt.load_state_dict(bad)
    assert_same(([p.detach() for p in params], opt.state_dict()), before)


def test_compact_state_of_another_model_names_the_first_mismatching_param():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8, state_layout="compact")
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    other = make_params("cpu", shapes=[(37,), (5, 13), (2,), (3, 4, 5), (200,), (16,)])
    other_opt = SparseAdamW(other, density=0.5, block_size=8, state_layout="compact")
    run(other_opt, other, [[heavy_tailed(p.shape) for p in other]])
    before = snapshot(opt.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\]: its compact state was made for "
                                         r"2 elements, the parameter has 1"):
        opt.load_state_dict(other_opt.state_dict())
    assert_same(opt.state_dict(), before)


def test_bad_slabs_change_nothing():
    params, grads, exp_avgs, exp_avg_sqs, steps = make_state(SHAPES, 8, torch.float32, torch.float32, "cpu")
    ids = torch.tensor([0, 3, 6])
    m, v, s = to_slabs(exp_avgs, exp_avg_sqs, steps, ids, 8)
    before = snapshot((params, m, v, s))
    for slabs, error, message in [
        (([m, m], [v], [s]), ValueError, "with compact=True, exp_avgs must hold exactly one tensor, got 2"),
        (([m[:2]], [v], [s]), ValueError, r"exp_avgs\[0\] must hold block_size elements per block id \(3 x 8\)"),
        (([m], [v.double()], [s]), TypeError, r"exp_avg_sqs\[0\] is torch.float64 but exp_avgs\[0\] is torch.float32"),
        (([m.half()], [v.half()], [s]), TypeError, r"exp_avgs\[0\] is torch.float16; params\[0\] is torch.float32"),
        (([m], [v], [s[:2]]), ValueError, r"block_steps\[0\] must be a contiguous 1-D tensor of 3 counts"),
        (([m], [v], [s.long()]), TypeError, r"block_steps\[0\] must be an int32 tensor"),
    ]:
        with pytest.raises(error, match=message):
            ops.sparse_adamw_step(params, grads, *slabs, ids, block_size=8, compact=True)
        assert_same((params, m, v, s), before)
