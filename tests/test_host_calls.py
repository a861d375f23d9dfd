"""Host work per steady-state SparseAdamW step (docs/design.md §9): Python calls counted as
cProfile counts them (deterministic, unlike a timer), at 48, 192 and 768 tensors, on every backend's host
path. Target: at most 3 calls per tensor + 300, and in fact a count that does not grow with the
number of tensors. Kernels are excluded: the reference backend's kernels and Triton's
interpreter are Python, and they are not the host path.
"""
from __future__ import annotations

import contextlib
import cProfile
import gc
import importlib
import pstats
import sys

import operator

import pytest
import torch

from sparse_grad import SparseAdamW, backends
from _utils import assert_step_frees_grads, backend_cases

COUNTS = (48, 192, 768)
OPTIONS = [
    {},
    {"scope": "tensor", "state_layout": "compact", "max_grad_norm": 1.0},
    {"min_blocks_per_tensor": 1, "reselect_every": 2, "weight_decay": torch.tensor(0.01)},
    {"score_ema": 0.5, "error_feedback": True, "score": "rms"},
    {"selection": "random", "seed": 3, "state_layout": "compact"},
    {"density": 1.0},
]
TRITON_LAUNCHERS = (("block_sqnorms", "launch_block_sqnorms"), ("select_blocks", "launch_select_blocks"),
                    ("sparse_adamw", "launch_sparse_adamw"))


def kernels_of(backend: str) -> list[tuple[object, str]]:
    """Where the backend's device work starts: what the count leaves out."""
    if backend == "triton":  # the launchers: what runs under them is the interpreter
        package = backends.triton_kernels().__name__
        return [(importlib.import_module(f"{package}.{module}"), name) for module, name in TRITON_LAUNCHERS]
    if backend == "reference":  # its kernels are PyTorch, written per tensor to be read
        return [(backends.get("reference"), name) for name in backends.KERNEL_NAMES]
    if backend == "cuda":  # its selection runs Triton's launchers on a GPU (backends/native.py)
        return [(backends.get("cuda"), "select_blocks")]
    return []  # cpp: one torch.ops call each, counted in full


class CallCounter:
    """Counts Python calls as cProfile's ``total_calls`` does (every call of a Python function
    and every call of a C function from Python), through ``sys.setprofile``, which every Python
    version keeps. Calls made while a kernel runs are not counted (see :func:`counting_without`):
    on Python 3.12+, pausing cProfile from inside a profiled call raises."""

    def __init__(self) -> None:
        self.calls = 0
        self.paused = 0

    def __call__(self, frame, event, arg) -> None:
        if not self.paused and (event == "call" or event == "c_call"):
            self.calls += 1


@contextlib.contextmanager
def counting_without(kernels):
    """A :class:`CallCounter` that does not count inside ``kernels`` (each counts as one call)."""
    counter = CallCounter()
    saved = []
    for module, name in kernels:
        real = getattr(module, name)

        def uncounted(*args, _real=real, **kwargs):
            counter.paused += 1
            # Off, not only paused: the hook would still run on each of the interpreter's
            # millions of calls (most of this file's time under TRITON_INTERPRET=1).
            hook = sys.getprofile()
            sys.setprofile(None)
            try:
                return _real(*args, **kwargs)
            finally:
                sys.setprofile(hook)
                counter.paused -= 1

        saved.append((module, name, real))
        setattr(module, name, uncounted)
    try:
        yield counter
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def count_calls(fn, kernels=()) -> int:
    # The collector paused, as in sparse_grad.bench.timing.python_calls: its callbacks (other
    # tests' hypothesis installs one) are not the step's calls, and run when earlier tests'
    # allocations say so.
    collecting = gc.isenabled()
    gc.disable()
    with counting_without(kernels) as counter:
        sys.setprofile(counter)
        try:
            fn()
        finally:
            sys.setprofile(None)
            if collecting:
                gc.enable()
    return counter.calls


BLOCK = 64  # tensors of at most one block: few programs for Triton's interpreter to run


