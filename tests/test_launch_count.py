"""Kernel launches per SparseAdamW step on the Triton path, and the cached device tables.

A step is at most one launcher call per op (norm pass, selection, update) for a group of one
dtype, whatever the number of tensors (the selection's launcher runs a fixed sequence of kernels,
tests/test_triton_select.py records it), and one memset, the selection's zeroed histograms
(made before the norm pass where that pass fills the selection's first histogram, docs/design.md
§3.3, else inside the selection's launcher); everything else it does on the host is allocation
and views.
Counted with the Triton launchers wrapped (count_launches) and torch.profiler for every torch op
outside them (on CUDA each of those would be a kernel too).
"""
import contextlib
import importlib
from collections import Counter, OrderedDict

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sparse_grad import SparseAdamW, ops
from sparse_grad.backends import triton_kernels

from _utils import assert_same, snapshot

# op: (module, launcher). "histogram" is the selection's memset.
LAUNCHERS = {"block_sqnorms": ("block_sqnorms", "launch_block_sqnorms"),
             "histogram": ("select_blocks", "new_histogram"),
             "select_blocks": ("select_blocks", "launch_select_blocks"),
             "sparse_adamw": ("sparse_adamw", "launch_sparse_adamw")}
# Host-side torch ops that launch nothing on a device: allocation and views.
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::view"}


def kernels_module(name):
    return importlib.import_module(f"{triton_kernels().__name__}.{name}")


@pytest.fixture
def launches(monkeypatch):
    """Counter of Triton launches by op; each runs inside a profiler range named "launch"."""
    counts = Counter()
    for op, (module, launcher) in LAUNCHERS.items():
        real = getattr(kernels_module(module), launcher)

        def counting(*args, _real=real, _op=op, **kwargs):
            counts[_op] += 1
            with record_function("launch"):
                return _real(*args, **kwargs)

        monkeypatch.setattr(kernels_module(module), launcher, counting)
    return counts


def torch_ops_outside_launches(fn) -> Counter:
    """The aten ops ``fn`` runs, except those inside a Triton launch (the interpreter's own)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def inside_launch(event):
        while event is not None:
            if event.name == "launch":
                return True
            event = event.cpu_parent
        return False

    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and not inside_launch(e))


def model(device, num_tensors, dtype=torch.float32, sizes=None):
    sizes = torch.randint(1, 200, (num_tensors,)).tolist() if sizes is None else sizes
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype, device=device)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("num_tensors", [3, 40])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_a_step_is_three_launches_whatever_the_tensor_count(triton_case, launches, num_tensors, scope):
    device, _ = triton_case
    opt = SparseAdamW(model(device, num_tensors), density=0.2, block_size=16, scope=scope, backend="triton")
    opt.step()  # creates the state (zeros_like per tensor, once)
    launches.clear()
    ops = torch_ops_outside_launches(opt.step)
    # The memset before the norm pass, which fills the selection's first histogram (scores "l2").
    assert launches == {"block_sqnorms": 1, "histogram": 1, "select_blocks": 1, "sparse_adamw": 1}
    assert set(ops) <= NO_KERNEL, ops


@pytest.mark.parametrize("options", [{"score": "rms"}, {"score_ema": 0.5}, {"min_blocks_per_tensor": 1}])
def test_a_selection_of_other_scores_makes_its_own_histograms(triton_case, launches, options):
    """Scores the norm pass does not store (rms, an EMA) or two selections (global minima): the
    memset runs inside the selection's launcher, still one per step."""
    device, _ = triton_case
    # 44 blocks of 16: a density of 0.2 takes 9, more than the 5 guaranteed, so the global minima
    # make two selections (with at most 5 to take, random sizes made it one on some runs)
    params = model(device, 5, sizes=[150, 199, 90, 37, 180])
    opt = SparseAdamW(params, density=0.2, block_size=16, backend="triton", **options)
    opt.step()
    launches.clear()
    opt.step()
    selections = 2 if "min_blocks_per_tensor" in options else 1
    assert launches == {"block_sqnorms": 1, "histogram": selections, "select_blocks": selections, "sparse_adamw": 1}


