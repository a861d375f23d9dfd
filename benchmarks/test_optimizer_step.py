"""Time one optimizer step: torch AdamW (foreach, fused) vs SparseAdamW per backend and density,
with a plain copy of the same bytes as the bandwidth baseline, and the norm pass alone against a
plain read (torch.sum). Ideal bytes per DESIGN §7: 4 B/param for the norm pass + 28 B/param x
density for the fp32 AdamW update. Shape sets: benchmarks/shapes.py."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import SparseAdamW, backends, ops
from _report import record
from shapes import SHAPE_SETS

DENSITIES = [1.0, 0.2, 0.05, 0.01]
TIMED_BACKENDS = ["reference", "triton", "cpp", "cuda"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=list(SHAPE_SETS))
def model(request, device, scale):
    """(shape set name, fp32 params with fp32 grads of per-tensor scales)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in SHAPE_SETS[request.param](scale)]
    for p in params:
        p.grad = torch.randn_like(p) * torch.rand(()).item()
    return request.param, params


def skip_unless_timed(backend, device):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("the triton backend is timed on CUDA only (the CPU interpreter is for tests)")
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)


def timed(benchmark, device, fn):
    def run():
        fn()
        sync(device)
    return benchmark.pedantic(run, rounds=7, warmup_rounds=2, iterations=1)


def test_copy(benchmark, device, model):
    group, params = model
    src = torch.cat([p.detach().reshape(-1) for p in params])
    dst = torch.empty_like(src)
    timed(benchmark, device, lambda: dst.copy_(src))
    record(benchmark, "copy", group, src.numel(), 8 * src.numel())


def test_read(benchmark, device, model):
    group, params = model
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    timed(benchmark, device, lambda: torch.sum(flat))
    record(benchmark, "read", group, flat.numel(), 4 * flat.numel(), baseline="read")


@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_block_sqnorms(benchmark, device, model, backend):
    skip_unless_timed(backend, device)
    group, params = model
    grads = [p.grad for p in params]
    timed(benchmark, device, lambda: ops.block_sqnorms(grads, 4096, backend=backend))
    n = sum(p.numel() for p in params)
    record(benchmark, f"block_sqnorms {backend}", group, n, 4 * n, baseline="read")


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_torch_adamw(benchmark, device, model, variant):
    group, params = model
    opt = torch.optim.AdamW(params, lr=1e-5, **{variant: True})
    opt.step()  # create the state outside the timing
    timed(benchmark, device, opt.step)
    n = sum(p.numel() for p in params)
    record(benchmark, f"torch AdamW {variant}", group, n, 28 * n)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", TIMED_BACKENDS)
def test_sparse_adamw(benchmark, device, model, backend, density):
    skip_unless_timed(backend, device)
    group, params = model
    opt = SparseAdamW(params, lr=1e-5, density=density, block_size=4096, backend=backend)
    opt.step()
    timed(benchmark, device, opt.step)
    n = sum(p.numel() for p in params)
    norm_pass = 0 if density == 1.0 else 4 * n
    record(benchmark, f"SparseAdamW {backend} d={density:g}", group, n, norm_pass + 28 * n * density)
