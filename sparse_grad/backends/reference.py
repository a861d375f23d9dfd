"""Reference backend: pure PyTorch, written to be read. Every other backend is tested against it.

It favours clarity over speed: it loops over tensors in Python and, on CUDA, splits the selected
ids per tensor on the host. Arithmetic follows ``torch.optim.AdamW`` (single-tensor path)
operation by operation, in fp32 for fp16/bf16/fp32 tensors and in fp64 for fp64 tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..layout import num_blocks_of

__all__ = ["block_sqnorms", "select_blocks", "sparse_adamw_step"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_sqnorms(tensors: Sequence[torch.Tensor], block_size: int, cache: dict | None = None) -> torch.Tensor:
    """Sum of squares of every block of every tensor, as fp32 ``[num_blocks]``."""
    parts = []
    for t in tensors:
        flat = t.reshape(-1).to(_compute_dtype(t.dtype))
        pad = (-flat.numel()) % block_size
        blocks = F.pad(flat, (0, pad)).view(-1, block_size)
        parts.append(blocks.square().sum(dim=1).float())
    if not parts:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(parts)


def select_blocks(scores: torch.Tensor, segment_sizes: Sequence[int], segment_ks: Sequence[int],
                  cache: dict | None = None) -> torch.Tensor:
    """The ``segment_ks[s]`` highest-scoring blocks of each segment, as ascending int64 global ids.

    Segments are consecutive runs of ``segment_sizes[s]`` blocks. Within a segment blocks are
    ranked by score, highest first (NaN ranks above everything); ties go to the lower id.
    """
    chosen = []
    start = 0
    for size, k in zip(segment_sizes, segment_ks):
        segment = scores[start:start + size] + 0.0  # + 0.0 turns -0.0 into +0.0: zeros tie
        order = torch.sort(segment, descending=True, stable=True).indices
        chosen.append(order[:k] + start)
        start += size
    if not chosen:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    return torch.sort(torch.cat(chosen)).values


def sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    cache: dict | None = None,
) -> None:
    """AdamW on the selected blocks only, in place; every other element is left untouched.

    ``compact=True``: the moments are one slab each, ``exp_avgs[0]`` and ``exp_avg_sqs[0]`` of
    ``[len(block_ids), block_size]`` elements, and the counts ``block_steps[0]`` one per id; row
    ``i`` is the state of block ``block_ids[i]`` (a partial block uses the front of its row).
    ``hyper``: the fp64 tensor ``[lr, beta1, beta2, eps, weight_decay]`` on the params' device
    (read on device by the kernels; here, read back). ``cache``: a dict the caller keeps while
    the tensors stay the same (other backends keep derived tables there); unused here.

    ``found_inf`` (a one-element tensor, GradScaler's): nonzero means the call changes nothing.
    Otherwise, for each selected block ``b`` of tensor ``t``: ``block_steps[t][b] += 1`` and, with
    ``s = block_steps[t][b]``, ``c = grad_coef`` (a one-element fp32 tensor: clip coefficient
    over loss scale; 1 if None) and the block's elements::

        g = grad * c                   (in the compute dtype)
        g = -g if maximize else g
        param   *= 1 - lr * weight_decay
        exp_avg  = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
        denom    = sqrt(exp_avg_sq) / sqrt(1 - beta2**s) + eps
        param   += -(lr / (1 - beta1**s)) * exp_avg / denom
    """
    if found_inf is not None and found_inf.item() != 0:  # the oracle reads it; kernels do not sync
        return
    lr, beta1, beta2, eps, weight_decay = hyper.tolist()
    if compact:
        _compact_step(params, grads, exp_avgs[0], exp_avg_sqs[0], block_steps[0], block_ids, block_size,
                      lr, beta1, beta2, eps, weight_decay, maximize, grad_coef)
        return
    counts = [num_blocks_of(p.numel(), block_size) for p in params]
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    # Where each tensor's ids start in the (ascending) id list.
    bounds = torch.searchsorted(block_ids.cpu(), offsets).tolist()
    for t, (p, g, m, v, steps) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, block_steps)):
        local = block_ids[bounds[t]:bounds[t + 1]] - offsets[t].item()
        if local.numel() == 0:
            continue
        steps[local] += 1
        # Bias corrections per block as torch computes them on the host (Python floats: one
        # correctly rounded division, libm's pow), once per distinct step count, then per element.
        dtype = _compute_dtype(p.dtype)
        counts, which_count = steps[local].unique(return_inverse=True)
        corrections = [(lr / (1 - beta1 ** s), (1 - beta2 ** s) ** 0.5) for s in counts.tolist()]
        step_size, bias_correction2_sqrt = torch.tensor(corrections, dtype=torch.float64,
                                                        device=local.device)[which_count].to(dtype).unbind(1)
        if local.numel() == steps.numel():  # every block: the whole tensor, no gather
            elems = slice(None)
            step_size = step_size.repeat_interleave(block_size)[:p.numel()]
            bias_correction2_sqrt = bias_correction2_sqrt.repeat_interleave(block_size)[:p.numel()]
        else:
            elems = (local[:, None] * block_size + torch.arange(block_size, device=local.device)).reshape(-1)
            elems = elems[elems < p.numel()]
            which = torch.searchsorted(local, elems // block_size)  # each element's selected block
            step_size, bias_correction2_sqrt = step_size[which], bias_correction2_sqrt[which]

        p_flat, m_flat, v_flat = p.view(-1), m.view(-1), v.view(-1)
        param = p_flat[elems].to(dtype)
        grad = g.reshape(-1)[elems].to(dtype)
        if grad_coef is not None:
            grad = grad * grad_coef.to(dtype)
        exp_avg = m_flat[elems].to(dtype)
        exp_avg_sq = v_flat[elems].to(dtype)
        if maximize:
            grad = -grad

        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.add_(-step_size * exp_avg / denom)

        p_flat[elems] = param.to(p.dtype)
        m_flat[elems] = exp_avg.to(m.dtype)
        v_flat[elems] = exp_avg_sq.to(v.dtype)


def _compact_step(params, grads, exp_avg, exp_avg_sq, block_step, block_ids, block_size, lr, beta1, beta2,
                  eps, weight_decay, maximize, grad_coef) -> None:
    """The compact update as the dense one: slab rows are scattered into dense moments (zeros
    elsewhere), the dense step runs, and the rows are gathered back."""
    numels = [p.numel() for p in params]
    counts = [num_blocks_of(n, block_size) for n in numels]
    # Element i of block b lives at flat position b * block_size + i of a padded concatenation.
    padded = sum(counts) * block_size
    rows = (block_ids[:, None] * block_size + torch.arange(block_size, device=block_ids.device)).reshape(-1)
    moments = []
    for slab in (exp_avg, exp_avg_sq):
        flat = torch.zeros(padded, dtype=slab.dtype, device=slab.device)
        flat[rows] = slab.reshape(-1)
        moments.append(flat)
    steps = torch.zeros(sum(counts), dtype=torch.int32, device=block_step.device)
    steps[block_ids] = block_step

    def per_tensor(flat, unit):
        parts, start = [], 0
        for n, c in zip(numels, counts):
            parts.append(flat[start:start + c * unit])
            start += c * unit
        return parts

    dense_m = [m[:n] for m, n in zip(per_tensor(moments[0], block_size), numels)]
    dense_v = [v[:n] for v, n in zip(per_tensor(moments[1], block_size), numels)]
    hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay], dtype=torch.float64)
    sparse_adamw_step([p.view(-1) for p in params], [g.reshape(-1) for g in grads], dense_m, dense_v,
                      per_tensor(steps, 1), block_ids, hyper, block_size, maximize, grad_coef)
    exp_avg.view(-1).copy_(moments[0][rows])
    exp_avg_sq.view(-1).copy_(moments[1][rows])
    block_step.copy_(steps[block_ids])
