"""Tensor hyper-parameters and torch.compile(opt.step, fullgraph=True) (docs/design.md §3.4, §5)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_grad import SparseAdamW, ops
from _utils import assert_same, heavy_tailed
from test_sparse_adamw import clone_params, make_params, run

F64 = dict(dtype=torch.float64)


def test_tensor_hyperparameters_equal_floats(case):
    """lr, betas and weight_decay as fp64 tensors: the same bits as the same values as floats,
    through a scheduler that changes the tensor lr in place."""
    device, backend = case
    params = make_params(device)
    other = clone_params(params)
    common = dict(density=0.3, block_size=8, backend=backend)
    floats = SparseAdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, **common)
    tensors = SparseAdamW(other, lr=torch.tensor(1e-2, **F64), betas=(torch.tensor(0.9, **F64), 0.99),
                          weight_decay=torch.tensor(0.05, device=device, **F64), **common)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.7) for o in (floats, tensors)]
    grads = [[heavy_tailed(p.shape, device=device) for p in params] for _ in range(5)]
    run(floats, params, grads, schedulers[0])
    run(tensors, other, grads, schedulers[1])
    assert isinstance(tensors.param_groups[0]["lr"], torch.Tensor)
    assert float(tensors.param_groups[0]["lr"]) == floats.param_groups[0]["lr"]
    assert_same([p.detach() for p in other], [p.detach() for p in params])


@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=1.0, score_ema=0.5, error_feedback=True,
                                                  state_layout="compact", min_blocks_per_tensor=1)],
                         ids=["plain", "options"])
def test_compiled_step_does_not_recompile_over_scheduler_steps(case, options):
    device, backend = case
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    twin = copy.deepcopy(model)
    kwargs = dict(density=0.3, block_size=8, backend=backend, **options)
    opt = SparseAdamW(model.parameters(), lr=torch.tensor(1e-2), **kwargs)
    eager = SparseAdamW(twin.parameters(), lr=torch.tensor(1e-2), **kwargs)
    # Compile the bound method before a scheduler wraps opt.step (torch skips its wrapper).
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8) for o in (opt, eager)]
    for i in range(7):
        if i == 2:  # steps 1-2 compile (the first one creates the state)
            assert counters["stats"]["unique_graphs"] >= 1  # it did compile
            counters.clear()
        x = torch.randn(4, 6, device=device)
        for m, do_step, scheduler in ((model, step, schedulers[0]), (twin, eager.step, schedulers[1])):
            m.zero_grad()
            m(x).square().mean().backward()
            do_step()
            scheduler.step()
    assert counters["stats"]["unique_graphs"] == 0 and not counters["recompiles"]  # no recompiles
    assert not counters["graph_break"]
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in twin.parameters()])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=torch.tensor([1e-2, 1e-3])), ValueError, r"lr must be a one-element tensor, got one of shape \(2,\)"),
    (dict(lr=torch.tensor(1)), TypeError, "lr must be a real number or a one-element floating tensor"),
    (dict(lr=torch.tensor(-1e-2)), ValueError, "lr must be >= 0"),
    (dict(betas=(torch.tensor(1.5), 0.9)), ValueError, r"betas\[0\] must be in \[0, 1\)"),
    (dict(weight_decay=torch.tensor(float("nan"))), ValueError, "weight_decay must be finite"),
])
def test_bad_tensor_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW(make_params("cpu"), **kwargs)


def test_op_takes_tensor_hyperparameters(case):
    """ops.sparse_adamw_step with tensor lr/betas/weight_decay: the bits of the same floats."""
    from test_sparse_adamw_step import make_state, num_blocks, random_ids
    device, backend = case
    shapes = [(37,), (5, 13), (16,)]
    state = list(make_state(shapes, 8, torch.float32, torch.float32, device))
    twin = [[t.clone() for t in ts] for ts in state]
    ids = random_ids(num_blocks(shapes, 8), 7, device)
    ops.sparse_adamw_step(*state, ids, block_size=8, backend=backend, lr=3e-2, beta1=0.8, beta2=0.99,
                          weight_decay=0.1)
    ops.sparse_adamw_step(*twin, ids, block_size=8, backend=backend, lr=torch.tensor(3e-2, **F64),
                          beta1=torch.tensor(0.8, device=device, **F64), beta2=0.99,
                          weight_decay=torch.tensor(0.1, **F64))
    assert_same(twin, state)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        ops.sparse_adamw_step(*twin, ids, block_size=8, backend=backend, beta1=torch.tensor(1.0))
    assert_same(twin, state)


def _compiled_and_eager(device, backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    twin = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, density=0.3, block_size=8, backend=backend, score_ema=0.5)
    opt, eager = SparseAdamW(model.parameters(), **kwargs), SparseAdamW(twin.parameters(), **kwargs)
    return model, twin, opt, eager, torch.compile(opt.step, fullgraph=True, backend="eager")


def _train(pairs, device, steps, edit=None):
    for i in range(steps):
        x = torch.randn(4, 6, device=device)
        for m, o, do_step in pairs:
            if edit is not None and i == 1:
                edit(o.param_groups[0])
            m.zero_grad()
            m(x).square().mean().backward()
            do_step()


@pytest.mark.parametrize("key, value", [("density", 0.6), ("eps", 1e-3), ("density", 1.0), ("lr", 0.05)])
def test_compiled_step_follows_a_hand_change(case, key, value):
    """A hand change of an option after the step was compiled: the compiled step recompiles (or
    reads it as a dynamic value) and equals the eager step with the same change, bit for bit."""
    device, backend = case
    model, twin, opt, eager, step = _compiled_and_eager(device, backend)
    pairs = [(model, opt, step), (twin, eager, eager.step)]
    _train(pairs, device, 4, lambda group: group.__setitem__(key, value))
    assert opt.param_groups[0][key] == value
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in twin.parameters()])
    assert_same(opt.state_dict(), eager.state_dict())


@pytest.mark.parametrize("key, value, message", [
    ("density", 2.0, r"param_groups\[0\]\['density'\] must be in \(0, 1\]"),
    ("density", 0.0, r"param_groups\[0\]\['density'\] must be in \(0, 1\]"),
    ("eps", -1.0, r"param_groups\[0\]\['eps'\] must be >= 0"),
    ("eps", float("nan"), r"param_groups\[0\]\['eps'\] must be finite"),
    ("block_size", 0, r"param_groups\[0\]\['block_size'\] must be a positive int"),
])
def test_compiled_step_refuses_a_bad_hand_change(key, value, message):
    """A bad value set by hand reaches the compiled step's checks (they run while tracing): the
    error names the option (dynamo wraps the ValueError; its text is kept) and nothing changes."""
    model, _, opt, _, step = _compiled_and_eager("cpu", "reference")
    _train([(model, opt, step)], "cpu", 2)
    opt.param_groups[0][key] = value
    model.zero_grad()
    model(torch.randn(4, 6)).square().mean().backward()
    def now():  # (not param_groups: a NaN eps is unequal to itself)
        saved = opt.state_dict()
        return [p.detach() for p in model.parameters()], saved["state"], saved["param_groups"][0]["sparse_grad"]

    before = copy.deepcopy(now())
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match=message):
        step()
    assert_same(now(), before)
