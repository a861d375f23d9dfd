"""SparseAdamW's state and selection options: state_dtype, score, score_ema,
min_blocks_per_tensor, error_feedback (docs/design.md §3–§4); state_dict round trips with every option."""

import pytest
import torch

from sparse_grad import SparseAdamW, ops
from _utils import TOLERANCES, assert_same, heavy_tailed, snapshot
from test_sparse_adamw import (SHAPES, bad_group_values_change_nothing, changed_blocks, clone_params, exact_grads,
                               make_params, resume_midway, run)


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_for_16bit_params_matches_adamw_on_fp32_copies(case, dtype):
    """state_dtype=float32: each step is torch's AdamW on an fp32 copy of the 16-bit params with
    fp32 moments, rounded back to the param dtype once."""
    device, backend = case
    params = make_params(device, dtype)
    copies = [torch.nn.Parameter(p.detach().float()) for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours = SparseAdamW(params, density=1.0, block_size=16, backend=backend, state_dtype=torch.float32, **hyper)
    adamw = torch.optim.AdamW(copies, foreach=False, **hyper)
    for _ in range(10):
        grads = [heavy_tailed(p.shape, dtype, device) for p in params]
        set_grads(params, grads)
        for p, q, g in zip(params, copies, grads):
            q.data.copy_(p.detach().float())
            q.grad = g.float()
        ours.step()
        adamw.step()
    for p, q in zip(params, copies):
        assert ours.state[p]["exp_avg"].dtype == ours.state[p]["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(p.detach(), q.detach().to(dtype), atol=TOLERANCES[dtype][0],
                                   rtol=TOLERANCES[dtype][1])
        atol, rtol = TOLERANCES[torch.float32]
        torch.testing.assert_close(ours.state[p]["exp_avg"], adamw.state[q]["exp_avg"], atol=atol, rtol=rtol)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"], atol=atol, rtol=rtol)


def mean_square_selection(grads, block_size, density):
    layout = ops.BlockLayout(grads, block_size)
    sqnorms = ops.block_sqnorms([g.cpu() for g in grads], block_size, backend="reference")
    scores = sqnorms / layout.block_numels().float()
    return set(ops.select_blocks(scores, density=density, backend="reference").tolist())


def test_rms_score_ranks_by_mean_square(case):
    device, backend = case
    params = make_params(device)
    opt = SparseAdamW(params, lr=1e-2, density=0.3, block_size=8, score="rms", backend=backend)
    layout = ops.BlockLayout(params, 8)
    for _ in range(3):
        grads = exact_grads(params)
        set_grads(params, grads)
        before = snapshot([p.detach() for p in params])
        opt.step()
        assert changed_blocks(before, params, layout) == mean_square_selection(grads, 8, 0.3)


def test_score_ema_ranks_the_running_average(case):
    device, backend = case
    params = make_params(device)
    beta = 0.75
    opt = SparseAdamW(params, lr=1e-2, density=0.2, block_size=8, score_ema=beta, backend=backend)
    layout = ops.BlockLayout(params, 8)
    ema = None
    for _ in range(4):
        grads = exact_grads(params)
        set_grads(params, grads)
        sqnorms = ops.block_sqnorms([g.cpu() for g in grads], 8, backend="reference")
        ema = sqnorms if ema is None else ema * beta + sqnorms * (1 - beta)
        before = snapshot([p.detach() for p in params])
        opt.step()
        expected = set(ops.select_blocks(ema, density=0.2, backend="reference").tolist())
        assert changed_blocks(before, params, layout) == expected
    got = torch.cat([opt.state[p]["score_ema"].cpu() for p in params])
    torch.testing.assert_close(got, ema, atol=0, rtol=1e-6)
    assert all(opt.state[p]["score_ema"].dtype == torch.float32 for p in params)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_min_blocks_per_tensor(case, scope):
    device, backend = case
    params = make_params(device)
    layout = ops.BlockLayout(params, 4)
    opt = SparseAdamW(params, lr=1e-2, density=0.05, block_size=4, scope=scope, min_blocks_per_tensor=2,
                      backend=backend)
    for _ in range(2):
        grads = exact_grads(params)
        grads[4] = grads[4] * 64  # one tensor dominates: global top-k alone would pick only its blocks
        set_grads(params, grads)
        before = snapshot([p.detach() for p in params])
        opt.step()
        changed = changed_blocks(before, params, layout)
        per_tensor = [sum(1 for b in changed if layout.block_range(t)[0] <= b < layout.block_range(t)[1])
                      for t in range(len(params))]
        assert all(c >= min(2, n) for c, n in zip(per_tensor, layout.block_counts))
        sqnorms = ops.block_sqnorms([g.cpu() for g in grads], 4, backend="reference")
        for t, c in enumerate(per_tensor):  # each tensor's chosen blocks are its own top ones
            start, end = layout.block_range(t)
            top = set((torch.sort(sqnorms[start:end] + 0.0, descending=True, stable=True).indices[:c] + start).tolist())
            assert {b for b in changed if start <= b < end} == top
        if scope == "global":
            k = ops.num_selected(0.05, layout.num_blocks)
            assert len(changed) == max(k, sum(min(2, n) for n in layout.block_counts))


def test_error_feedback_loses_no_gradient_mass(case, monkeypatch):
    """Over T steps: the gradient the updates applied + what is left in the buffer = Σ grads."""
    device, backend = case
    params = make_params(device, torch.float64)
    layout = ops.BlockLayout(params, 8)
    applied = [torch.zeros_like(p) for p in params]
    real = ops.unchecked.sparse_adamw_step

    def recording(ps, grads, *args, **kwargs):
        ids = args[3]
        mask = torch.zeros(layout.num_blocks, dtype=torch.bool, device=ids.device).index_fill(0, ids, True)
        for t, (a, g) in enumerate(zip(applied, grads)):
            start, end = layout.block_range(t)
            m = mask[start:end].repeat_interleave(8)[:g.numel()].view_as(g)
            a += torch.where(m, g, 0.0)
        return real(ps, grads, *args, **kwargs)

    monkeypatch.setattr(ops.unchecked, "sparse_adamw_step", recording)
    opt = SparseAdamW(params, lr=1e-2, density=0.1, block_size=8, error_feedback=True, backend=backend)
    total = [torch.zeros_like(p) for p in params]
    magnitude = [torch.zeros_like(p) for p in params]  # Σ|g|: the scale of the rounding
    for _ in range(7):
        grads = [heavy_tailed(p.shape, torch.float64, device) for p in params]
        set_grads(params, grads)
        opt.step()
        for s, m, g in zip(total, magnitude, grads):
            s += g
            m += g.abs()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # grads are not modified
    for a, p, s, m in zip(applied, params, total, magnitude):
        # The sums are associated differently (buffer vs applied vs total): equal up to a few
        # fp64 roundings of the largest partial sum, which cancellation can leave far above |s|.
        error = (a + opt.state[p]["error"] - s).abs()
        assert (error <= 16 * torch.finfo(torch.float64).eps * m).all(), error.max()
    assert sum(opt.state[p]["error"].abs().sum() for p in params) > 0  # not everything was applied


def test_error_feedback_selects_on_accumulated_gradient(case):
    device, backend = case
    params = make_params(device)
    layout = ops.BlockLayout(params, 8)
    opt = SparseAdamW(params, lr=1e-2, density=0.2, block_size=8, error_feedback=True, backend=backend)
    buffer = [torch.zeros_like(p) for p in params]
    for _ in range(4):
        grads = exact_grads(params)
        set_grads(params, grads)
        seen = [b + g for b, g in zip(buffer, grads)]
        sqnorms = ops.block_sqnorms([s.cpu() for s in seen], 8, backend="reference")
        expected = set(ops.select_blocks(sqnorms, density=0.2, backend="reference").tolist())
        before = snapshot([p.detach() for p in params])
        opt.step()
        assert changed_blocks(before, params, layout) == expected
        for t, (s, p) in enumerate(zip(seen, params)):
            start, _ = layout.block_range(t)
            flat = s.reshape(-1).clone()
            for i in range(layout.block_counts[t]):
                if start + i in expected:
                    flat[i * 8:(i + 1) * 8] = 0
            buffer[t] = flat.view_as(s)
            assert torch.equal(opt.state[p]["error"], buffer[t])


OPTIONS = [
    dict(state_dtype=torch.float32),
    dict(score="rms", score_ema=0.5, min_blocks_per_tensor=1, reselect_every=2),
    dict(error_feedback=True, scope="tensor"),
    dict(state_dtype=torch.float32, score_ema=0.9, error_feedback=True, min_blocks_per_tensor=3),
    dict(max_grad_norm=0.5, score_ema=0.5),
    dict(state_layout="compact", score_ema=0.5, error_feedback=True, reselect_every=2),
    dict(state_layout="compact", state_dtype=torch.float32, max_grad_norm=1.0, scope="tensor"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
def test_state_dict_round_trip_with_options(case, dtype, options):
    device, backend = case
    params = make_params(device, dtype)
    kwargs = dict(lr=1e-2, density=0.3, block_size=8, backend=backend, **options)
    grads = [[heavy_tailed(p.shape, dtype, device) for p in params] for _ in range(6)]
    opt = SparseAdamW(params, **kwargs)
    # every option comes from the state dict
    resumed, opt2 = resume_midway(opt, params, grads, 3, lambda ps: SparseAdamW(ps, backend=backend))
    assert_same([p.detach() for p in resumed], [p.detach() for p in params])
    assert_same([opt2.state[p] for p in resumed], [opt.state[p] for p in params])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(state_dtype=torch.float16), ValueError, "state_dtype"),
    (dict(state_dtype="float32"), ValueError, "state_dtype"),
    (dict(score="l1"), ValueError, "score"),
    (dict(score=2), TypeError, "score"),
    (dict(score_ema=1.0), ValueError, r"score_ema must be in \[0, 1\)"),
    (dict(score_ema=-0.1), ValueError, "score_ema"),
    (dict(score_ema="0.9"), TypeError, "score_ema"),
    (dict(min_blocks_per_tensor=-1), ValueError, "min_blocks_per_tensor"),
    (dict(min_blocks_per_tensor=1.5), TypeError, "min_blocks_per_tensor"),
    (dict(error_feedback=1), TypeError, "error_feedback"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW(make_params("cpu"), **kwargs)
    with pytest.raises(error, match=r"param_groups\[1\]\['" + message.split()[0]):
        SparseAdamW([{"params": make_params("cpu")}, {"params": make_params("cpu"), **kwargs}])


def test_bad_options_at_step_change_nothing():
    params = make_params("cpu", torch.bfloat16)
    opt = SparseAdamW(params, density=0.5, block_size=8, score_ema=0.5, error_feedback=True)
    run(opt, params, [[heavy_tailed(p.shape, torch.bfloat16) for p in params]])
    set_grads(params, [heavy_tailed(p.shape, torch.bfloat16) for p in params])
    bad_group_values_change_nothing(opt, params, [
        ("state_dtype", torch.float32, ValueError,
         r"param_groups\[0\]\['state_dtype'\] is torch.float32, but the state of .*\['params'\]\[0\] is torch.bfloat16"),
        ("score_ema", 2.0, ValueError, "score_ema"),
        ("min_blocks_per_tensor", None, TypeError, "min_blocks_per_tensor"),
    ])


def test_load_state_dict_checks_option_state():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8, state_dtype=torch.float32, error_feedback=True,
                      score_ema=0.5)
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    good = opt.state_dict()
    before = snapshot(good)
    bad = snapshot(good)
    bad["state"][1]["error"] = bad["state"][1]["error"][:3]
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: its error has shape \(3, 13\), expected \(5, 13\)"):
        opt.load_state_dict(bad)
    bad = snapshot(good)
    bad["state"][2]["score_ema"] = bad["state"][2]["score_ema"].double()
    with pytest.raises(ValueError, match=r"\['params'\]\[2\]: its score_ema is torch.float64"):
        opt.load_state_dict(bad)
    bad = snapshot(good)
    bad["state"][0]["moment"] = bad["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]: unknown state 'moment'"):
        opt.load_state_dict(bad)
    assert_same(opt.state_dict(), before)
    # bf16 params with fp32 state: the loaded state keeps fp32 (torch would cast it to bf16).
    bf16 = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]
    opt16 = SparseAdamW(bf16, density=0.5, block_size=8, state_dtype=torch.float32, score_ema=0.5)
    run(opt16, bf16, [[heavy_tailed(p.shape, torch.bfloat16) for p in params]])
    fresh = SparseAdamW(clone_params(bf16))
    fresh.load_state_dict(opt16.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 and s["score_ema"].dtype == torch.float32
               for s in fresh.state.values())


def test_shapes_are_odd():  # the helpers above rely on tails: keep SHAPES covering partial blocks
    assert any(torch.Size(s).numel() % 8 for s in SHAPES)


def test_adamw_signature_is_accepted():
    """Every keyword torch.optim.AdamW takes, at its default, builds a SparseAdamW (a config
    written for AdamW loads unchanged)."""
    import inspect
    defaults = {name: p.default for name, p in inspect.signature(torch.optim.AdamW).parameters.items()
                if name != "params"}
    opt = SparseAdamW(make_params("cpu"), **defaults)
    assert all(k == "amsgrad" or opt.defaults[k] == v for k, v in defaults.items())


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=False, capturable=True), dict(foreach=True)])
def test_adamw_flags_are_stored_and_change_no_update(flags):
    params = make_params("cpu")
    flagged_params = clone_params(params)
    grads = [[heavy_tailed(p.shape) for p in params] for _ in range(3)]
    plain = SparseAdamW(params, lr=1e-2, density=0.3, block_size=8)
    run(plain, params, grads)
    flagged = SparseAdamW(flagged_params, lr=1e-2, density=0.3, block_size=8, **flags)
    run(flagged, flagged_params, grads)
    assert_same([p.detach() for p in flagged_params], [p.detach() for p in params])
    for key, value in flags.items():  # in every group, as torch.optim.AdamW stores them
        assert flagged.param_groups[0][key] == value and flagged.state_dict()["param_groups"][0][key] == value


