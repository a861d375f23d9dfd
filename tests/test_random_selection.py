"""selection="random": the control baseline draws uniformly, deterministically, resumably."""
import copy

import pytest
import torch
from _utils import snapshot

from sparse_grad import SparseAdamW
from sparse_grad.optim.random_draws import random_scores
from sparse_grad.layout import BlockLayout


def _params(seed, shapes=((37, 11), (5,), (300,), (64, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _fill_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def _selected(opt):
    return opt.group_state(0).selection.block_ids.sort().values


def test_draws_are_uniform_and_depend_on_seed_group_and_draw():
    layout = BlockLayout.of_numels((1000, 37, 4000), 16)
    counts = torch.zeros(layout.num_blocks)
    for draw in range(400):
        scores = random_scores(layout, seed=3, group_index=0, draw=draw)
        counts[scores.topk(30).indices] += 1
    # every block is drawn about 400 · 30 / n times: Pearson's χ² is near its n − 1 degrees of
    # freedom (± 5 σ); a fixed draw, or one favouring some ids, is far above
    expected = 400 * 30 / layout.num_blocks
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = layout.num_blocks - 1
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5
    # different seeds / groups / draws give different rankings
    a = random_scores(layout, 3, 0, 0)
    assert not torch.equal(a, random_scores(layout, 4, 0, 0))
    assert not torch.equal(a, random_scores(layout, 3, 1, 0))
    assert torch.equal(a, random_scores(layout, 3, 0, 0))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_selection_is_independent_of_the_gradient_and_redrawn(case, scope):
    device, backend = case
    chosen = []
    for grad_seed in (1, 2):  # different gradients, same seed: the same draws
        params = [p.detach().to(device).requires_grad_() for p in _params(0)]
        opt = SparseAdamW(params, lr=1e-2, density=0.25, block_size=16, scope=scope, selection="random",
                          seed=7, backend=backend)
        draws = []
        for step in range(2):
            _fill_grads(params, grad_seed * 10 + step)
            opt.step()
            draws.append(_selected(opt).cpu())
        chosen.append(draws)
    assert all(torch.equal(a, b) for a, b in zip(*chosen))
    assert not torch.equal(chosen[0][0], chosen[0][1])  # a new draw at each reselection
    layout = BlockLayout.of_numels(tuple(p.numel() for p in _params(0)), 16)
    if scope == "global":
        assert chosen[0][0].numel() == -(-layout.num_blocks // 4)
    else:
        assert chosen[0][0].numel() == sum(-(-n // 4) for n in layout.block_counts)
        for t in range(len(layout.block_counts)):  # every tensor gets its own share
            start, stop = layout.block_range(t)
            inside = ((chosen[0][0] >= start) & (chosen[0][0] < stop)).sum().item()
            assert inside == -(-layout.block_counts[t] // 4)


def test_same_seed_same_run_and_resume_is_bit_exact():
    def run(steps, resume_at=None):
        params = _params(5)
        opt = SparseAdamW(params, lr=1e-2, density=0.2, block_size=8, selection="random", seed=11,
                          reselect_every=2)
        for step in range(steps):
            if step == resume_at:
                saved = copy.deepcopy(opt.state_dict())
                params = [p.detach().clone().requires_grad_() for p in params]
                opt = SparseAdamW(params, lr=1e-2, density=0.2, block_size=8, selection="random", seed=11,
                                  reselect_every=2)
                opt.load_state_dict(saved)
            _fill_grads(params, 100 + step)
            opt.step()
        return params

    straight = run(7)
    assert all(torch.equal(a, b) for a, b in zip(straight, run(7, resume_at=3)))
    other_seed = _params(5)
    opt = SparseAdamW(other_seed, lr=1e-2, density=0.2, block_size=8, selection="random", seed=12,
                      reselect_every=2)
    for step in range(7):
        _fill_grads(other_seed, 100 + step)
        opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(straight, other_seed))


def test_bad_options_are_refused_before_anything_changes():
    params = _params(0)
    before = snapshot(params)
    with pytest.raises(ValueError, match="selection"):
        SparseAdamW(params, selection="topk")
    with pytest.raises(TypeError, match="seed"):
        SparseAdamW(params, selection="random", seed=1.5)
    with pytest.raises(ValueError, match="score_ema"):
        SparseAdamW(params, selection="random", score_ema=0.9)
    opt = SparseAdamW(params, density=0.5, block_size=8)
    _fill_grads(params, 0)
    opt.param_groups[0]["selection"] = "nope"
    with pytest.raises(ValueError, match="selection"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(params))) and not opt.state
