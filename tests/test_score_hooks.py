"""SparseAdamW's score hooks and named parameters."""
import pytest
import torch
from _models import odd_model, set_grads, step_counts, updated_blocks
from _utils import assert_same, snapshot

from sparse_grad import SparseAdamW, ops


def test_hook_sees_scores_params_and_ids_of_every_group_step(case):
    device, backend = case
    model = odd_model(device)
    params = list(model.parameters())
    opt = SparseAdamW([{"params": params[:2]}, {"params": params[2:], "block_size": 4}], density=0.3,
                      block_size=16, reselect_every=2, backend=backend)
    calls = []
    handle = opt.register_score_hook(lambda *args: calls.append(args))
    for step in range(3):
        set_grads(model, skip=("2.bias",))
        before = dict(zip(map(id, params), step_counts(opt, params)))
        opt.step()
        assert [c[1] for c in calls[2 * step:]] == [0, 1]
        for (hook_opt, index, hook_params, scores, ids), group in zip(calls[2 * step:], opt.param_groups):
            taking_part = [p for p in group["params"] if p.grad is not None]
            assert hook_opt is opt and hook_params == taking_part
            # fresh scores on every step, also between reselections (step 1)
            expected = ops.block_sqnorms([p.grad.cpu() for p in taking_part], group["block_size"], backend="reference")
            torch.testing.assert_close(scores.cpu(), expected, rtol=1e-5, atol=0)
            assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.device.type == device
            assert set(ids.tolist()) == updated_blocks(opt, taking_part, [before[id(p)] for p in taking_part])
    handle.remove()
    opt.step()
    assert len(calls) == 6


def test_hook_forces_the_norm_pass_where_it_is_otherwise_skipped(monkeypatch):
    passes = []
    real = ops.unchecked.block_sqnorms
    monkeypatch.setattr(ops.unchecked, "block_sqnorms", lambda *a, **k: (passes.append(1), real(*a, **k))[1])
    model = odd_model()
    opt = SparseAdamW(model.parameters(), density=1.0, block_size=8)
    seen = []
    opt.register_score_hook(lambda o, i, ps, scores, ids: seen.append((scores, ids)))
    for _ in range(3):
        set_grads(model)
        opt.step()
    assert len(passes) == 3
    assert all(ids.numel() == scores.numel() for scores, ids in seen)  # density 1: every block


def test_named_parameters_give_the_same_trajectory_and_keep_their_names(case):
    device, backend = case
    torch.manual_seed(0)
    a, b = odd_model(device), odd_model(device)
    b.load_state_dict(a.state_dict())
    kwargs = {"lr": 1e-2, "density": 0.3, "block_size": 8, "backend": backend}
    opt_a = SparseAdamW(a.parameters(), **kwargs)
    opt_b = SparseAdamW(b.named_parameters(), **kwargs)
    assert opt_b.param_groups[0]["param_names"] == [n for n, _ in b.named_parameters()]
    for _ in range(3):
        for pa, g in zip(a.parameters(), set_grads(b)):
            pa.grad = g.clone()
        opt_a.step()
        opt_b.step()
    assert_same([p.detach() for p in a.parameters()], [p.detach() for p in b.parameters()])
    state = opt_b.state_dict()
    assert state["param_groups"][0]["param_names"][0] == "0.weight"
    opt_b.load_state_dict(state)


def test_bad_hooks_and_named_groups():
    model = odd_model()
    opt = SparseAdamW(model.parameters())
    with pytest.raises(TypeError, match="hook must be callable"):
        opt.register_score_hook("monitor")
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"all params of a group must be given with names .* or all without"):
        SparseAdamW([named[0][1], named[1]])  # names for some params only (a ValueError in torch too)


def test_a_failing_hook_leaves_later_steps_working():
    model = odd_model()
    opt = SparseAdamW(model.parameters(), density=0.5, block_size=8)

    def broken(*args):
        raise RuntimeError("hook failed")

    handle = opt.register_score_hook(broken)
    set_grads(model)
    with pytest.raises(RuntimeError, match="hook failed"):
        opt.step()
    handle.remove()
    before = snapshot([p.detach() for p in model.parameters()])
    opt.step()
    assert any(not torch.equal(x, p.detach()) for x, p in zip(before, model.parameters()))
