"""``sparse_grad.ops.unchecked``: the ops for callers that have checked their arguments already.

The checked functions of :mod:`sparse_grad.ops` re-check every tensor on every call (shapes,
dtypes, devices, contiguity); an optimizer whose param group was checked once and has not
changed since (docs/design.md §9) calls these instead. Arguments must be exactly what the
checked functions would pass on: concrete backend names, a hyper-parameter table from
:func:`sparse_grad.ops.hyper_table`, contiguous tensors on one device. Nothing here checks.

Under ``torch.compile`` each call is the ``torch.library`` custom op (traced through its fake
impl); in eager mode it is the backend's kernel called directly: ``custom_op`` handles a
mutating op in Python on every call (defaults, alias checks, one version bump per mutated
tensor), about 0.9 ms for 194 tensors on a 2-core CPU. Here the mutated tensors' versions are
bumped in one call, as the op would (autograd still sees the in-place change): the extension's
``bump_versions`` where it is built (about 8 ns a tensor against ``torch._C._increment_version``'s
100, which converts the list to C++ tensors first), else torch's.

``cache``: a dict the caller keeps for as long as the tensors it passes stay the same tensors
at the same addresses; a backend may keep what it derived from them there (the Triton
backend's device pointer tables), so a repeated call does no per-tensor work on the host.
"""
from __future__ import annotations

import torch

from . import backends, library
from .backends import native

__all__ = ["block_sqnorms", "select_blocks", "sparse_adamw_step", "sparse_lion_step", "sparse_sgd_step"]


def bump_versions(tensors: list[torch.Tensor]) -> None:
    """Tell autograd that a kernel wrote ``tensors`` in place (inference tensors are skipped)."""
    (native.extension_function("bump_versions") or torch._C._increment_version)(tensors)


def block_sqnorms(tensors: list[torch.Tensor], block_size: int, backend: str,
                  cache: dict | None = None, first_pass=None) -> torch.Tensor:
    """``first_pass``: see :func:`first_pass` (eager Triton only)."""
    if first_pass is not None:
        return backends.get(backend).block_sqnorms(tensors, block_size, cache, first_pass)
    if torch.compiler.is_compiling():
        return library.block_sqnorms(tensors, block_size, backend)
    return backends.get(backend).block_sqnorms(tensors, block_size, cache)


def select_blocks(scores: torch.Tensor, segment_sizes: list[int], segment_ks: list[int], backend: str,
                  cache: dict | None = None, first_pass=None) -> torch.Tensor:
    if first_pass is not None:
        return backends.get(backend).select_blocks(scores, segment_sizes, segment_ks, cache, first_pass=first_pass)
    if torch.compiler.is_compiling():
        return library.select_blocks(scores, segment_sizes, segment_ks, backend)
    return backends.get(backend).select_blocks(scores, segment_sizes, segment_ks, cache)


def first_pass(backend: str, num_segments: int, per_tensor: bool, device: torch.device):
    """Zeroed selection histograms for the Triton backend's norm pass to fill with the first
    digit of each block's rank key, so that the selection of exactly those sums skips its first
    pass (``triton_kernels.FirstPass``); ``None`` where that does not apply: another backend,
    or under ``torch.compile`` (the library ops take no histogram)."""
    if backend != "triton" or torch.compiler.is_compiling():
        return None
    return backends.get(backend).FirstPass.new(num_segments, per_tensor, device)


def sparse_adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], block_steps: list[torch.Tensor], block_ids: torch.Tensor,
                      hyper: torch.Tensor, block_size: int, maximize: bool, backend: str,
                      grad_coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                      compact: bool = False, cache: dict | None = None, mutated: list | None = None,
                      compact_grads: bool = False) -> None:
    """``mutated``: the list ``[*params, *exp_avgs, *exp_avg_sqs, *block_steps]`` if the caller
    keeps one (built here otherwise)."""
    if torch.compiler.is_compiling():
        library.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper,
                                  block_size, maximize, backend, grad_coef, found_inf, compact, compact_grads)
        return
    backends.get(backend).sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper,
                                            block_size, maximize, grad_coef, found_inf, compact, cache,
                                            compact_grads=compact_grads)
    bump_versions(mutated if mutated is not None else [*params, *exp_avgs, *exp_avg_sqs, *block_steps])


def sparse_sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                    block_steps: list[torch.Tensor], block_ids: torch.Tensor, hyper: torch.Tensor, block_size: int,
                    maximize: bool, nesterov: bool, backend: str, grad_coef: torch.Tensor | None = None,
                    found_inf: torch.Tensor | None = None, compact: bool = False, cache: dict | None = None,
                    mutated: list | None = None) -> None:
    """``mutated``: ``[*params, *momentum_buffers, *block_steps]`` if the caller keeps one."""
    if torch.compiler.is_compiling():
        library.sparse_sgd_step(params, grads, momentum_buffers, block_steps, block_ids, hyper, block_size,
                                maximize, nesterov, backend, grad_coef, found_inf, compact)
        return
    backends.get(backend).sparse_sgd_step(params, grads, momentum_buffers, block_steps, block_ids, hyper,
                                          block_size, maximize, nesterov, grad_coef, found_inf, compact, cache)
    bump_versions(mutated if mutated is not None else [*params, *momentum_buffers, *block_steps])


def sparse_lion_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                     block_steps: list[torch.Tensor], block_ids: torch.Tensor, hyper: torch.Tensor, block_size: int,
                     maximize: bool, backend: str, grad_coef: torch.Tensor | None = None,
                     found_inf: torch.Tensor | None = None, compact: bool = False, cache: dict | None = None,
                     mutated: list | None = None) -> None:
    """``mutated``: ``[*params, *exp_avgs, *block_steps]`` if the caller keeps one."""
    if torch.compiler.is_compiling():
        library.sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size, maximize,
                                 backend, grad_coef, found_inf, compact)
        return
    backends.get(backend).sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, block_size,
                                           maximize, grad_coef, found_inf, compact, cache)
    bump_versions(mutated if mutated is not None else [*params, *exp_avgs, *block_steps])
