"""Native backends: the kernels of the extension ``sparse_grad._C`` (csrc/).

``"cpp"`` (csrc/cpu: vectorized loops, OpenMP across blocks) and ``"cuda"`` (csrc/cuda) share
the op schemas ``sparse_grad::native_block_sqnorms`` and ``native_sparse_{adamw,sgd,lion}_step``
(sparse_grad/library.py), implemented in C++ for the CPU and CUDA dispatch keys: the dispatcher
picks the kernel by the tensors' device. Selection on CPU is ``sparse_grad::native_select_blocks``
(a partial selection of unique rank keys, O(n)). On CUDA it is the Triton backend's multi-program
radix select (triton_kernels/select_blocks.py: 6 launches, no program reads more than 8,192
scores), which every CUDA build of torch can run; only where Triton is missing does it fall back to
``torch.topk`` on the same keys (sparse_grad/backends/topk_select.py, one program per top-k and
three sorts). Both give the reference selection exactly.
"""
from __future__ import annotations

import functools
import importlib

import torch

from . import topk_select, triton_kernels, triton_unavailable_reason

__all__ = ["block_sqnorms", "select_blocks", "sparse_adamw_step", "sparse_lion_step", "sparse_sgd_step",
           "unavailable_reason", "cpu_isa"]

# Backend name -> (device type it runs on, dispatch key of its kernels).
DEVICES = {"cpp": ("cpu", "CPU"), "cuda": ("cuda", "CUDA")}


# The answer of _extension_reason per backend, found once. torch.compile can read a dict but not
# trace an import or a dispatcher query: SparseAdamW asks eagerly when a param group is added.
_REASONS: dict[str, str | None] = {}


@functools.cache
def _load_error() -> str | None:
    """Import sparse_grad._C (which registers the kernels); why it failed, or None."""
    try:
        importlib.import_module("sparse_grad._C")
    except ImportError as err:
        return (f"the extension sparse_grad._C is not available ({err}); reinstall sparse_grad "
                "with a C++ compiler and torch present (see the README's install command)")
    return None


@functools.cache
def extension_function(name: str):
    """The host helper ``sparse_grad._C.<name>`` where the extension loads (and has it), else
    None: the caller then does the same work in Python."""
    if _load_error() is not None:
        return None
    return getattr(importlib.import_module("sparse_grad._C"), name, None)


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why the native backend ``backend`` ("cpp" or "cuda") cannot run on ``device``, or None."""
    device_type, dispatch_key = DEVICES[backend]
    if device.type != device_type:
        return f"backend={backend!r} runs on {device_type} tensors, not {device.type}"
    if backend not in _REASONS:
        _REASONS[backend] = _extension_reason(dispatch_key)
    return _REASONS[backend]



def _extension_reason(dispatch_key: str) -> str | None:
    error = _load_error()
    if error is not None:
        return error
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparse_grad::native_block_sqnorms", dispatch_key):
        return (f"sparse_grad._C was built without {dispatch_key} kernels (CUDA kernels are built "
                "only when torch has CUDA and nvcc is found at install time)")
    return None


def cpu_isa() -> str:
    """The instruction set the CPU loops run with: "avx512", "avx2" or "default"."""
    error = _load_error()
    if error is not None:
        raise RuntimeError(error)
    return importlib.import_module("sparse_grad._C").cpu_isa()


def block_sqnorms(tensors, block_size, cache=None):
    return torch.ops.sparse_grad.native_block_sqnorms(tensors, block_size)


# Whether CUDA selection runs on Triton, found once (see _REASONS on why not functools.cache).
_GPU_SELECT: dict[str, bool] = {}


def cuda_select_uses_triton() -> bool:
    """Whether the cuda backend selects with Triton's multi-program radix select (else torch.topk)."""
    if "triton" not in _GPU_SELECT:
        _GPU_SELECT["triton"] = triton_unavailable_reason(torch.device("cuda")) is None
    return _GPU_SELECT["triton"]


def select_blocks(scores, segment_sizes, segment_ks, cache=None):
    if scores.device.type == "cpu":
        return torch.ops.sparse_grad.native_select_blocks(scores, list(segment_sizes), list(segment_ks))
    if cuda_select_uses_triton():
        return triton_kernels().select_blocks(scores, segment_sizes, segment_ks, cache)
    return topk_select.select_blocks(scores, segment_sizes, segment_ks)


def sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size,
                      maximize, grad_coef=None, found_inf=None, compact=False, cache=None, compact_grads=False):
    torch.ops.sparse_grad.native_sparse_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size, maximize,
        grad_coef, found_inf, compact, compact_grads)


def sparse_sgd_step(params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size, maximize, nesterov,
                    grad_coef=None, found_inf=None, compact=False, cache=None):
    torch.ops.sparse_grad.native_sparse_sgd_step(
        params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size, maximize, nesterov,
        grad_coef, found_inf, compact)


def sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize,
                     grad_coef=None, found_inf=None, compact=False, cache=None):
    torch.ops.sparse_grad.native_sparse_lion_step(
        params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize, grad_coef, found_inf, compact)
