"""sparse_grad.sparsify: the wrapped SGD (momentum) and Adam steps against their dense torch
counterparts, and sparsify(AdamW) against SparseAdamW's fused kernels, in one run.

What the sparsify path costs over the fused kernels (docs/design.md §10): the same norm pass and
selection, then per step a host read of the selected blocks' step counts, a gather of the
selected blocks of params, grads and state into compact buffers, torch's functional update on
them and a scatter back, one functional call per cohort of blocks with equal step counts. The
``random`` case reselects random blocks every step, so step counts spread and cohorts multiply:
the worst case for that last factor. Ideal bytes as in test_optimizer_step: 4 B/param for the
norm pass + the update's bytes × density (SGD with momentum 16 B/param, Adam 28).
"""
from __future__ import annotations

import pytest
import torch

import sparse_grad
from sparse_grad import SparseAdamW, backends
from sparse_grad.bench import ideal_bytes
from _cases import assert_close, params_of, skip_unless_timed
from _report import record

DENSITIES = [1.0, 0.05, 0.01]
# (name, class, options, update bytes per param: the fp32 reads and writes of a dense step)
OPTIMIZERS = [("SGD", torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}, 16),
              ("Adam", torch.optim.Adam, {"lr": 1e-3}, 28),
              ("AdamW", torch.optim.AdamW, {"lr": 1e-3}, 28)]
IDS = [name for name, *_ in OPTIMIZERS]


def _bytes(n: int, density: float, update: int) -> float:
    return (0 if density == 1.0 else 4 * n) + update * n * density


@pytest.mark.parametrize("name,cls,options,update", OPTIMIZERS, ids=IDS)
def test_torch_dense(benchmark, timed, step_extras, device, shape_set, shape_list, name, cls, options, update):
    params = params_of(shape_list, device)
    opt = cls(params, **options)  # torch's default implementation for the device (CPU: per tensor)
    opt.step()  # create the state outside the timing
    timed(opt.step)
    n = sum(p.numel() for p in params)
    record(benchmark, f"torch {name}", shape_set, n, update * n, extras=step_extras(opt))


# Random selection at one density: the spread of step counts (cohorts) is what it adds.
SELECTIONS = [(density, "norm") for density in DENSITIES] + [(0.05, "random")]


@pytest.mark.parametrize("density,selection", SELECTIONS)
@pytest.mark.parametrize("name,cls,options,update", OPTIMIZERS, ids=IDS)
def test_sparsify(benchmark, timed, step_extras, device, quick, shape_set, shape_list, name, cls, options, update,
                  density, selection):
    backend = backends.resolve("auto", device)
    params = params_of(shape_list, device)
    sparse = dict(density=density, block_size=4096, selection=selection)
    opt = sparse_grad.sparsify(cls(params, **options), backend=backend, **sparse)
    opt.step()
    timed(opt.step)
    if quick:  # two steps, as the reference backend takes them (the same selection, so equal)
        reference = params_of(shape_list, device)
        opt_ref = sparse_grad.sparsify(cls(reference, **options), backend="reference", **sparse)
        opt_ref.step()
        opt_ref.step()
        assert_close([p.detach() for p in params], [p.detach() for p in reference])
    n = sum(p.numel() for p in params)
    suffix = "" if selection == "norm" else " random"
    record(benchmark, f"sparsify({name}) d={density:g}{suffix}", shape_set, n, _bytes(n, density, update),
           extras=step_extras(opt))


@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_adamw_fused(benchmark, timed, step_extras, device, shape_set, shape_list, density):
    """SparseAdamW's fused kernels on the same params: what sparsify(AdamW) is compared with."""
    backend = backends.resolve("auto", device)
    skip_unless_timed(backend, device)
    params = params_of(shape_list, device)
    opt = SparseAdamW(params, lr=1e-3, density=density, block_size=4096, backend=backend)
    opt.step()
    timed(opt.step)
    n = sum(p.numel() for p in params)
    record(benchmark, f"SparseAdamW {backend} d={density:g}", shape_set, n, ideal_bytes(n, density),
           extras=step_extras(opt, backends.get(backend)))
