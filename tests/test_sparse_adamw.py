import io

import pytest
import torch

from sparse_grad import SparseAdamW, ops
from _utils import TOLERANCES, assert_same, heavy_tailed, snapshot

SHAPES = [(37,), (5, 13), (1,), (3, 4, 5), (200,), (16,)]


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(heavy_tailed(s, dtype, device)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def exact_grads(params):
    """Grads whose block sums of squares are exact in fp32 whatever the summation order, so every
    backend scores (and so selects) identically."""
    return [torch.randint(-16, 17, p.shape, device=p.device).to(p.dtype) / 8 for p in params]


def run(opt, params, grads_per_step, scheduler=None):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [7, 64, 4096])
def test_density_one_matches_torch_adamw(case, dtype, block_size):
    device, backend = case
    params = make_params(device, dtype)
    theirs = clone_params(params)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours = SparseAdamW(params, density=1.0, block_size=block_size, backend=backend, **hyper)
    # Like ours, torch's fused AdamW rounds to bf16 only what it stores; its for-loop path rounds
    # every intermediate to bf16 and drifts a few bf16 ulps away from both in 10 steps.
    adamw = torch.optim.AdamW(theirs, fused=dtype == torch.bfloat16, **hyper)
    grads = [[heavy_tailed(p.shape, dtype, device) for p in params] for _ in range(10)]
    run(ours, params, grads)
    run(adamw, theirs, grads)
    atol, rtol = TOLERANCES[dtype]
    for t, (p, q) in enumerate(zip(params, theirs)):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)
        ours_m, theirs_m = ours.state[p]["exp_avg"], adamw.state[q]["exp_avg"]
        if dtype == torch.bfloat16:
            # Both round exp_avg to bf16 once per step, from fp32 computed in another order: a
            # stored value may round the other way, one bf16 ulp (2^-7 of its magnitude, which
            # never exceeds max_t |g_t|), and later steps carry that on, scaled by beta1 each step:
            # at most 2^-7 · max_t |g_t| / (1 - beta1) per element.
            largest = torch.stack([g[t].abs().float() for g in grads]).amax(0)
            bound = largest * 2.0**-7 / (1 - hyper["betas"][0]) + atol
            assert ((ours_m.float() - theirs_m.float()).abs() <= bound).all()
        else:
            torch.testing.assert_close(ours_m, theirs_m, atol=atol, rtol=rtol)