def make_params(num_tensors: int, device: str) -> list[torch.nn.Parameter]:
    sizes = torch.randint(1, BLOCK + 1, (num_tensors,), generator=torch.Generator().manual_seed(num_tensors))
    params = [torch.nn.Parameter(torch.randn(int(n), device=device)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def select_like_the_reference(scores, out, plan, hist=None):
    """Stands in for the Triton selection kernels under the interpreter; the same ids."""
    out.copy_(backends.get("reference").select_blocks(scores, plan.sizes, plan.ks))


def norms_stand_in(out, *args, **kwargs):
    out.copy_(torch.arange(out.numel(), dtype=out.dtype).remainder(7))  # ties and a spread of scores


def update_stand_in(*args, **kwargs):
    pass


# Under the interpreter a launch over 768 tensors takes seconds, and what runs under a launcher is
# not counted anyway (``kernels_of``): the count is the same with these stand-ins, which take no
# time, in place of the kernels (tests/test_triton_select.py, test_block_sqnorms.py and
# test_sparse_adamw_step.py test the kernels themselves against the reference).
STAND_INS = {"launch_select_blocks": select_like_the_reference, "launch_block_sqnorms": norms_stand_in,
             "launch_sparse_adamw": update_stand_in}


def calls_per_step(num_tensors: int, device: str, backend: str, options: dict) -> int:
    if backend == "triton" and device == "cpu":
        package = backends.triton_kernels().__name__
        with pytest.MonkeyPatch.context() as patch:
            for module, name in TRITON_LAUNCHERS:
                patch.setattr(importlib.import_module(f"{package}.{module}"), name, STAND_INS[name])
            return _calls_per_step(num_tensors, device, backend, options)
    return _calls_per_step(num_tensors, device, backend, options)


def _calls_per_step(num_tensors: int, device: str, backend: str, options: dict) -> int:
    opt = SparseAdamW(make_params(num_tensors, device), block_size=BLOCK, backend=backend,
                      **{"density": 0.05, **options})
    for _ in range(3):  # state created, selection made, the step bound
        opt.step()
    return count_calls(opt.step, kernels_of(backend))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_python_calls_per_step_do_not_grow_with_the_tensors(case, options):
    device, backend = case
    calls = [calls_per_step(n, device, backend, options) for n in COUNTS]
    for n, c in zip(COUNTS, calls):
        assert c <= 3 * n + 300, f"{c} Python calls for a step over {n} tensors ({backend}, {options})"
    assert calls[0] == calls[-1], f"calls per step grow with the tensors: {dict(zip(COUNTS, calls))}"


def test_the_counter_counts_as_cprofile_does():
    device, backend = backend_cases()[0]
    opt = SparseAdamW(make_params(48, device), block_size=BLOCK, backend=backend, density=0.05)
    for _ in range(3):
        opt.step()
    profile = cProfile.Profile()
    profile.enable()
    opt.step()
    profile.disable()
    if sys.version_info < (3, 12):  # the same hooks: the same count
        assert count_calls(opt.step) == pstats.Stats(profile).total_calls
    assert count_calls(opt.step) > 100


def test_the_count_sees_per_tensor_work(monkeypatch):
    """The harness is not blind: a per-tensor Python call in the step shows up in the count."""
    from sparse_grad.optim import functional
    real = functional.sparse_step

    def per_tensor(step, *args):
        for p in step.params:
            p.numel()
        return real(step, *args)

    monkeypatch.setattr(functional, "sparse_step", per_tensor)
    monkeypatch.setattr("sparse_grad.optim.sparse_adamw.sparse_step", per_tensor)
    device, backend = backend_cases()[0]
    small, large = (calls_per_step(n, device, backend, {}) for n in (COUNTS[0], COUNTS[-1]))
    assert large - small == COUNTS[-1] - COUNTS[0]


def _stepped(params: list[torch.nn.Parameter], backend: str):
    opt = SparseAdamW(params, block_size=BLOCK, backend=backend, lr=1e-2, density=0.25)
    for _ in range(2):
        opt.step()
    return params, opt


def _twins(device: str) -> tuple[list, list]:
    params = make_params(12, device)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twin):
        q.grad = p.grad.clone()
    return params, twin


@pytest.fixture(params=["native", "python"])
def fingerprint(request, monkeypatch):
    """The bound step's fingerprint read by the extension's one C call, or by maps from Python."""
    from sparse_grad.optim import binding
    native = binding._native_fingerprint()
    if request.param == "native" and native is None:
        pytest.skip("sparse_grad._C is not built")
    monkeypatch.setattr(binding, "_native_fingerprint", lambda: native if request.param == "native" else None)
    return request.param


def test_a_bound_step_sees_changes_made_by_hand(case, fingerprint):
    """Each change the fingerprint covers is honoured on the next step: the same result as a
    fresh optimizer given the same state (so nothing stale was reused)."""
    from _utils import assert_same
    device, backend = case
    changes = [
        lambda params, opt: opt.param_groups[0].update(density=0.5),
        lambda params, opt: opt.param_groups[0].update(lr=3e-2, weight_decay=0.2),
        lambda params, opt: setattr(params[3], "data", params[3].data.clone()),
        lambda params, opt: opt.param_groups[0]["params"].__setitem__(5, params[5]),  # same object: no-op
        lambda params, opt: [setattr(p, "grad", p.grad.clone()) for p in params],
        lambda params, opt: setattr(params[7], "grad", None),
        lambda params, opt: setattr(params[2], "data", params[2].data.reshape(-1)),  # same address, new shape
        lambda params, opt: setattr(params[6], "grad", params[6].grad.as_subclass(_Marked)),  # same address
    ]
    for change in changes:
        params, twin_params = _twins(device)
        params, opt = _stepped(params, backend)
        twin_params, twin = _stepped(twin_params, backend)
        change(params, opt)
        change(twin_params, twin)
        fresh = SparseAdamW(twin_params, block_size=BLOCK, backend=backend, lr=1e-2, density=0.25)
        fresh.load_state_dict(twin.state_dict())  # a load drops every bound step
        fresh.param_groups[0].update({k: v for k, v in twin.param_groups[0].items() if k != "params"})
        opt.step()
        fresh.step()
        assert_same([p.detach() for p in params], [p.detach() for p in twin_params])


class _Marked(torch.Tensor):
    """A Tensor subclass: a grad view of this type at the same address is not a plain grad."""


def test_group_fingerprint_changes_with_everything_reuse_relies_on():
    """sparse_grad._C.group_fingerprint: equal bytes exactly when the params, their addresses,
    shapes and contiguity, and their grads' presence, address, shape, contiguity, dtype, device
    and type are unchanged; None where only the full check can say."""
    from sparse_grad.optim import binding
    native = binding._native_fingerprint()
    if native is None:
        pytest.skip("sparse_grad._C is not built")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(3)]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    key, grads = native(params)
    assert native(params)[0] == key and all(map(operator.is_, grads, [params[0].grad, params[1].grad]))
    changes = [
        lambda ps: setattr(ps[0], "data", ps[0].data.clone()),
        lambda ps: setattr(ps[0], "data", ps[0].data.reshape(5, 6)),
        lambda ps: setattr(ps[1], "data", ps[1].data.t()),
        lambda ps: setattr(ps[1], "grad", ps[1].grad.clone()),
        lambda ps: setattr(ps[1], "grad", ps[1].grad.reshape(5, 6).t()),  # same address and shape, strided
        lambda ps: setattr(ps[1], "grad", ps[1].grad.as_subclass(_Marked)),
        lambda ps: setattr(ps[1], "grad", None),
        lambda ps: setattr(ps[2], "grad", torch.randn_like(ps[2])),
        lambda ps: ps.__setitem__(0, torch.nn.Parameter(ps[0].detach())),  # same address, another object
    ]
    for change in changes:
        changed = [torch.nn.Parameter(p.detach()) for p in params]
        for p, q in zip(params, changed):
            q.grad = p.grad
        base = native(changed)[0]
        change(changed)
        assert native(changed)[0] != base
    assert native([params[0], "not a tensor"]) is None
    with pytest.raises(TypeError, match="list of tensors"):
        native(tuple(params))


