"""Time one optimizer step: torch AdamW (foreach, fused) vs SparseAdamW per backend and density,
with a plain copy of the same bytes as the bandwidth baseline. Ideal bytes per DESIGN §7:
4 B/param for the norm pass + 28 B/param x density for the fp32 AdamW update."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import SparseAdamW, backends
from _report import record
from shapes import llm_shapes

DENSITIES = [1.0, 0.2, 0.05, 0.01]
GROUP = "llm"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def model(device, scale):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in llm_shapes(scale)]
    for p in params:
        p.grad = torch.randn_like(p) * torch.rand(()).item()  # heavy-ish: per-tensor scales
    return params


def timed(benchmark, device, fn):
    def run():
        fn()
        sync(device)
    return benchmark.pedantic(run, rounds=7, warmup_rounds=2, iterations=1)


def test_copy(benchmark, device, model):
    src = torch.cat([p.detach().reshape(-1) for p in model])
    dst = torch.empty_like(src)
    timed(benchmark, device, lambda: dst.copy_(src))
    n = src.numel()
    record(benchmark, "copy", GROUP, n, 8 * n)


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_torch_adamw(benchmark, device, model, variant):
    opt = torch.optim.AdamW(model, lr=1e-5, **{variant: True})
    opt.step()  # create the state outside the timing
    timed(benchmark, device, opt.step)
    n = sum(p.numel() for p in model)
    record(benchmark, f"torch AdamW {variant}", GROUP, n, 28 * n)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_adamw(benchmark, device, model, backend, density):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("the triton backend is timed on CUDA only (the CPU interpreter is for tests)")
    if backend == "triton" and backends.triton_unavailable_reason(device) is not None:
        pytest.skip(backends.triton_unavailable_reason(device))
    opt = SparseAdamW(model, lr=1e-5, density=density, block_size=4096, backend=backend)
    opt.step()
    timed(benchmark, device, opt.step)
    n = sum(p.numel() for p in model)
    norm_pass = 0 if density == 1.0 else 4 * n
    record(benchmark, f"SparseAdamW {backend} d={density:g}", GROUP, n, norm_pass + 28 * n * density)