def test_each_further_dtype_adds_one_launch_per_op(triton_case, launches):
    device, _ = triton_case
    params = model(device, 6) + model(device, 5, torch.bfloat16)
    opt = SparseAdamW(params, density=0.2, block_size=16, backend="triton")
    opt.step()
    launches.clear()
    opt.step()
    assert launches == {"block_sqnorms": 2, "histogram": 1, "select_blocks": 1, "sparse_adamw": 2}


def test_between_reselections_and_at_density_one_a_step_is_one_launch(triton_case, launches):
    device, _ = triton_case
    for density, reselect_every in [(0.2, 3), (1.0, 1)]:
        opt = SparseAdamW(model(device, 25), density=density, block_size=16, reselect_every=reselect_every,
                          backend="triton")
        opt.step()
        launches.clear()
        ops = torch_ops_outside_launches(opt.step)
        assert launches == {"sparse_adamw": 1}
        assert set(ops) <= NO_KERNEL, ops


@contextlib.contextmanager
def empty_table_cache(monkeypatch):
    """Run with an empty cache of device tables, then put the previous one back."""
    tables = kernels_module("tables")
    saved = tables._cache
    monkeypatch.setattr(tables, "_cache", OrderedDict())
    try:
        yield
    finally:
        monkeypatch.setattr(tables, "_cache", saved)


def test_reallocated_grads_and_params_never_use_stale_tables(triton_case, monkeypatch):
    """One optimizer steps with the table cache, a twin with none; every step re-allocates the
    grads (zero_grad(set_to_none=True)), some keep the old ones alive (so the new ones get new
    addresses), and params are replaced mid-run: the two must stay bit-identical."""
    device, _ = triton_case
    cached, fresh = model(device, 12), None
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in cached]
    options = dict(density=0.3, block_size=16, scope="tensor", backend="triton")
    opt_cached, opt_fresh = SparseAdamW(cached, **options), SparseAdamW(fresh, **options)
    kept_alive = []
    for step in range(6):
        grads = [torch.randn_like(p) for p in cached]
        for opt, params in ((opt_cached, cached), (opt_fresh, fresh)):
            if step % 2:
                kept_alive.append([p.grad for p in params])
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g.clone()
        if step == 3:  # params change: new storage, same values
            for p in cached + fresh:
                p.data = p.data.clone()
        opt_cached.step()
        with empty_table_cache(monkeypatch):
            opt_fresh.step()
        assert_same([p.detach() for p in cached], [p.detach() for p in fresh])
        assert_same(snapshot(list(opt_cached.state.values())), snapshot(list(opt_fresh.state.values())))


def test_tables_are_uploaded_once_per_set_of_tensors(triton_case, monkeypatch):
    device, _ = triton_case
    tables = kernels_module("tables")
    params = model(device, 10)
    opt = SparseAdamW(params, density=0.2, block_size=16, backend="triton")
    opt.step()
    uploads, hyper = [], []
    real, real_hyper = tables._upload, ops._upload
    monkeypatch.setattr(tables, "_upload", lambda rows, dev: uploads.append(len(rows)) or real(rows, dev))
    monkeypatch.setattr(ops, "_upload", lambda values, dev: hyper.append(len(values)) or real_hyper(values, dev))
    opt.step()
    assert uploads == [] and hyper == []
    for group in opt.param_groups:  # a scheduler's new lr: only the 5 hyper-parameters travel
        group["lr"] *= 0.5
    opt.step()
    assert uploads == [] and hyper == [5]
    for p in params:
        p.grad = p.grad.clone()
    opt.step()
    # new grads: the norm pass's pointer table and the update's pointer tables
    assert uploads == [2, 6] and hyper == [5]