def test_density_one_matches_torch_adamw_with_options_and_scheduler(case):
    device, backend = case
    params = make_params(device)
    theirs = clone_params(params)
    groups = lambda ps: [{"params": ps[:3], "weight_decay": 0.0}, {"params": ps[3:], "lr": 3e-3}]  # noqa: E731
    ours = SparseAdamW(groups(params), lr=1e-2, maximize=True, density=1.0, block_size=16, backend=backend)
    adamw = torch.optim.AdamW(groups(theirs), lr=1e-2, maximize=True)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[2e-2, 5e-3], total_steps=12) for o in (ours, adamw)]
    grads = [[heavy_tailed(p.shape, device=device) for p in params] for _ in range(10)]
    run(ours, params, grads, schedulers[0])
    run(adamw, theirs, grads, schedulers[1])
    assert ours.param_groups[1]["lr"] == adamw.param_groups[1]["lr"]
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def count_norm_passes(monkeypatch) -> list:
    """Record every call of the norm pass op (one entry per call)."""
    calls = []
    real = ops.unchecked.block_sqnorms
    monkeypatch.setattr(ops.unchecked, "block_sqnorms", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def resume_midway(opt, params, grads, split, make_optimizer):
    """Run ``grads[:split]``, save params and state dict through torch.save/torch.load, run the
    rest; then build ``make_optimizer(resumed params)``, load the saved state and run the rest
    again. Returns the resumed params and optimizer, to compare with ``params`` and ``opt``."""
    run(opt, params, grads[:split])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    run(opt, params, grads[split:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed_opt = make_optimizer(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed_opt, resumed, grads[split:])
    return resumed, resumed_opt


def bad_group_values_change_nothing(opt, params, cases) -> None:
    """For each ``(key, value, error, message)``: set group 0's ``key`` to ``value``; step() must
    raise and leave params and state dict as they were."""
    before = snapshot(([p.detach() for p in params], opt.state_dict()))
    for key, value, error, message in cases:
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(error, match=message):
            opt.step()
        opt.param_groups[0][key] = old
        assert_same(([p.detach() for p in params], opt.state_dict()), before)


def expected_selection(grads, block_size, density, scope):
    layout = ops.BlockLayout(grads, block_size)
    scores = ops.block_sqnorms([g.cpu() for g in grads], block_size, backend="reference")
    ids = ops.select_blocks(scores, density=density, segments=layout if scope == "tensor" else None,
                            backend="reference")
    return layout, set(ids.tolist())


def changed_blocks(before, after, layout):
    """Global ids of the blocks in which any element changed."""
    changed = set()
    for t, (b, a) in enumerate(zip(before, after)):
        start, end = layout.block_range(t)
        flat_b, flat_a = b.detach().reshape(-1).cpu(), a.detach().reshape(-1).cpu()
        for i in range(end - start):
            sl = slice(i * layout.block_size, (i + 1) * layout.block_size)
            if not torch.equal(flat_b[sl], flat_a[sl]):
                changed.add(start + i)
    return changed


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.05, 0.3])
def test_updates_exactly_the_top_blocks(case, scope, density):
    device, backend = case
    params = make_params(device)
    opt = SparseAdamW(params, lr=1e-2, density=density, block_size=8, scope=scope, backend=backend)
    for _ in range(3):
        grads = exact_grads(params)
        for p, g in zip(params, grads):
            p.grad = g
        before = snapshot([p.detach() for p in params])
        steps_before = [opt.state[p]["block_step"].clone() if p in opt.state else None for p in params]
        opt.step()
        layout, selected = expected_selection(grads, 8, density, scope)
        assert changed_blocks(before, params, layout) == selected
        for t, p in enumerate(params):
            start, end = layout.block_range(t)
            increments = opt.state[p]["block_step"].cpu() - (0 if steps_before[t] is None else steps_before[t].cpu())
            assert increments.tolist() == [int(b in selected) for b in range(start, end)]


def test_backend_trajectory_matches_reference(case):
    device, backend = case
    params = make_params(device)
    ref_params = clone_params([p.cpu() for p in params])
    kwargs = dict(lr=1e-2, weight_decay=0.1, density=0.3, block_size=8)
    opt = SparseAdamW(params, backend=backend, **kwargs)
    ref = SparseAdamW(ref_params, backend="reference", **kwargs)
    grads = [exact_grads(params) for _ in range(6)]
    run(opt, params, grads)
    run(ref, ref_params, [[g.cpu() for g in gs] for gs in grads])
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), atol=1e-7, rtol=1e-6)
        assert torch.equal(opt.state[p]["block_step"].cpu(), ref.state[q]["block_step"])


def test_params_without_grad_are_skipped(case):
    device, backend = case
    params = make_params(device)
    opt = SparseAdamW(params, density=0.5, block_size=8, backend=backend)
    frozen = snapshot(params[1].detach())
    grads = [[None if i == 1 else heavy_tailed(p.shape, device=device) for i, p in enumerate(params)]
             for _ in range(3)]
    run(opt, params, grads)
    assert_same(params[1].detach(), frozen)
    assert params[1] not in opt.state
    assert all(p in opt.state for i, p in enumerate(params) if i != 1)
    # Blocks of grad-less params are never selected: with only params[1] lacking a grad, all
    # selected blocks belong to the others, and a step with no grads at all changes nothing.
    for p in params:
        p.grad = None
    before = snapshot([p.detach() for p in params])
    opt.step()
    assert_same([p.detach() for p in params], before)


