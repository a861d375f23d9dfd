"""What the update kernel reads on device: the clip coefficient (max_grad_norm) and GradScaler's
grad_scale / found_inf (docs/design.md §3.4)."""
import pytest
import torch

from sparse_grad import SparseAdamW, ops
from _utils import TOLERANCES, assert_same, heavy_tailed, snapshot
from test_sparse_adamw import clone_params, count_norm_passes, make_params, run
from test_sparse_adamw_step import HYPER, make_state, num_blocks, random_ids

SHAPES = [(37,), (5, 13), (16,)]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grad_coef_scales_the_grads_inside_the_kernel(case, param_dtype):
    """grad_coef = c gives the result of the grads multiplied by c (in the compute dtype)."""
    device, backend = case
    params, grads, exp_avgs, exp_avg_sqs, steps = make_state(SHAPES, 8, param_dtype, param_dtype, device)
    coef = torch.rand(1, device=device) + 0.1
    compute = torch.float64 if param_dtype == torch.float64 else torch.float32
    scaled = [(g.to(compute) * coef.to(compute)) for g in grads]
    state = [params, grads, exp_avgs, exp_avg_sqs, steps]
    expected = [[t.clone() for t in ts] for ts in state]
    expected[1] = scaled
    ids = random_ids(num_blocks(SHAPES, 8), 9, device)
    ops.sparse_adamw_step(*state, ids, block_size=8, backend=backend, grad_coef=coef, **HYPER)
    ops.sparse_adamw_step(*expected, ids, block_size=8, backend=backend, **HYPER)
    for got, want in zip(state, expected):
        if got is grads:
            continue
        for g, w in zip(got, want):
            atol, rtol = TOLERANCES[g.dtype] if g.dtype != torch.int32 else (0, 0)
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def test_found_inf_changes_nothing(case):
    device, backend = case
    state = list(make_state(SHAPES, 8, torch.float32, torch.float32, device))
    before = snapshot(state)
    ids = random_ids(num_blocks(SHAPES, 8), 9, device)
    ops.sparse_adamw_step(*state, ids, block_size=8, backend=backend, found_inf=torch.ones(1, device=device),
                          grad_coef=torch.full((1,), 0.5, device=device), **HYPER)
    assert_same(state, before)
    ops.sparse_adamw_step(*state, ids, block_size=8, backend=backend, found_inf=torch.zeros(1, device=device),
                          **HYPER)
    assert int(sum(s.sum() for s in state[4])) == int(sum(s.sum() for s in before[4])) + 9


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(grad_coef=0.5), TypeError, "grad_coef must be None or a one-element float32 tensor"),
    (dict(grad_coef=torch.ones(2)), TypeError, "grad_coef"),
    (dict(grad_coef=torch.ones(1, dtype=torch.float64)), TypeError, "grad_coef"),
    (dict(found_inf=torch.ones(1, device="meta")), ValueError, "found_inf is on meta"),
])
def test_bad_device_scalars_change_nothing(kwargs, error, message):
    state = list(make_state(SHAPES, 8, torch.float32, torch.float32, "cpu"))
    before = snapshot(state)
    with pytest.raises(error, match=message):
        ops.sparse_adamw_step(*state, torch.tensor([0, 3]), block_size=8, **kwargs)
    assert_same(state, before)


@pytest.mark.parametrize("max_grad_norm", [0.5, 1e4])  # clipping active, inactive
def test_max_grad_norm_matches_clip_grad_norm_and_adamw(case, max_grad_norm):
    device, backend = case
    params = make_params(device)
    theirs = clone_params(params)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    ours = SparseAdamW(params, density=1.0, block_size=16, max_grad_norm=max_grad_norm, backend=backend, **hyper)
    adamw = torch.optim.AdamW(theirs, foreach=False, **hyper)
    norms = []
    for _ in range(10):
        grads = [heavy_tailed(p.shape, device=device) for p in params]
        for p, q, g in zip(params, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        norms.append(float(torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm)))
        adamw.step()
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert (min(norms) > max_grad_norm) == (max_grad_norm < 1)  # clipped every step, or never


def test_clipping_reuses_the_norm_pass_and_leaves_grads(case, monkeypatch):
    device, backend = case
    calls = count_norm_passes(monkeypatch)
    params = make_params(device)
    opt = SparseAdamW(params, density=0.2, block_size=8, reselect_every=2, max_grad_norm=1.0, backend=backend)
    grads = [[heavy_tailed(p.shape, device=device) for p in params] for _ in range(4)]
    run(opt, params, grads)
    assert len(calls) == 4  # one pass per step, selecting or not: clipping needs every step's norm
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads[-1]))


def amp_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)


def amp_steps(model, opt, scaler, data, inf_at=()):
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_grad_scaler_matches_adamw(case, max_grad_norm):
    device, backend = case
    ours, theirs = amp_model(device), amp_model(device)
    data = [(torch.randn(32, 6, device=device), torch.randn(32, 1, device=device)) for _ in range(8)]
    opt = SparseAdamW(ours.parameters(), lr=1e-2, density=1.0, block_size=16, max_grad_norm=max_grad_norm,
                      backend=backend)
    adamw = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    amp_steps(ours, opt, scalers[0], data, inf_at=(3,))
    # torch's own path: unscale, (clip), step, as GradScaler documents it.
    for i, (x, y) in enumerate(data):
        adamw.zero_grad()
        scalers[1].scale(torch.nn.functional.mse_loss(theirs(x), y)).backward()
        if i == 3:
            next(theirs.parameters()).grad[0, 0] = float("inf")
        scalers[1].unscale_(adamw)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_grad_norm)
        scalers[1].step(adamw)
        scalers[1].update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert int(opt.state[p]["block_step"].max()) == 7  # the inf step did not count
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("options", [dict(score_ema=0.5, reselect_every=1),
                                     dict(error_feedback=True, max_grad_norm=0.5, score_ema=0.9),
                                     dict(state_layout="compact", score_ema=0.5, max_grad_norm=0.5)])
def test_an_overflowed_step_changes_nothing(case, options):
    device, backend = case
    model = amp_model(device)
    data = [(torch.randn(32, 6, device=device), torch.randn(32, 1, device=device)) for _ in range(3)]
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.3, block_size=8, backend=backend, **options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    amp_steps(model, opt, scaler, data[:2])
    before = snapshot(([p.detach() for p in model.parameters()], opt.state_dict()))
    amp_steps(model, opt, scaler, data[2:], inf_at=(0,))
    after = ([p.detach() for p in model.parameters()], opt.state_dict())
    # (reselect_every=1: the selection's age, a host-side count, is 1 after every step)
    assert_same(after, before)
    assert scaler.get_scale() == 2.0**9
    amp_steps(model, opt, scaler, data[:1])  # and the next finite step does update
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before[0], model.parameters()))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm must be finite"),
])
def test_bad_max_grad_norm(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW(make_params("cpu"), **kwargs)


def test_bad_grad_scale_attribute_changes_nothing():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8)
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    for p in params:
        p.grad = heavy_tailed(p.shape)
    before = snapshot(([p.detach() for p in params], opt.state_dict()))
    opt.grad_scale = 1024.0
    with pytest.raises(TypeError, match="optimizer.grad_scale must be None or a one-element float tensor"):
        opt.step()
    del opt.grad_scale
    opt.found_inf = torch.zeros(3)
    with pytest.raises(TypeError, match="optimizer.found_inf"):
        opt.step()
    del opt.found_inf
    assert_same(([p.detach() for p in params], opt.state_dict()), before)
