"""Issue 21's reliability promises: guaranteed blocks under NaN/inf scores, refused duplicate
params and oversized blocks, checked block ids in ``ops.sparse_adamw_step``, element counts
checked before a step writes anything, and AMP overflow steps that change nothing."""

import pytest
import torch

from sparse_grad import SparseAdamW, ops
from _utils import assert_same, backend_cases, heavy_tailed, snapshot


def _params(numels, device="cpu", dtype=torch.float32):
    return [torch.nn.Parameter(heavy_tailed((n,), dtype, device)) for n in numels]


# -- item 6: min_blocks_per_tensor under NaN / +inf scores ------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_guaranteed_blocks_survive_nan_and_inf_scores(case, poison):
    """Tensors 0 and 1 hold poisoned blocks (NaN ranks above everything, +inf ties with the old
    +inf boost); tensor 2 is finite and must still get its own top blocks, and the total is
    max(k, Σ minima) distinct ids."""
    device, backend = case
    block, minimum = 4, 2
    params = _params([40, 24, 36], device)
    layout = ops.BlockLayout(params, block)
    grads = [heavy_tailed(p.shape, device=device) for p in params]
    # More poisoned blocks than k: the old boost lost tensor 2's guaranteed blocks to them.
    for t in (0, 1):
        grads[t][::block] = poison
    for p, g in zip(params, grads):
        p.grad = g
    density = 0.25
    opt = SparseAdamW(params, density=density, block_size=block, min_blocks_per_tensor=minimum, backend=backend)
    opt.step()
    (_, _, ids, _), = opt.selected_blocks()
    ids = ids.cpu()
    k = max(ops.num_selected(density, layout.num_blocks), minimum * len(params))
    assert ids.numel() == k and torch.equal(ids, ids.unique())
    sqnorms = ops.block_sqnorms([g.cpu() for g in grads], block, backend="reference")
    start, end = layout.block_range(2)
    mine = ids[(ids >= start) & (ids < end)]
    top = torch.sort(sqnorms[start:end], descending=True, stable=True).indices[:minimum] + start
    assert set(top.tolist()) <= set(mine.tolist())
    for t in range(len(params)):
        assert sum(layout.block_range(t)[0] <= b < layout.block_range(t)[1] for b in ids.tolist()) >= minimum
    # Beyond tensor 2's guaranteed blocks, the poisoned blocks rank first: only they are taken.
    assert set(ids.tolist()) - set(top.tolist()) <= set(range(layout.block_range(2)[0]))


# -- item 8: a param listed twice --------------------------------------------------------------