def test_state_dict_without_adamw_flags_loads():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8, fused=True)
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    old = opt.state_dict()
    for group in old["param_groups"]:  # as saved before the flags existed
        for key in ("foreach", "fused", "capturable", "differentiable"):
            del group[key]
    fresh = SparseAdamW(clone_params(params), density=0.5, block_size=8, fused=True)
    fresh.load_state_dict(old)
    assert {k: fresh.param_groups[0][k] for k in ("foreach", "fused", "capturable", "differentiable")} == \
        {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
    run(fresh, list(fresh.param_groups[0]["params"]), [[heavy_tailed(p.shape) for p in params]])


@pytest.mark.parametrize("kwargs, error, key, message", [
    (dict(differentiable=True), ValueError, "differentiable", "=True is not supported"),
    (dict(differentiable=1), TypeError, "differentiable", " must be a bool"),
    (dict(fused="yes"), TypeError, "fused", " must be None or a bool"),
    (dict(foreach=0), TypeError, "foreach", " must be None or a bool"),
    (dict(capturable=None), TypeError, "capturable", " must be a bool"),
    (dict(capturable=True, backend="reference"), ValueError, "capturable", "=True with backend='reference'"),
])
def test_bad_adamw_flags(kwargs, error, key, message):
    with pytest.raises(error, match=f"^{key}{message}"):
        SparseAdamW(make_params("cpu"), **kwargs)
    with pytest.raises(error, match=rf"^param_groups\[1\]\['{key}'\]{message}"):
        SparseAdamW([{"params": make_params("cpu")}, {"params": make_params("cpu"), **kwargs}])


def test_adamw_flags_set_by_hand_are_checked_at_step():
    params = make_params("cpu")
    opt = SparseAdamW(params, density=0.5, block_size=8, backend="reference")
    run(opt, params, [[heavy_tailed(p.shape) for p in params]])
    set_grads(params, [heavy_tailed(p.shape) for p in params])
    bad_group_values_change_nothing(opt, params, [
        ("differentiable", True, ValueError, r"param_groups\[0\]\['differentiable'\]=True is not supported"),
        ("capturable", True, ValueError, r"param_groups\[0\]\['capturable'\]=True with backend='reference'"),
        ("fused", "yes", TypeError, r"param_groups\[0\]\['fused'\] must be None or a bool"),
    ])
