"""The ``sparse_grad`` op schemas: one ``torch.library`` custom op per op, with its fake impl.

Each op takes a concrete ``backend`` name (``sparse_grad.ops`` resolves ``"auto"``) and forwards
to that backend. The fake impls give output shapes and dtypes, so the ops trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

import torch

from . import backends
from .layout import num_blocks_of


@torch.library.custom_op("sparse_grad::block_sqnorms", mutates_args=())
def block_sqnorms(tensors: list[torch.Tensor], block_size: int, backend: str) -> torch.Tensor:
    return backends.get(backend).block_sqnorms(tensors, block_size)


@block_sqnorms.register_fake
def _(tensors, block_size, backend):
    num_blocks = sum(num_blocks_of(t.numel(), block_size) for t in tensors)
    return tensors[0].new_empty(num_blocks, dtype=torch.float32)


@torch.library.custom_op("sparse_grad::select_blocks", mutates_args=())
def select_blocks(scores: torch.Tensor, segment_sizes: list[int], segment_ks: list[int],
                  backend: str) -> torch.Tensor:
    return backends.get(backend).select_blocks(scores, segment_sizes, segment_ks)


@select_blocks.register_fake
def _(scores, segment_sizes, segment_ks, backend):
    return scores.new_empty(sum(segment_ks), dtype=torch.int64)


@torch.library.custom_op(
    "sparse_grad::sparse_adamw_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "block_steps"),
)
def sparse_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    block_steps: list[torch.Tensor],
    block_ids: torch.Tensor,
    block_size: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    backend: str,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    hyper: torch.Tensor | None = None,
) -> None:
    backends.get(backend).sparse_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids,
        block_size, lr, beta1, beta2, eps, weight_decay, maximize, grad_coef, found_inf, compact, hyper)


@sparse_adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, block_size, lr, beta1,
      beta2, eps, weight_decay, maximize, backend, grad_coef=None, found_inf=None, compact=False, hyper=None):
    return None


def step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, block_size, lr, beta1, beta2,
         eps, weight_decay, maximize, backend, grad_coef=None, found_inf=None, compact=False,
         hyper=None) -> None:
    """Run :func:`sparse_adamw_step`: traced as the op under torch.compile, the backend directly
    in eager mode.

    ``torch.library.custom_op`` handles a mutating op in Python on every call (defaults, alias
    checks, one version bump per mutated tensor): about 0.9 ms per call for 194 tensors on the
    2-core CPU of benchmarks/RESULTS.md, several percent of a 50M-parameter step. In eager mode
    the backend runs directly and the mutated tensors' versions are bumped in one call, as the
    op would (autograd then still sees the in-place change).
    """
    args = (params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, block_size, lr, beta1,
            beta2, eps, weight_decay, maximize)
    if torch.compiler.is_compiling():
        sparse_adamw_step(*args, backend, grad_coef, found_inf, compact, hyper)
        return
    backends.get(backend).sparse_adamw_step(*args, grad_coef, found_inf, compact, hyper)
    torch._C._increment_version([*params, *exp_avgs, *exp_avg_sqs, *block_steps])


def hyper_table(values: list, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """The ``lr, beta1, beta2, eps, weight_decay`` arguments of :func:`sparse_adamw_step`: floats
    and no table, or, if any value is a tensor, placeholder floats and the fp64 device table
    ``hyper`` built on device (reading a tensor on the host would sync; a float that changes would
    recompile a compiled caller)."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values], None
    # The float entries travel in one pinned, non-blocking copy: a plain host-to-device copy
    # waits for the device (torch.cuda.set_sync_debug_mode flags it).
    host = torch.tensor([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values], dtype=torch.float64)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        table = host.pin_memory().to(device, non_blocking=True)
    else:  # a compiled step places the constants itself (and fake tensors cannot be pinned)
        table = host.to(device)
    parts = [v.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
             if isinstance(v, torch.Tensor) else table[i] for i, v in enumerate(values)]
    return [0.0] * len(values), torch.stack(parts)  # the op ignores the floats when given the table


# Native kernels (csrc/): one schema per kernel, defined here and implemented in C++ for the CPU
# dispatch key (csrc/cpu) and the CUDA key (csrc/cuda/binding.cpp). The "cpp" and "cuda"
# backends call them; the dispatcher picks the kernel by the tensors' device.
_native = torch.library.Library("sparse_grad", "FRAGMENT")
_native.define("native_block_sqnorms(Tensor[] tensors, int block_size) -> Tensor")
_native.define("native_select_blocks(Tensor scores, int[] segment_sizes, int[] segment_ks) -> Tensor")
_native.define(
    "native_sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] block_steps, Tensor block_ids, int block_size, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize, "
    "Tensor? grad_coef=None, Tensor? found_inf=None, bool compact=False, Tensor? hyper=None) -> ()")


@torch.library.register_fake("sparse_grad::native_block_sqnorms")
def _(tensors, block_size):
    num_blocks = sum(num_blocks_of(t.numel(), block_size) for t in tensors)
    return tensors[0].new_empty(num_blocks, dtype=torch.float32)


@torch.library.register_fake("sparse_grad::native_select_blocks")
def _(scores, segment_sizes, segment_ks):
    return scores.new_empty(sum(segment_ks), dtype=torch.int64)


@torch.library.register_fake("sparse_grad::native_sparse_adamw_step")
def _(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, block_size, lr, beta1,
      beta2, eps, weight_decay, maximize, grad_coef=None, found_inf=None, compact=False, hyper=None):
    return None
