"""A full optimizer step: torch AdamW (foreach, fused) vs SparseAdamW.step per backend and
density, with a plain copy of all parameters (8 B/param) as the bandwidth baseline. Ideal bytes
per docs/design.md §7 (sparse_grad.bench.ideal_bytes): 4 B/param for the norm pass + 28 B/param·density.
The optimizer steps also record their pipelined time, host time and Python calls per step
(conftest.step_extras), after the checks: they take more steps."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import SparseAdamW, backends
from sparse_grad.bench import ideal_bytes
from _cases import TIMED_BACKENDS, assert_close, params_of, skip_unless_timed
from _report import record

DENSITIES = [1.0, 0.2, 0.05, 0.01]


def test_copy(benchmark, timed, device, shape_set, shape_list):
    src = torch.cat([p.detach().reshape(-1) for p in params_of(shape_list, device)])
    dst = torch.empty_like(src)
    timed(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    record(benchmark, "copy", shape_set, src.numel(), 8 * src.numel())


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_torch_adamw(benchmark, timed, step_extras, device, shape_set, shape_list, variant):
    params = params_of(shape_list, device)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, **{variant: True})
    opt.step()  # create the state outside the timing
    timed(opt.step)
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
    n = sum(p.numel() for p in params)
    record(benchmark, f"torch AdamW {variant}", shape_set, n, 28 * n, extras=step_extras(opt))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_sparse_adamw(benchmark, timed, step_extras, device, quick, shape_set, shape_list, backend, density):
    skip_unless_timed(backend, device)
    params = params_of(shape_list, device)
    options = dict(lr=1e-3, density=density, block_size=4096)
    opt = SparseAdamW(params, backend=backend, **options)
    opt.step()
    timed(opt.step)
    if quick:  # two steps, as the reference takes them
        reference = params_of(shape_list, device)
        opt_ref = SparseAdamW(reference, backend="reference", **options)
        opt_ref.step()
        opt_ref.step()
        assert_close([p.detach() for p in params], [p.detach() for p in reference])
    n = sum(p.numel() for p in params)
    record(benchmark, f"SparseAdamW {backend} d={density:g}", shape_set, n, ideal_bytes(n, density),
           extras=step_extras(opt, backends.get(backend)))
