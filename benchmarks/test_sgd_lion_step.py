"""A full SparseSGD / SparseLion step per backend and density against its dense torch
counterpart, in one run: torch.optim.SGD (momentum 0.9; foreach and fused) and, torch having no
Lion, Lion written with torch's foreach ops (lion-pytorch's arithmetic, one op per line).

Ideal bytes (fp32, docs/design.md §3.7): 4 B/param for the norm pass (skipped at density 1) +
20 B/param·density for the update (read param, grad and the one state; write param and state).
"""
from __future__ import annotations

import pytest
import torch

from sparse_grad import SparseLion, SparseSGD, backends
from _cases import TIMED_BACKENDS, assert_close, params_of, skip_unless_timed
from _report import record

DENSITIES = [1.0, 0.2, 0.05, 0.01]
LR, MOMENTUM, BETAS, WEIGHT_DECAY = 1e-3, 0.9, (0.9, 0.99), 0.01


def ideal_bytes(num_params: int, density: float) -> float:
    return (0 if density == 1.0 else 4 * num_params) + 20 * num_params * density


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_torch_sgd(benchmark, timed, device, shape_set, shape_list, variant):
    params = params_of(shape_list, device)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **{variant: True})
    opt.step()  # create the momentum buffers outside the timing
    timed(opt.step)
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
    n = sum(p.numel() for p in params)
    record(benchmark, f"torch SGD {variant}", shape_set, n, 20 * n)


def foreach_lion(params, exp_avgs):
    """One dense Lion step over all params with torch's foreach ops."""
    grads = [p.grad for p in params]
    torch._foreach_mul_(params, 1 - LR * WEIGHT_DECAY)
    update = torch._foreach_mul(exp_avgs, BETAS[0])
    torch._foreach_add_(update, grads, alpha=1 - BETAS[0])
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-LR)
    torch._foreach_mul_(exp_avgs, BETAS[1])
    torch._foreach_add_(exp_avgs, grads, alpha=1 - BETAS[1])


def test_torch_foreach_lion(benchmark, timed, device, quick, shape_set, shape_list):
    params = params_of(shape_list, device)
    exp_avgs = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        timed(lambda: foreach_lion(params, exp_avgs))
    if quick:  # one step from zero moments: SparseLion at density 1 takes the same one
        reference = params_of(shape_list, device)
        SparseLion(reference, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, density=1.0,
                   backend="reference").step()
        assert_close([p.detach() for p in params], [p.detach() for p in reference])
    n = sum(p.numel() for p in params)
    record(benchmark, "torch Lion foreach", shape_set, n, 20 * n)


@pytest.mark.parametrize("kind", ["SparseSGD", "SparseLion"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_sparse_sgd_lion(benchmark, timed, step_extras, device, quick, shape_set, shape_list, backend, density,
                         kind):
    skip_unless_timed(backend, device)
    cls, options = ((SparseSGD, dict(lr=LR, momentum=MOMENTUM)) if kind == "SparseSGD"
                    else (SparseLion, dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)))
    options.update(density=density, block_size=4096)
    params = params_of(shape_list, device)
    opt = cls(params, backend=backend, **options)
    opt.step()
    timed(opt.step)
    if quick:  # two steps, as the reference takes them
        reference = params_of(shape_list, device)
        opt_ref = cls(reference, backend="reference", **options)
        opt_ref.step()
        opt_ref.step()
        assert_close([p.detach() for p in params], [p.detach() for p in reference])
    n = sum(p.numel() for p in params)
    record(benchmark, f"{kind} {backend} d={density:g}", shape_set, n, ideal_bytes(n, density),
           extras=step_extras(opt, backends.get(backend)))