def test_param_listed_twice_is_refused():
    p, q = _params([8, 8])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*same tensor.*\[0\]"):
        SparseAdamW([p, q, p], block_size=4)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is already in param_groups\[0\]"):
        SparseAdamW([{"params": [p]}, {"params": [q, p][1:]}], block_size=4)
    opt = SparseAdamW([p], block_size=4)
    with pytest.raises(ValueError, match="already in param_groups"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1 and len(opt._group_states) == 1


# -- item 9: block_size too large --------------------------------------------------------------

@pytest.mark.parametrize("block_size", [2 ** 24 + 1, 2 ** 31, 2 ** 63, 2 ** 70])
def test_huge_block_size_is_refused(block_size):
    p, = _params([8])
    with pytest.raises(ValueError, match=r"block_size'?\]? must be at most 2\*\*24"):
        SparseAdamW([p], block_size=block_size)
    opt = SparseAdamW([p], block_size=4)
    with pytest.raises(ValueError, match=r"block_size'?\]? must be at most 2\*\*24"):
        opt.add_param_group({"params": _params([8]), "block_size": block_size})
    with pytest.raises(ValueError, match=r"block_size'?\]? must be at most 2\*\*24"):
        ops.block_sqnorms([p.detach()], block_size)
    p.grad = torch.randn_like(p)
    before = snapshot(p.detach())
    opt.param_groups[0]["block_size"] = block_size
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['block_size'\] must be at most"):
        opt.step()
    assert_same(p.detach(), before)
    assert opt.state[p] == {}


def test_largest_block_size_steps():
    p, = _params([8])
    p.grad = torch.randn_like(p)
    SparseAdamW([p], block_size=2 ** 24, backend="reference", density=1.0).step()


# -- item 3: an overflowed AMP step changes nothing -----------------------------------------

class _Blueprint:
    """A blueprint of fixed random block scores (anything with ``block_scores`` will do)."""

    def __init__(self):
        self.scores = torch.rand(1000)

    def block_scores(self, params, names, block_size):
        n = sum(-(-p.numel() // block_size) for p in params)
        return self.scores[:n].clone()


AMP_OPTIONS = [
    dict(),
    dict(score_ema=0.5),
    dict(reselect_every=3),
    dict(selection="random"),
    dict(selection="random", reselect_every=2, seed=7),
    dict(state_layout="compact", score_ema=0.5, reselect_every=2),
    dict(error_feedback=True, max_grad_norm=0.5, score_ema=0.9),
    dict(blueprint=True, blueprint_weight=0.5, reselect_every=2),
    dict(scope="tensor", min_blocks_per_tensor=2, score="rms", state_layout="compact"),
]


def _amp_run(backend, options, grads, overflow_at, blueprint):
    """Steps with GradScaler's attributes set as ``GradScaler.step`` sets them; a step in
    ``overflow_at`` has an inf in its grads and found_inf = 1."""
    torch.manual_seed(0)
    params = _params([37, 20, 9])
    options = dict(options)
    if options.pop("blueprint", False):
        options["blueprint"] = blueprint
    opt = SparseAdamW([{"params": params[:2]}, {"params": params[2:]}],
                      lr=1e-2, density=0.3, block_size=4, backend=backend, **options)
    scale = 2.0 ** 10  # a power of two: scaling and unscaling are exact
    for i, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g * scale
        overflowed = i in overflow_at
        if overflowed:
            params[i % 3].grad[1] = float("inf")
        opt.grad_scale = torch.full((1,), scale)
        opt.found_inf = torch.full((1,), float(overflowed))
        opt.step()
        del opt.grad_scale, opt.found_inf
    return [p.detach() for p in params], opt.state_dict(), [s[2] for s in opt.selected_blocks()]


# The host-side undo is the same for every backend; the interpreted Triton backend (slow) runs
# the option sets that reach its kernels differently (compact slabs, per-tensor selection, a
# clip coefficient beside the scale).
AMP_CASES = [pytest.param(c, o, at, id=f"{c[1]}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}-"
                                      f"at{'-'.join(map(str, at))}")
             for c in backend_cases() for o in AMP_OPTIONS for at in [(0,), (2, 3)]
             if c[1] != "triton" or o in AMP_OPTIONS[5:]]


@pytest.mark.parametrize("case, options, overflow_at", AMP_CASES)
def test_overflowed_steps_equal_the_run_without_them(case, options, overflow_at):
    device, backend = case
    assert device == "cpu"
    steps = 7
    grads = [[heavy_tailed((n,)) for n in (37, 20, 9)] for _ in range(steps)]
    blueprint = _Blueprint()
    with_overflow = _amp_run(backend, options, grads, overflow_at, blueprint)
    kept = [g for i, g in enumerate(grads) if i not in overflow_at]
    without = _amp_run(backend, options, kept, (), blueprint)
    assert_same(with_overflow, without)


# -- item 5: block ids of ops.sparse_adamw_step ---------------------------------------------

BAD_IDS = {
    "duplicate": [0, 2, 2, 5],
    "unsorted": [0, 4, 2],
    "descending": [5, 2, 0],
    "negative": [-1, 2],
    "past the end": [0, 5],  # 40 + 23 elements in blocks of 16: blocks 0..4
    "far past the end": [2 ** 40],
}


@pytest.mark.parametrize("name", BAD_IDS)
@pytest.mark.parametrize("compact", [False, True])
def test_bad_block_ids_are_refused_on_every_backend(case, name, compact):
    device, backend = case
    params = _params([40, 23], device)
    grads = [heavy_tailed(p.shape, device=device) for p in params]
    ids = torch.tensor(BAD_IDS[name], device=device)
    if compact:
        k = ids.numel()
        state = ([torch.zeros(k, 16, device=device)], [torch.zeros(k, 16, device=device)],
                 [torch.zeros(k, dtype=torch.int32, device=device)])
    else:
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.zeros(-(-p.numel() // 16), dtype=torch.int32, device=device) for p in params])
    before = snapshot(([p.detach() for p in params], state))
    with pytest.raises(ValueError, match=r"block_ids must be strictly ascending \(unique\) ids in \[0, 5\)"):
        ops.sparse_adamw_step([p.detach() for p in params], grads, *state, ids, block_size=16, backend=backend,
                              compact=compact)
    assert_same(([p.detach() for p in params], state), before)


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[0, 1]]), TypeError, "block_ids must be a 1-D int64 tensor"),
    (torch.tensor([0, 1], dtype=torch.int32), TypeError, "block_ids must be a 1-D int64 tensor"),
    (torch.tensor([0.0, 1.0]), TypeError, "block_ids must be a 1-D int64 tensor"),
    ([0, 1], TypeError, "block_ids must be a 1-D int64 tensor"),
    (torch.arange(6), ValueError, "block_ids has 6 ids but params have only 5 blocks"),
])
def test_block_ids_of_the_wrong_kind_are_refused(case, ids, error, message):
    device, backend = case
    params = _params([40, 23], device)
    state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros(-(-p.numel() // 16), dtype=torch.int32, device=device) for p in params])
    before = snapshot(([p.detach() for p in params], state))
    ids = ids.to(device) if isinstance(ids, torch.Tensor) else ids
    with pytest.raises(error, match=message):
        ops.sparse_adamw_step([p.detach() for p in params], [torch.ones_like(p) for p in params], *state, ids,
                              block_size=16, backend=backend)
    assert_same(([p.detach() for p in params], state), before)


def test_good_block_ids_still_step(case):
    device, backend = case
    params = _params([40, 23], device)
    state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros(-(-p.numel() // 16), dtype=torch.int32, device=device) for p in params])
    ops.sparse_adamw_step([p.detach() for p in params], [torch.ones_like(p) for p in params], *state,
                          torch.tensor([0, 4], device=device), block_size=16, backend=backend)
    assert state[2][0].tolist() == [1, 0, 0] and state[2][1].tolist() == [0, 1]


# -- item 7: element counts, not only block counts -------------------------------------------

def _two_group_opt(backend, state_layout, device="cpu"):
    """Two groups stepped twice: group 0 sound, group 1 the one a test breaks."""
    params = _params([12, 30, 12, 16], device)
    opt = SparseAdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, density=0.5, block_size=4,
                      backend=backend, state_layout=state_layout, score_ema=0.5)
    for _ in range(2):
        for p in params:
            p.grad = heavy_tailed(p.shape, device=device)
        opt.step()
    for p in params:
        p.grad = heavy_tailed(p.shape, device=device)
    return params, opt


def _refused_and_unchanged(opt, params, message):
    before = snapshot(([p.detach() for p in params], opt.state_dict()))
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same(([p.detach() for p in params], opt.state_dict()), before)


@pytest.mark.parametrize("state_layout", ["dense", "compact"])
def test_block_size_changed_to_the_same_block_count_is_refused(case, state_layout):
    device, backend = case
    params, opt = _two_group_opt(backend, state_layout, device)
    opt.param_groups[1]["block_size"] = 5  # 12 and 16 elements: 3 and 4 blocks of 4, as of 5
    _refused_and_unchanged(opt, params, r"param_groups\[1\]\['block_size'\] is 5, but the group's .*state was made "
                                        r"with (block_size 4|another block size)")


@pytest.mark.parametrize("state_layout", ["dense", "compact"])
@pytest.mark.parametrize("numel", [11, 10, 21])  # as many blocks as 12 (11, 10) and more (21)
def test_resized_param_is_refused(case, state_layout, numel):
    device, backend = case
    params, opt = _two_group_opt(backend, state_layout, device)
    params[2].data = heavy_tailed((numel,), device=device)
    params[2].grad = heavy_tailed((numel,), device=device)
    _refused_and_unchanged(opt, params, "resized by hand")


@pytest.mark.parametrize("numel", [11, 13, 40])
def test_grad_of_the_wrong_size_is_refused(case, numel):
    device, backend = case
    params, opt = _two_group_opt(backend, "dense", device)
    params[3].grad.data = heavy_tailed((numel,), device=device)
    _refused_and_unchanged(opt, params, r"param_groups\[1\]\['params'\]\[1\]\.grad has shape \(%d,\), but the "
                                        r"parameter has \(16,\)" % numel)


@pytest.mark.parametrize("options, records", [
    (dict(), False),  # reselected every step by norm: the device blends keep everything
    (dict(score_ema=0.5, state_layout="compact"), False),
    (dict(reselect_every=2), True),  # the age decides the next reselection
    (dict(selection="random"), True),  # the draw count
])
def test_an_amp_step_records_host_state_only_where_an_overflow_could_change_it(monkeypatch, options, records):
    """On CUDA a recorded step costs a read of found_inf at the next step; the common case
    (a reselection by norm every step, state made) records nothing, so it reads nothing."""
    from sparse_grad.optim import overflow

    recorded = []
    real_close = overflow.Overflow.close

    def close(self):
        recorded.append(len(self.undos))
        return real_close(self)

    monkeypatch.setattr(overflow.Overflow, "close", close)
    params = _params([37, 20])
    opt = SparseAdamW(params, density=0.3, block_size=4, **options)
    for i in range(3):
        for p in params:
            p.grad = heavy_tailed(p.shape)
        opt.found_inf = torch.zeros(1)
        opt.step()
        del opt.found_inf
    assert recorded[0] == 1  # the first step makes the selection (and EMAs, compact state)
    assert all(bool(n) == records for n in recorded[1:])