def test_param_groups_own_density_and_block_size(case):
    device, backend = case
    params = make_params(device)
    opt = SparseAdamW([{"params": params[:3], "density": 0.5, "block_size": 4},
                       {"params": params[3:], "density": 0.1, "block_size": 16}], backend=backend)
    grads = exact_grads(params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for group, (density, block_size) in zip(opt.param_groups, [(0.5, 4), (0.1, 16)]):
        steps = [opt.state[p]["block_step"] for p in group["params"]]
        assert [s.numel() for s in steps] == [(p.numel() + block_size - 1) // block_size for p in group["params"]]
        total = sum(s.numel() for s in steps)
        assert int(sum(s.sum() for s in steps)) == ops.num_selected(density, total)


def test_reselect_every_reuses_blocks_and_skips_the_norm_pass(case, monkeypatch):
    device, backend = case
    calls = count_norm_passes(monkeypatch)
    params = make_params(device)
    opt = SparseAdamW(params, density=0.2, block_size=8, reselect_every=3, backend=backend)
    chosen = []
    for _ in range(7):
        for p in params:
            p.grad = heavy_tailed(p.shape, device=device)
        before = snapshot([p.detach() for p in params])
        opt.step()
        chosen.append(changed_blocks(before, params, ops.BlockLayout(params, 8)))
    assert len(calls) == 3  # steps 1, 4 and 7
    assert chosen[0] == chosen[1] == chosen[2] and chosen[3] == chosen[4] == chosen[5]


def test_density_one_makes_no_norm_pass(case, monkeypatch):
    device, backend = case
    monkeypatch.setattr(ops.unchecked, "block_sqnorms", lambda *a, **k: pytest.fail("norm pass at density 1"))
    params = make_params(device)
    run(SparseAdamW(params, density=1.0, block_size=8, backend=backend), params,
        [[heavy_tailed(p.shape, device=device) for p in params] for _ in range(2)])


@pytest.mark.parametrize("scope, reselect_every", [("global", 1), ("tensor", 3)])
def test_state_dict_round_trip_continues_bit_exactly(case, scope, reselect_every):
    device, backend = case
    params = make_params(device)
    kwargs = dict(lr=1e-2, density=0.3, block_size=8, scope=scope, reselect_every=reselect_every, backend=backend)
    grads = [[heavy_tailed(p.shape, device=device) for p in params] for _ in range(8)]
    opt = SparseAdamW(params, **kwargs)
    resumed, opt2 = resume_midway(opt, params, grads, 4,  # the state dict's density and lr win:
                                  lambda ps: SparseAdamW(ps, **{**kwargs, "density": 0.9, "lr": 5.0}))
    assert opt2.param_groups[0]["density"] == 0.3 and opt2.param_groups[0]["lr"] == 1e-2
    assert all(opt2.state[p]["block_step"].dtype == torch.int32 for p in resumed)
    assert_same([p.detach() for p in resumed], [p.detach() for p in params])
    assert_same([opt2.state[p] for p in resumed], [opt.state[p] for p in params])


def test_load_state_dict_of_another_model_fails_and_changes_nothing():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8)
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    other = make_params("cpu", shapes=SHAPES[:2] + [(2,)] + SHAPES[3:])
    other_opt = SparseAdamW(other, density=0.5, block_size=8)
    run(other_opt, other, [[heavy_tailed(p.shape) for p in other]])
    before = snapshot(opt.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*exp_avg has shape \(2,\)"):
        opt.load_state_dict(other_opt.state_dict())
    assert_same(opt.state_dict(), before)
    saved = snapshot(opt.state_dict())
    saved["param_groups"][0]["block_size"] = 1  # the block counts no longer fit
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]: its block_step has 5 blocks, expected 37"):
        opt.load_state_dict(saved)
    assert_same(opt.state_dict(), before)
    with pytest.raises(ValueError, match="param group 0 has 6 params, the optimizer.s 1"):
        SparseAdamW(params[:1]).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density="0.5"), TypeError, "density"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=2.0), TypeError, "block_size"),
    (dict(scope="layer"), ValueError, "scope"),
    (dict(reselect_every=0), ValueError, "reselect_every"),
    (dict(backend="cuda-graph"), ValueError, "backend"),
    (dict(amsgrad=True), ValueError, "amsgrad"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    (dict(maximize=None), TypeError, "maximize"),
])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW(make_params("cpu"), **kwargs)


