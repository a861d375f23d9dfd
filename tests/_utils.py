"""Shared test helpers: which backends run here, tolerances, data makers, snapshots."""
from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import torch

from sparse_grad import backends

# (atol, rtol) per parameter dtype, used wherever results are compared across implementations.
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def backend_cases() -> list[tuple[str, str]]:
    """(device, backend) for every backend that can run here (the Triton one on CPU only when
    interpreted)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(device, backend) for device in devices for backend in backends.BACKENDS[1:]
            if backends.unavailable_reason(backend, torch.device(device)) is None]


def heavy_tailed(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random data whose scale varies over orders of magnitude, like real gradients."""
    # Drawn on the device itself: a host-to-device copy would wait for the device, which the
    # CUDA tests that forbid host syncs would flag.
    x = torch.randn(shape, dtype=torch.float64, device=device)
    scale = torch.exp(torch.randn(shape, dtype=torch.float64, device=device) * 1.5)
    return (x * scale).to(dtype=dtype)


def snapshot(obj):
    """A deep copy of tensors (or nested containers of them), to compare before/after."""
    return copy.deepcopy(obj)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b):
    """Bit-for-bit equality of (nested containers of) tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bytes(a), _bytes(b)), "tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def count_launches(monkeypatch, module: str, launcher: str) -> list:
    """Record the calls of a Triton launcher (e.g. ``"block_sqnorms", "launch_block_sqnorms"``)."""
    kernels = importlib.import_module(f"{backends.triton_kernels().__name__}.{module}")
    real = getattr(kernels, launcher)
    calls = []

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, launcher, counting)
    return calls


def assert_script_prints_ok(script: str, cwd=None) -> None:
    """Run ``script`` in a fresh interpreter, so that a wrong address crashes it and not the
    test session, and check that it printed ``ok``."""
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def assert_step_frees_grads(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 3) -> None:
    """The step holds no grad past its end: after ``zero_grad(set_to_none=True)`` every grad of
    ``model`` is freed (weak references die), so its memory goes back to the allocator."""
    import gc
    import weakref

    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad()
        gc.collect()
        assert all(g() is None for g in grads), "a grad outlived zero_grad(set_to_none=True)"
