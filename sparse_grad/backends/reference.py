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

__all__ = ["block_sqnorms", "select_blocks", "sparse_adamw_step", "sparse_lion_step", "sparse_sgd_step"]


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


def _selected_blocks(params: Sequence[torch.Tensor], block_ids: torch.Tensor, block_size: int):
    """Per tensor with selected blocks: ``(t, local, elems, which)``: its selected blocks'
    local ids, their elements in the flat tensor (a slice when it is all of them) and, per
    element, the position in ``local`` of its block. Ids are split per tensor on the host."""
    counts = [num_blocks_of(p.numel(), block_size) for p in params]
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    # Where each tensor's ids start in the (ascending) id list.
    bounds = torch.searchsorted(block_ids.cpu(), offsets).tolist()
    for t, p in enumerate(params):
        local = block_ids[bounds[t]:bounds[t + 1]] - offsets[t].item()
        if local.numel() == 0:
            continue
        if local.numel() == counts[t]:  # every block: the whole tensor, no gather
            elems = slice(None)
            which = torch.arange(p.numel(), device=local.device) // block_size
        else:
            elems = (local[:, None] * block_size + torch.arange(block_size, device=local.device)).reshape(-1)
            elems = elems[elems < p.numel()]
            which = torch.searchsorted(local, elems // block_size)
        yield t, local, elems, which


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
    compact_grads: bool = False,
) -> None:
    """AdamW on the selected blocks only, in place; every other element is left untouched.

    ``compact=True``: the moments are one slab each, ``exp_avgs[0]`` and ``exp_avg_sqs[0]`` of
    ``[len(block_ids), block_size]`` elements, and the counts ``block_steps[0]`` one per id; row
    ``i`` is the state of block ``block_ids[i]`` (a partial block uses the front of its row).
    ``compact_grads=True``: the grads are one slab ``grads[0]`` of ``[len(block_ids), block_size]``
    elements, row ``i`` the gradient of block ``block_ids[i]`` (the rows of compact state).
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
    if compact_grads:
        grads = _scattered_grads(grads[0], params, block_ids, block_size)
    if compact:
        _compact_step(lambda params, moments, steps: sparse_adamw_step(
            params, grads, moments[0], moments[1], steps, block_ids, hyper, block_size, maximize, grad_coef),
            params, [exp_avgs[0], exp_avg_sqs[0]], block_steps[0], block_ids, block_size)
        return
    for t, local, elems, which in _selected_blocks(params, block_ids, block_size):
        p, g, m, v, steps = params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], block_steps[t]
        steps[local] += 1
        # Bias corrections per block as torch computes them on the host (Python floats: one
        # correctly rounded division, libm's pow), once per distinct step count, then per element.
        dtype = _compute_dtype(p.dtype)
        counts, which_count = steps[local].unique(return_inverse=True)
        corrections = [(lr / (1 - beta1 ** s), (1 - beta2 ** s) ** 0.5) for s in counts.tolist()]
        step_size, bias_correction2_sqrt = torch.tensor(corrections, dtype=torch.float64,
                                                        device=local.device)[which_count].to(dtype).unbind(1)
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


def _scattered_grads(slab: torch.Tensor, params, block_ids: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """A compact grad's rows put back where their blocks lie: per param a flat grad of its
    size, zeros outside the selected blocks (which the update never reads)."""
    counts = [num_blocks_of(p.numel(), block_size) for p in params]
    flat = torch.zeros(sum(counts) * block_size, dtype=slab.dtype, device=slab.device)
    flat.view(-1, block_size)[block_ids] = slab.view(-1, block_size)
    return [part[:p.numel()] for part, p in zip(flat.split([c * block_size for c in counts]), params)]


def _compact_step(dense_step, params, slabs, block_step, block_ids, block_size) -> None:
    """The compact update as the dense one: slab rows are scattered into dense moments (zeros
    elsewhere), ``dense_step(params, moment_lists, block_steps)`` runs on them, and the rows are
    gathered back. ``slabs``: the state slabs ``[len(block_ids), block_size]``, any number."""
    numels = [p.numel() for p in params]
    counts = [num_blocks_of(n, block_size) for n in numels]
    # Element i of block b lives at flat position b * block_size + i of a padded concatenation.
    padded = sum(counts) * block_size
    rows = (block_ids[:, None] * block_size + torch.arange(block_size, device=block_ids.device)).reshape(-1)
    moments = []
    for slab in slabs:
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

    dense = [[m[:n] for m, n in zip(per_tensor(flat, block_size), numels)] for flat in moments]
    dense_step([p.view(-1) for p in params], dense, per_tensor(steps, 1))
    for slab, flat in zip(slabs, moments):
        slab.view(-1).copy_(flat[rows])
    block_step.copy_(steps[block_ids])


def sparse_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    hyper: torch.Tensor,
    block_size: int,
    maximize: bool,
    nesterov: bool,
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    cache: dict | None = None,
) -> None:
    """SGD on the selected blocks only, in place, as ``torch.optim.SGD``'s single-tensor path.

    ``hyper``: fp64 ``[lr, momentum, dampening, weight_decay]``. ``momentum_buffers``: one per
    param (or one slab ``[len(block_ids), block_size]`` with ``compact``), or ``[]`` for no
    momentum (then ``momentum`` is not read). For each selected block, with its count
    ``s = ++block_steps[t][b]`` and its elements::

        g = grad * grad_coef;  g = -g if maximize
        g = g + weight_decay * param                 (only if weight_decay != 0)
        buf = g if s == 1 else buf * momentum + (1 - dampening) * g     (with buffers)
        g = g + momentum * buf if nesterov else buf                     (with buffers)
        param = param - lr * g

    ``s == 1`` is torch's "no buffer yet": a block's first update copies the gradient, whenever
    that block is first selected.
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    lr, momentum, dampening, weight_decay = hyper.tolist()
    has_buffers = len(momentum_buffers) > 0

    def dense_step(params, moments, block_steps):
        buffers = moments[0] if moments else [None] * len(params)
        for t, local, elems, which in _selected_blocks(params, block_ids, block_size):
            p, steps, buf_t = params[t], block_steps[t], buffers[t]
            steps[local] += 1
            dtype = _compute_dtype(p.dtype)
            param = p.view(-1)[elems].to(dtype)
            grad = _scaled_grad(grads[t], elems, dtype, grad_coef, maximize)
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if buf_t is not None:
                first = (steps[local] == 1)[which]
                buf = buf_t.view(-1)[elems].to(dtype)
                buf = torch.where(first, grad, buf.mul(momentum).add(grad, alpha=1 - dampening))
                buf_t.view(-1)[elems] = buf.to(buf_t.dtype)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            param.add_(grad, alpha=-lr)
            p.view(-1)[elems] = param.to(p.dtype)

    if compact:
        _compact_step(dense_step, params, list(momentum_buffers), block_steps[0], block_ids, block_size)
    else:
        dense_step(params, [list(momentum_buffers)] if has_buffers else [], block_steps)


