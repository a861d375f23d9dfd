"""The ``sparse_grad`` op schemas, in one place: one ``torch.library`` custom op per op with its
fake impl, and the schemas of the native kernels (docs/design.md §1).

Each op takes a concrete ``backend`` name (``sparse_grad.ops`` resolves ``"auto"``) and forwards
to that backend. The fake impls give output shapes and dtypes, so the ops trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. Hyper-parameters travel as
one fp64 table on the params' device (:func:`sparse_grad.ops.hyper_table`; AdamW
``[lr, beta1, beta2, eps, weight_decay]``, SGD ``[lr, momentum, dampening, weight_decay]``, Lion
``[lr, beta1, beta2, weight_decay]``): one signature whether they are floats or tensors.
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
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    backend: str,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    compact_grads: bool = False,
) -> None:
    backends.get(backend).sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids,
                                            hyper, block_size, maximize, grad_coef, found_inf, compact,
                                            compact_grads=compact_grads)


@sparse_adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size, maximize, backend,
      grad_coef=None, found_inf=None, compact=False, compact_grads=False):
    return None


@torch.library.custom_op(
    "sparse_grad::sparse_sgd_step",
    mutates_args=("params", "momentum_buffers", "block_steps"),
)
def sparse_sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    block_steps: list[torch.Tensor],
    block_ids: torch.Tensor,
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    nesterov: bool,
    backend: str,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
) -> None:
    backends.get(backend).sparse_sgd_step(params, grads, momentum_buffers, block_steps, block_ids, hyper,
                                          block_size, maximize, nesterov, grad_coef, found_inf, compact)


@sparse_sgd_step.register_fake
def _(params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size, maximize, nesterov, backend,
      grad_coef=None, found_inf=None, compact=False):
    return None


@torch.library.custom_op(
    "sparse_grad::sparse_lion_step",
    mutates_args=("params", "exp_avgs", "block_steps"),
)
def sparse_lion_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    block_steps: list[torch.Tensor],
    block_ids: torch.Tensor,
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    backend: str,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
) -> None:
    backends.get(backend).sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size,
                                           maximize, grad_coef, found_inf, compact)


@sparse_lion_step.register_fake
def _(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize, backend,
      grad_coef=None, found_inf=None, compact=False):
    return None


# Native kernels (csrc/): one schema per kernel, implemented in C++ for the CPU dispatch key
# (csrc/cpu) and the CUDA key (csrc/cuda/binding.cpp). The "cpp" and "cuda" backends call them;
# the dispatcher picks the kernel by the tensors' device.
_native = torch.library.Library("sparse_grad", "FRAGMENT")
_native.define("native_block_sqnorms(Tensor[] tensors, int block_size) -> Tensor")
_native.define("native_select_blocks(Tensor scores, int[] segment_sizes, int[] segment_ks) -> Tensor")
_native.define(
    "native_sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] block_steps, Tensor block_ids, Tensor hyper, int block_size, "
    "bool maximize, Tensor? grad_coef=None, Tensor? found_inf=None, bool compact=False, "
    "bool compact_grads=False) -> ()")
_native.define(
    "native_sparse_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "Tensor(c!)[] block_steps, Tensor block_ids, Tensor hyper, int block_size, bool maximize, bool nesterov, "
    "Tensor? grad_coef=None, Tensor? found_inf=None, bool compact=False) -> ()")
_native.define(
    "native_sparse_lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] block_steps, Tensor block_ids, Tensor hyper, int block_size, bool maximize, "
    "Tensor? grad_coef=None, Tensor? found_inf=None, bool compact=False) -> ()")


@torch.library.register_fake("sparse_grad::native_block_sqnorms")
def _(tensors, block_size):
    num_blocks = sum(num_blocks_of(t.numel(), block_size) for t in tensors)
    return tensors[0].new_empty(num_blocks, dtype=torch.float32)


@torch.library.register_fake("sparse_grad::native_select_blocks")
def _(scores, segment_sizes, segment_ks):
    return scores.new_empty(sum(segment_ks), dtype=torch.int64)


@torch.library.register_fake("sparse_grad::native_sparse_adamw_step")
def _(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper, block_size, maximize,
      grad_coef=None, found_inf=None, compact=False, compact_grads=False):
    return None


@torch.library.register_fake("sparse_grad::native_sparse_sgd_step")
def _(params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size, maximize, nesterov,
      grad_coef=None, found_inf=None, compact=False):
    return None


@torch.library.register_fake("sparse_grad::native_sparse_lion_step")
def _(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize,
      grad_coef=None, found_inf=None, compact=False):
    return None