def test_a_param_replaced_in_the_group_is_bound_again(case):
    device, backend = case
    params = make_params(12, device)
    opt = SparseAdamW(params, block_size=BLOCK, backend=backend, lr=1e-2, density=1.0)
    opt.step()
    opt.step()
    new = torch.nn.Parameter(params[2].detach().clone())
    new.grad = torch.randn_like(new)
    opt.param_groups[0]["params"][2] = new
    before, old = new.detach().clone(), params[2].detach().clone()
    opt.step()
    assert not torch.equal(new.detach(), before)  # the new param was updated (density 1)
    assert torch.equal(params[2].detach(), old) and len(opt.state[new]["block_step"]) == 1  # not the old one


def test_the_step_holds_no_grad_past_its_end(case):
    """After zero_grad(set_to_none=True) nothing of the optimizer keeps the old grads alive, so
    the next backward may reuse their memory (and a bound step's tables, built from addresses,
    stay valid where the allocator gives the same addresses back)."""
    device, backend = case
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 7)).to(device)
    opt = SparseAdamW(model.parameters(), lr=1e-3, density=0.3, block_size=16, backend=backend, reselect_every=2)
    assert_step_frees_grads(model, opt, torch.randn(9, 24, device=device))


HYPER_CASES = [  # (optimizer, a good new value, bad values set by hand with the error they get)
    (SparseAdamW, {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.2},
     [({"lr": -1.0}, ValueError, r"\['lr'\] must be >= 0"), ({"lr": True}, TypeError, r"\['lr'\] must be a real"),
      ({"betas": (0.9, 1.5)}, ValueError, r"\['betas'\]\[1\] must be in \[0, 1\)"),
      ({"betas": (0.9, 0.999, 0.5)}, TypeError, r"\['betas'\] must be a pair"),
      ({"eps": float("nan")}, ValueError, r"\['eps'\] must be finite"),
      ({"weight_decay": -0.1}, ValueError, r"\['weight_decay'\] must be >= 0")]),
    ("SparseSGD", {"lr": 3e-2, "dampening": 0.5, "weight_decay": 0.2},
     [({"dampening": -1.0}, ValueError, r"\['dampening'\] must be >= 0"),
      ({"lr": float("inf")}, ValueError, r"\['lr'\] must be finite")]),
    ("SparseLion", {"lr": 3e-3, "betas": (0.8, 0.95)},
     [({"betas": (-0.1, 0.99)}, ValueError, r"\['betas'\]\[0\] must be in \[0, 1\)")]),
]