def sparse_lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
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
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; the arithmetic
    of lucidrains' lion-pytorch) on the selected blocks only, in place.

    ``hyper``: fp64 ``[lr, beta1, beta2, weight_decay]``. For each selected block
    (``block_steps[t][b] += 1``, a count only: Lion has no bias correction) and its elements::

        g = grad * grad_coef;  g = -g if maximize
        param = param * (1 - lr * weight_decay)          (decoupled decay)
        param = param - lr * sign(exp_avg * beta1 + (1 - beta1) * g)
        exp_avg = exp_avg * beta2 + (1 - beta2) * g
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    lr, beta1, beta2, weight_decay = hyper.tolist()

    def dense_step(params, moments, block_steps):
        for t, local, elems, which in _selected_blocks(params, block_ids, block_size):
            p, m, steps = params[t], moments[0][t], block_steps[t]
            steps[local] += 1
            dtype = _compute_dtype(p.dtype)
            param = p.view(-1)[elems].to(dtype)
            grad = _scaled_grad(grads[t], elems, dtype, grad_coef, maximize)
            exp_avg = m.view(-1)[elems].to(dtype)
            param.mul_(1 - lr * weight_decay)
            update = exp_avg.mul(beta1).add(grad, alpha=1 - beta1).sign_()
            param.add_(update, alpha=-lr)
            exp_avg = exp_avg.mul(beta2).add(grad, alpha=1 - beta2)
            p.view(-1)[elems] = param.to(p.dtype)
            m.view(-1)[elems] = exp_avg.to(m.dtype)

    if compact:
        _compact_step(dense_step, params, list(exp_avgs), block_steps[0], block_ids, block_size)
    else:
        dense_step(params, [list(exp_avgs)], block_steps)


def _scaled_grad(grad: torch.Tensor, elems, dtype: torch.dtype, grad_coef: torch.Tensor | None,
                 maximize: bool) -> torch.Tensor:
    """The selected elements of a grad in the compute dtype, times ``grad_coef``, negated with
    ``maximize`` (a copy: the grad itself is never written)."""
    g = grad.reshape(-1)[elems].to(dtype)
    if grad_coef is not None:
        g = g * grad_coef.to(dtype)
    return -g if maximize else g.clone()