def test_bad_param_groups_and_params():
    params = make_params("cpu")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['density'\]"):
        SparseAdamW([{"params": params[:2]}, {"params": params[2:], "density": 2.0}])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is complex"):
        SparseAdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is not contiguous .* overlap"):
        SparseAdamW([params[0], torch.nn.Parameter(torch.randn(4, 1).expand(4, 6))])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is on meta"):
        SparseAdamW([params[0], torch.nn.Parameter(torch.randn(4, device="meta"))])
    with pytest.raises(TypeError, match=r"has dtype torch.int64"):
        SparseAdamW([torch.arange(4)])


def test_bad_step_input_changes_nothing():
    params = make_params("cpu")
    opt = SparseAdamW([{"params": params[:3]}, {"params": params[3:]}], density=0.5, block_size=8)
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    for p in params:
        p.grad = heavy_tailed(p.shape)

    def observable():  # what a step writes: parameters, per-param state, selections
        state_dict = opt.state_dict()
        return [p.detach() for p in params], state_dict["state"], [g["sparse_grad"] for g in state_dict["param_groups"]]

    before = snapshot(observable())
    grad4, data3 = params[4].grad, params[3].data
    cases = [  # (break, mend, error, message)
        (lambda: setattr(params[4], "grad", grad4.to_sparse()), lambda: setattr(params[4], "grad", grad4),
         TypeError, r"param_groups\[1\]\['params'\]\[1\].grad is sparse"),
        (lambda: opt.param_groups[1].update(density=0.0), lambda: opt.param_groups[1].update(density=0.5),
         ValueError, r"param_groups\[1\]\['density'\]"),
        (lambda: opt.param_groups[0].update(block_size=4), lambda: opt.param_groups[0].update(block_size=8),
         ValueError, r"param_groups\[0\]\['block_size'\] is 4, but the state of param_groups\[0\]\['params'\]\[0\]"),
        (lambda: setattr(params[3], "data", data3[:1].expand(data3.shape)), lambda: setattr(params[3], "data", data3),
         ValueError, r"param_groups\[1\]\['params'\]\[0\] is not contiguous .* overlap"),
    ]
    for break_, mend, error, message in cases:
        break_()
        with pytest.raises(error, match=message):
            opt.step()
        mend()
        assert_same(observable(), before)
    opt.step()  # and now it works
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before[0], params))


def test_closure_zero_grad_and_training(case):
    device, backend = case
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    x = torch.randn(256, 12, device=device)
    y = (x[:, :3].sum(1, keepdim=True) > 0).float()
    opt = SparseAdamW(model.parameters(), lr=3e-2, density=0.25, block_size=32, backend=backend)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    losses = [opt.step(closure).item() for _ in range(40)]
    assert losses[-1] < 0.6 * first
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before = snapshot([p.detach() for p in model.parameters()])
    opt.step()
    assert_same([p.detach() for p in model.parameters()], before)


def test_reference_is_bit_identical_to_torch_adamw_on_cpu():
    """The reference backend performs torch's single-tensor AdamW operations in the same order."""
    params = make_params("cpu")
    theirs = clone_params(params)
    ours = SparseAdamW(params, lr=1e-2, weight_decay=0.05, density=1.0, block_size=16, backend="reference")
    adamw = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05, foreach=False)
    grads = [[heavy_tailed(p.shape) for p in params] for _ in range(10)]
    run(ours, params, grads)
    run(adamw, theirs, grads)
    assert_same([p.detach() for p in params], [q.detach() for q in theirs])