@pytest.mark.parametrize("optimizer, good, bad", HYPER_CASES, ids=["adamw", "sgd", "lion"])
def test_a_bound_step_checks_hyper_parameters_only_when_they_change(case, optimizer, good, bad):
    """A reused step skips the checks while the group holds the objects that passed (immutable
    numbers), and reuses their table; any value set by hand is checked and refused, leaving
    params and state as they were, and a good new value takes effect as in a fresh optimizer."""
    import sparse_grad
    from _utils import assert_same, snapshot
    device, backend = case
    optimizer = getattr(sparse_grad, optimizer) if isinstance(optimizer, str) else optimizer
    extra = {"momentum": 0.9} if optimizer.__name__ == "SparseSGD" else {}
    params, twin_params = _twins(device)
    opt, twin = (optimizer(ps, block_size=BLOCK, backend=backend, lr=1e-2, density=0.25, **extra)
                 for ps in (params, twin_params))
    for _ in range(3):
        opt.step()
        twin.step()
    bound = opt._group_states[0].bound
    assert bound.checked_hyper is not None and bound.hyper_table is not None
    table = bound.hyper_table
    opt.step()
    twin.step()
    assert opt._group_states[0].bound is bound and bound.hyper_table is table  # nothing re-made
    for change, error, message in bad:
        kept = {key: opt.param_groups[0][key] for key in change}
        opt.param_groups[0].update(change)
        before = snapshot(([p.detach() for p in params], opt.state_dict()["state"]))
        with pytest.raises(error, match=r"param_groups\[0\]" + message):
            opt.step()
        assert_same(([p.detach() for p in params], opt.state_dict()["state"]), before)
        opt.param_groups[0].update(kept)
    lr = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)  # may change in place: checked each step
    opt.param_groups[0]["lr"] = lr
    twin.param_groups[0]["lr"] = lr.clone()
    opt.step()
    twin.step()
    lr.fill_(-1.0)
    with pytest.raises(ValueError, match=r"\['lr'\] must be >= 0"):
        opt.step()
    for o in (opt, twin):
        o.param_groups[0].update(good)
    opt.step()
    fresh = optimizer(twin_params, block_size=BLOCK, backend=backend, lr=1e-2, density=0.25, **extra)
    fresh.load_state_dict(twin.state_dict())
    fresh.param_groups[0].update({k: v for k, v in twin.param_groups[0].items() if k != "params"})
    fresh.step()
    assert_same([p.detach() for p in params], [p.detach() for p in twin_params])
