"""The step's hooks and profiler range behave as torch.optim.AdamW's.

torch.optim.Optimizer wraps every step in pre- and post-hooks and a profiler range
(``Optimizer.step#<Class>.step``); sparse_grad's optimizers use torch's wrapper wherever a hook
is registered, a profiler runs or a compilation is under way, and skip the range's cost
otherwise (sparse_grad/optim/step_hooks.py). torch.optim.AdamW is the oracle for what the hooks
see and return.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import sparse_grad

MAKERS = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    "SparseAdamW": lambda ps: sparse_grad.SparseAdamW(ps, lr=0.01, density=0.5, block_size=4, backend="reference"),
    "SparseSGD": lambda ps: sparse_grad.SparseSGD(ps, lr=0.01, momentum=0.9, density=0.5, block_size=4,
                                                  backend="reference"),
    "SparseLion": lambda ps: sparse_grad.SparseLion(ps, lr=0.01, density=0.5, block_size=4, backend="reference"),
    "sparsify": lambda ps: sparse_grad.sparsify(torch.optim.Adam(ps, lr=0.01), density=0.5, block_size=4,
                                                backend="reference"),
}
SPARSE = [name for name in MAKERS if name != "torch AdamW"]


def make(name):
    params = [torch.nn.Parameter(torch.randn(n)) for n in (9, 3, 16)]
    for p in params:
        p.grad = torch.randn_like(p)
    return MAKERS[name](params), params


def hooked_run(name):
    """What the four kinds of hook see over two steps, and what the steps return."""
    opt, _ = make(name)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("global pre", len(args), sorted(kwargs)))),
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt, len(args)))),
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt, len(args)))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("global post", len(args)))),
    ]
    try:
        returned = [opt.step(), opt.step(closure=lambda: 7.0)]
    finally:
        for handle in handles:
            handle.remove()
    return seen, returned


@pytest.mark.parametrize("name", SPARSE)
def test_step_hooks_run_as_around_torch_adamw(name):
    assert hooked_run(name) == hooked_run("torch AdamW")


@pytest.mark.parametrize("name", ["torch AdamW"] + SPARSE)
def test_a_pre_hook_may_replace_the_step_arguments(name):
    opt, params = make(name)
    before = [p.detach().clone() for p in params]
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 42.0}))
    assert opt.step() == 42.0  # the hook's closure ran: the step saw the new kwargs
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    handle.remove()
    assert opt.step() is None  # removed: the step's own arguments again
    bad = opt.register_step_pre_hook(lambda o, args, kwargs: "not a pair")
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        opt.step()
    bad.remove()


class RangeRecorder:
    """Stands in for torch.autograd.profiler.record_function: records the ranges entered."""

    def __init__(self, real, names):
        self.real, self.names = real, names

    def __call__(self, name, *args, **kwargs):
        self.names.append(name)
        return self.real(name, *args, **kwargs)


@pytest.mark.parametrize("name", SPARSE)
def test_the_profiler_range_only_where_something_records_it(name, monkeypatch):
    opt, _ = make(name)
    cls = type(opt).__name__
    entered = []
    monkeypatch.setattr(torch.autograd.profiler, "record_function",
                        RangeRecorder(torch.autograd.profiler.record_function, entered))
    opt.step()
    assert entered == []  # no hook, no profiler: no range entered
    handle = opt.register_step_post_hook(lambda *args: None)
    opt.step()
    handle.remove()
    assert entered == [f"Optimizer.step#{cls}.step"]  # a hook: torch's own wrapper
    entered.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert entered == [f"Optimizer.step#{cls}.step"]
    assert f"Optimizer.step#{cls}.step" in {event.name for event in prof.events()}


@pytest.mark.parametrize("name", SPARSE)
def test_an_lr_scheduler_sees_the_steps(name):
    """torch's schedulers wrap the instance's step to check the call order: no warning."""
    opt, _ = make(name)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step()
            scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 8)


@pytest.mark.parametrize("name", SPARSE)
def test_the_step_is_not_wrapped_twice(name):
    """Optimizer.__init__ wraps a step that is not marked ``hooked``: a second optimizer of the
    same class must leave the class's step as it was."""
    opt, _ = make(name)
    step = type(opt).step
    assert getattr(step, "hooked", False)
    make(name)
    assert type(opt).step is step
