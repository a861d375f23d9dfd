"""What the benchmark modules share: which backends are timed, the data, the checks of --quick."""
from __future__ import annotations

import pytest
import torch

from sparse_grad import backends
from sparse_grad.bench import make_params

TIMED_BACKENDS = ["reference", "triton", "cpp", "cuda"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (atol, rtol) of a backend's output against the reference's, per dtype.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


def skip_unless_timed(backend: str, device: torch.device) -> None:
    if backend == "triton" and device.type != "cuda":
        pytest.skip("the triton backend is timed on CUDA only (the CPU interpreter is for tests)")
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)


def params_of(shape_list, device, dtype=torch.float32) -> list[torch.nn.Parameter]:
    """Params and grads of ``dtype`` (fp32 data rounded: the same values whatever the dtype)."""
    params = make_params(shape_list, device)
    if dtype != torch.float32:
        for p in params:
            p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
    return params


def assert_close(actual, expected, dtype=torch.float32) -> None:
    atol, rtol = TOLERANCES[dtype]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float().cpu(), e.float().cpu(), atol=atol, rtol=rtol)
