"""sparse_grad's kernels as functions (docs/design.md §5).

Each function checks its arguments up front (a ``TypeError``/``ValueError`` naming the argument,
before anything is written), resolves ``backend="auto"`` for the tensors' device and calls the
matching ``torch.ops.sparse_grad`` custom op::

    layout = ops.BlockLayout(params, block_size=4096)
    scores = ops.block_sqnorms(grads, block_size=4096)           # fp32 [num_blocks]
    ids    = ops.select_blocks(scores, density=0.05)              # or k=..., segments=layout
    ops.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, ids,
                          block_size=4096, lr=1e-3, weight_decay=1e-2)
    ops.sparse_sgd_step(params, grads, momentum_buffers, block_steps, ids, block_size=4096,
                        lr=0.1, momentum=0.9)                      # [] buffers: plain SGD
    ops.sparse_lion_step(params, grads, exp_avgs, block_steps, ids, block_size=4096, lr=1e-4)

``backend`` is ``"auto"`` (CUDA tensors: triton, else cuda, else reference; CPU tensors: cpp,
else reference), ``"reference"``, ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"cpp"`` (CPU tensors) or ``"cuda"`` (CUDA tensors); the native ones
need the extension ``sparse_grad._C``.

:mod:`ops.unchecked <sparse_grad._unchecked>` holds the same ops without the checks, for callers
that have checked their arguments once already (SparseAdamW's bound step); the hyper-parameters
of the update travel as one fp64 device table, :func:`hyper_table`.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Sequence

import torch

from . import _checks, _unchecked as unchecked, backends
from .layout import BlockLayout, check_tensor

__all__ = ["BlockLayout", "block_sqnorms", "hyper_table", "num_selected", "select_blocks", "sparse_adamw_step",
           "sparse_lion_step", "sparse_sgd_step", "unchecked"]

num_selected = _checks.num_selected

HYPER_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay")
_HYPER_CACHE_SIZE = 64
_hyper_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def hyper_table(values: Sequence[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """The update's hyper-parameters ``[lr, beta1, beta2, eps, weight_decay]`` as one fp64 tensor
    on ``device``, the form every backend reads (on device: no host sync).

    Plain floats: a cached table per distinct values (a step with unchanged values copies
    nothing; the cache keeps the last 64); treat it as read-only. Any one-element tensor among
    them (an lr a scheduler changes in place) is read on device each call, so neither the host
    syncs nor a compiled caller recompiles when it changes.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if not any(isinstance(v, torch.Tensor) for v in values):
        key = (device, *map(float, values))
        table = None if torch.compiler.is_compiling() else _hyper_cache.get(key)
        if table is None:
            table = _upload([float(v) for v in values], device)
            if not torch.compiler.is_compiling():
                _hyper_cache[key] = table
                if len(_hyper_cache) > _HYPER_CACHE_SIZE:
                    _hyper_cache.popitem(last=False)
        return table
    host = _upload([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values], device)
    return torch.stack([v.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
                        if isinstance(v, torch.Tensor) else host[i] for i, v in enumerate(values)])


def _upload(values: list[float], device: torch.device) -> torch.Tensor:
    """fp64 ``values`` on ``device``; to a GPU in one pinned, non-blocking copy (a plain
    host-to-device copy waits for the device: torch.cuda.set_sync_debug_mode flags it)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)  # a compiled step places the constants itself (fake tensors cannot be pinned)


def _tensor_list(value, name: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    return list(value)


def block_sqnorms(tensors: Sequence[torch.Tensor], block_size: int = 4096, *,
                  backend: str = "auto") -> torch.Tensor:
    """Sum of squares of every block of every tensor, accumulated in fp32 (docs/design.md §2).

    Args:
        tensors: contiguous floating tensors on one device (typically the grads of a group).
        block_size: elements per block; each tensor's last block may be partial.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        fp32 tensor of shape ``[num_blocks]`` in global block order (see :class:`BlockLayout`);
        one kernel launch per distinct dtype on the Triton backend.
    """
    tensors = _tensor_list(tensors, "tensors")
    layout = BlockLayout(tensors, block_size)
    backend = backends.resolve(backend, layout.device)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return unchecked.block_sqnorms(tensors, layout.block_size, backend)


def _segment_sizes(segments, num_scores: int) -> list[int]:
    if segments is None:
        return [num_scores]
    if isinstance(segments, BlockLayout):
        sizes = list(segments.block_counts)
    elif isinstance(segments, (list, tuple)):
        sizes = segments
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise TypeError(f"segments[{i}] must be a non-negative int, got {n!r}")
        sizes = [int(n) for n in sizes]
    else:
        raise TypeError(f"segments must be None, a BlockLayout or a list of ints, got {type(segments).__name__}")
    if sum(sizes) != num_scores:
        raise ValueError(f"segments cover {sum(sizes)} blocks but scores has {num_scores}")
    return sizes


def _segment_ks(k, density, sizes: list[int], per_segment: bool) -> list[int]:
    if (k is None) == (density is None):
        raise TypeError("select_blocks needs exactly one of k and density")
    if density is not None:
        density = _checks.density(density)
        return [num_selected(density, n) for n in sizes]
    if not per_segment:
        ks = [k]
    elif isinstance(k, (list, tuple)):
        ks = list(k)
        if len(ks) != len(sizes):
            raise ValueError(f"k has {len(ks)} counts but there are {len(sizes)} segments")
    else:
        raise TypeError("with segments, k must be a list with one count per segment (or use density)")
    for i, (count, n) in enumerate(zip(ks, sizes)):
        label = f"k[{i}]" if per_segment else "k"
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise TypeError(f"{label} must be an int, got {type(count).__name__} {count!r}")
        if not 0 <= count <= n:
            raise ValueError(f"{label} must be in [0, {n}] (the blocks it chooses from), got {count}")
    return [int(c) for c in ks]


def select_blocks(scores: torch.Tensor, k: int | Sequence[int] | None = None, *,
                  density: float | None = None, segments=None, backend: str = "auto") -> torch.Tensor:
    """Ids of the highest-scoring blocks, ascending, on the scores' device, without host sync.

    Exactly ``k`` blocks (or ``ceil(density * n)``) are chosen; higher scores first, NaN above
    everything, ties to the lower id.

    Args:
        scores: fp32 ``[num_blocks]``.
        k: number of blocks (global), or a list with one count per segment.
        density: fraction in (0, 1]; each segment keeps ``ceil(density * its blocks)`` (so at
            least one block of every non-empty segment).
        segments: ``None`` to choose over all blocks, or a :class:`BlockLayout` / list of segment
            lengths to choose within each tensor (``scope="tensor"``).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` (a multi-program radix select on
            device), ``"cpp"`` (a partial selection in C++) or ``"cuda"`` (the same radix select,
            or torch.topk where Triton is missing).

    Returns:
        int64 tensor of global block ids, ascending, of length ``sum(k)``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype != torch.float32 or scores.dim() != 1:
        raise TypeError(f"scores must be a 1-D float32 tensor, got {scores.dtype} of shape {tuple(scores.shape)}")
    sizes = _segment_sizes(segments, scores.numel())
    ks = _segment_ks(k, density, sizes, per_segment=segments is not None)
    return unchecked.select_blocks(scores.contiguous(), sizes, ks, backends.resolve(backend, scores.device))


def _check_like(tensors: list[torch.Tensor], params: list[torch.Tensor], name: str, device) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        check_tensor(t, f"{name}[{i}]", device)
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")


def _check_device_scalar(value, name: str, device) -> None:
    """None, or a one-element fp32 tensor on ``device`` (or on any device if there are no params)."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.numel() != 1:
        raise TypeError(f"{name} must be None or a one-element float32 tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but params are on {device}")


def sparse_adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    block_size: int = 4096,
    lr: float | torch.Tensor = 1e-3,
    beta1: float | torch.Tensor = 0.9,
    beta2: float | torch.Tensor = 0.999,
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 1e-2,
    maximize: bool = False,
    backend: str = "auto",
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
    compact_grads: bool = False,
) -> None:
    r"""AdamW, in place, on the blocks ``block_ids`` only (docs/design.md §3.4).

    Unless ``found_inf`` is nonzero (then nothing changes), for every selected block ``b`` of
    tensor ``t`` (and nothing else)::

        block_steps[t][b] += 1;  s = block_steps[t][b]
        g      = grad * grad_coef          (if given)
        g      = -g if maximize else g
        param  = param * (1 - lr * weight_decay)
        m      = lerp(m, g, 1 - beta1)
        v      = beta2 * v + (1 - beta2) * g * g
        param += -lr / (1 - beta1^s) * m / (sqrt(v) / sqrt(1 - beta2^s) + eps)

    Scalars are computed in fp64 and elementwise math in fp32 (fp64 for fp64 params), in
    ``torch.optim.AdamW``'s order.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of contiguous tensors of matching shapes on
            one device; moments share a dtype. Grads may have another floating dtype than params.
        block_steps: one int32 tensor per param with one count per block.
        block_ids: 1-D int64, strictly ascending global block ids in ``[0, num_blocks)`` (as from
            :func:`select_blocks`); anything else is a ``ValueError`` before anything is written
            (checked on device for CUDA ids: see ``_check_ids`` for when the host reads it).
        lr, beta1, beta2, weight_decay: numbers, or one-element floating tensors (read by the
            kernel on device: no host sync, and a compiled caller does not recompile when they
            change).
        compact: the moments are one slab each, ``exp_avgs == [m]``, ``exp_avg_sqs == [v]`` of
            shape ``[len(block_ids), block_size]``, and ``block_steps == [s]`` int32
            ``[len(block_ids)]``: row ``i`` is the state of block ``block_ids[i]``.
        compact_grads: the grads are one slab, ``grads == [g]`` of shape ``[len(block_ids),
            block_size]`` (any floating dtype): row ``i`` is the gradient of block ``block_ids[i]``
            (a partial last block uses the front of its row), as
            ``sparse_grad.nn.sparse_backward(..., compact_grads=True)`` leaves it. Independent
            of ``compact``.
        grad_coef: optional one-element fp32 tensor on the params' device, read by the kernel
            (no host sync): a gradient-clipping coefficient, divided by a loss scale.
        found_inf: optional one-element fp32 tensor on the params' device, as GradScaler's:
            nonzero makes the call change nothing (params, moments and step counts).
    """
    exp_avgs = _tensor_list(exp_avgs, "exp_avgs")
    exp_avg_sqs = _tensor_list(exp_avg_sqs, "exp_avg_sqs")
    checked = _check_update(params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, block_steps,
                            block_ids, block_size, compact, grad_coef, found_inf, backend, compact_grads)
    for check, value, name in ((_checks.non_negative, lr, "lr"), (_checks.beta, beta1, "beta1"),
                               (_checks.beta, beta2, "beta2"), (_checks.non_negative, weight_decay, "weight_decay")):
        _checks.tensor_or(check, value, name)
    eps = _checks.non_negative(eps, "eps")
    maximize = _checks.flag(maximize, "maximize")
    if checked is None:
        return
    params, grads, block_steps, layout, found_inf, backend = checked
    hyper = hyper_table([lr, beta1, beta2, eps, weight_decay], layout.device)
    with torch.no_grad():
        unchecked.sparse_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, block_ids, hyper,
                                    layout.block_size, maximize, backend, grad_coef, found_inf, compact,
                                    compact_grads=_checks.flag(compact_grads, "compact_grads"))


def sparse_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    block_size: int = 4096,
    lr: float | torch.Tensor = 1e-3,
    momentum: float | torch.Tensor = 0.0,
    dampening: float | torch.Tensor = 0.0,
    weight_decay: float | torch.Tensor = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    backend: str = "auto",
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
) -> None:
    r"""SGD as ``torch.optim.SGD``, in place, on the blocks ``block_ids`` only (docs/design.md §3.7).

    Unless ``found_inf`` is nonzero, for every selected block ``b`` of tensor ``t``::

        block_steps[t][b] += 1;  s = block_steps[t][b]
        g   = grad * grad_coef;  g = -g if maximize
        g   = g + weight_decay * param                       (if weight_decay != 0)
        buf = g if s == 1 else momentum * buf + (1 - dampening) * g
        g   = g + momentum * buf if nesterov else buf
        param -= lr * g

    ``momentum_buffers``: one tensor per param like it (or, ``compact=True``, one slab
    ``[len(block_ids), block_size]``), or an empty list for plain SGD (``momentum`` must then be
    0). ``nesterov`` needs buffers and ``dampening == 0``, as in torch. The other arguments are
    those of :func:`sparse_adamw_step`.
    """
    buffers = _tensor_list(momentum_buffers, "momentum_buffers")
    checked = _check_update(params, grads, {"momentum_buffers": buffers} if buffers else {}, block_steps,
                            block_ids, block_size, compact, grad_coef, found_inf, backend)
    for check, value, name in ((_checks.non_negative, lr, "lr"), (_checks.non_negative, momentum, "momentum"),
                               (_checks.non_negative, dampening, "dampening"),
                               (_checks.non_negative, weight_decay, "weight_decay")):
        _checks.tensor_or(check, value, name)
    nesterov, maximize = _checks.flag(nesterov, "nesterov"), _checks.flag(maximize, "maximize")
    if not buffers and (isinstance(momentum, torch.Tensor) or momentum != 0):
        raise ValueError("momentum_buffers is empty, so momentum must be the number 0, got "
                         f"{_checks.show(momentum, 'repr')}")
    if nesterov and (not buffers or isinstance(dampening, torch.Tensor) or dampening != 0):
        raise ValueError("nesterov=True needs momentum buffers (momentum > 0) and dampening 0, as torch.optim.SGD")
    if checked is None:
        return
    params, grads, block_steps, layout, found_inf, backend = checked
    hyper = hyper_table([lr, momentum, dampening, weight_decay], layout.device)
    with torch.no_grad():
        unchecked.sparse_sgd_step(params, grads, buffers, block_steps, block_ids, hyper, layout.block_size,
                                  maximize, nesterov, backend, grad_coef, found_inf, compact)


def sparse_lion_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    block_size: int = 4096,
    lr: float | torch.Tensor = 1e-4,
    beta1: float | torch.Tensor = 0.9,
    beta2: float | torch.Tensor = 0.99,
    weight_decay: float | torch.Tensor = 0.0,
    maximize: bool = False,
    backend: str = "auto",
    grad_coef: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    compact: bool = False,
) -> None:
    r"""Lion, in place, on the blocks ``block_ids`` only (docs/design.md §3.7).

    Unless ``found_inf`` is nonzero, for every selected block ``b`` of tensor ``t``
    (``block_steps[t][b] += 1``: a count, Lion has no bias correction)::

        g       = grad * grad_coef;  g = -g if maximize
        param   = param * (1 - lr * weight_decay)
        param  -= lr * sign(beta1 * exp_avg + (1 - beta1) * g)
        exp_avg = beta2 * exp_avg + (1 - beta2) * g

    The other arguments are those of :func:`sparse_adamw_step`.
    """
    exp_avgs = _tensor_list(exp_avgs, "exp_avgs")
    checked = _check_update(params, grads, {"exp_avgs": exp_avgs}, block_steps, block_ids, block_size, compact,
                            grad_coef, found_inf, backend)
    for check, value, name in ((_checks.non_negative, lr, "lr"), (_checks.beta, beta1, "beta1"),
                               (_checks.beta, beta2, "beta2"), (_checks.non_negative, weight_decay, "weight_decay")):
        _checks.tensor_or(check, value, name)
    maximize = _checks.flag(maximize, "maximize")
    if checked is None:
        return
    params, grads, block_steps, layout, found_inf, backend = checked
    hyper = hyper_table([lr, beta1, beta2, weight_decay], layout.device)
    with torch.no_grad():
        unchecked.sparse_lion_step(params, grads, exp_avgs, block_steps, block_ids, hyper, layout.block_size,
                                   maximize, backend, grad_coef, found_inf, compact)


def _check_update(params, grads, moments: dict, block_steps, block_ids, block_size, compact, grad_coef, found_inf,
                  backend, compact_grads=False):
    """The checks every update op shares (tensors, state, ids, device scalars, backend);
    ``moments`` maps each state list's name to it. Returns ``(params, grads, block_steps,
    layout, found_inf, backend)`` to call the op with, or None when there is nothing to update."""
    params = _tensor_list(params, "params")
    grads = _tensor_list(grads, "grads")
    block_steps = _tensor_list(block_steps, "block_steps")
    layout = BlockLayout(params, block_size, name="params")
    device = layout.device
    if not isinstance(block_ids, torch.Tensor) or block_ids.dtype != torch.int64 or block_ids.dim() != 1:
        raise TypeError("block_ids must be a 1-D int64 tensor")
    if _checks.flag(compact_grads, "compact_grads"):
        _check_slabs({"grads": grads}, None, params, block_ids.numel(), layout.block_size, device, "compact_grads")
    else:
        _check_like(grads, params, "grads", device)
    if params and block_ids.device != device:
        raise ValueError(f"block_ids is on {block_ids.device} but params are on {device}")
    if block_ids.numel() > layout.num_blocks:
        raise ValueError(f"block_ids has {block_ids.numel()} ids but params have only {layout.num_blocks} blocks")
    compact = _checks.flag(compact, "compact")
    if compact:
        _check_slabs(moments, block_steps, params, block_ids.numel(), layout.block_size, device)
    else:
        _check_moments(moments, block_steps, params, layout, device)
    for value, name in ((grad_coef, "grad_coef"), (found_inf, "found_inf")):
        _check_device_scalar(value, name, device)
    found_inf = _check_ids(block_ids, layout.num_blocks, found_inf)
    backend = backends.resolve(backend, device)
    if not params or block_ids.numel() == 0:
        return None
    return params, grads, block_steps, layout, found_inf, backend


def _check_ids(block_ids: torch.Tensor, num_blocks: int, found_inf: torch.Tensor | None) -> torch.Tensor | None:
    """Ids strictly ascending (so unique) and in ``[0, num_blocks)``: a duplicate would be updated
    twice by the native kernels and once by the reference one, an unsorted list would fail on one
    backend only. CPU ids are read here. CUDA ids are checked on device and the one flag is read
    (a checked call may wait for the device; SparseAdamW's step calls ``ops.unchecked`` with ids
    ascending by construction), except where the host cannot read: under ``torch.compile`` and
    in a CUDA graph capture the flag is added to ``found_inf`` instead, so a bad call changes
    nothing, without an error. Returns the ``found_inf`` to pass on."""
    if block_ids.numel() == 0:
        return found_inf
    bad = (block_ids[0] < 0) | (block_ids[-1] >= num_blocks)
    if block_ids.numel() > 1:
        bad = bad | (block_ids[1:] <= block_ids[:-1]).any()
    if torch.compiler.is_compiling() or (block_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        bad = bad.to(torch.float32).reshape(1)
        return bad if found_inf is None else found_inf + bad
    if bool(bad):
        raise ValueError(f"block_ids must be strictly ascending (unique) ids in [0, {num_blocks}), got "
                         f"{_preview(block_ids)}")
    return found_inf


def _preview(ids: torch.Tensor) -> str:
    shown = ids[:8].tolist()
    return f"{shown}{' ...' if ids.numel() > 8 else ''} ({ids.numel()} ids)"


def _check_moments(moments: dict, block_steps, params, layout: BlockLayout, device) -> None:
    """Dense state: moments like the params (one dtype per param), one int32 count per block."""
    lists = list(moments.items())
    for name, tensors in lists:
        _check_like(tensors, params, name, device)
    for (first, ms), (name, others) in zip(lists, lists[1:]):
        for i, (m, v) in enumerate(zip(ms, others)):
            if m.dtype != v.dtype:
                raise TypeError(f"{name}[{i}] is {v.dtype} but {first}[{i}] is {m.dtype}")
    if len(block_steps) != len(params):
        raise ValueError(f"block_steps has {len(block_steps)} tensors but params has {len(params)}")
    for i, (steps, n) in enumerate(zip(block_steps, layout.block_counts)):
        if not isinstance(steps, torch.Tensor) or steps.dtype != torch.int32:
            raise TypeError(f"block_steps[{i}] must be an int32 tensor")
        if steps.dim() != 1 or steps.numel() != n or not steps.is_contiguous() or steps.device != device:
            raise ValueError(f"block_steps[{i}] must be a contiguous 1-D tensor of {n} counts on "
                             f"{device}, got shape {tuple(steps.shape)} on {steps.device}")


def _check_slabs(moments: dict, block_steps, params, num_ids: int, block_size: int, device,
                 flag: str = "compact") -> None:
    """Compact state: one slab per moment, [num_ids, block_size], and one int32 count per id
    (``block_steps=None``: slabs only, as compact grads are, of any floating dtype)."""
    for name, lst in (*moments.items(), *(() if block_steps is None else (("block_steps", block_steps),))):
        if len(lst) != 1:
            raise ValueError(f"with {flag}=True, {name} must hold exactly one tensor, got {len(lst)}")
    slabs = [(f"{name}[0]", lst[0]) for name, lst in moments.items()]
    for name, slab in slabs:
        check_tensor(slab, name, device)
        if slab.numel() != num_ids * block_size:
            raise ValueError(f"{name} must hold block_size elements per block id ({num_ids} x {block_size}), "
                             f"got shape {tuple(slab.shape)}")
    if block_steps is None:
        return
    for (first, m), (name, v) in zip(slabs, slabs[1:]):
        if m.dtype != v.dtype:
            raise TypeError(f"{name} is {v.dtype} but {first} is {m.dtype}")
    (steps,) = block_steps
    for name, m in slabs[:1]:
        for i, p in enumerate(params):
            if m.dtype not in (p.dtype, torch.float32):
                raise TypeError(f"{name} is {m.dtype}; params[{i}] is {p.dtype}: the state dtype must be "
                                "the param dtype or float32")
    if not isinstance(steps, torch.Tensor) or steps.dtype != torch.int32:
        raise TypeError("block_steps[0] must be an int32 tensor")
    if steps.dim() != 1 or steps.numel() != num_ids or not steps.is_contiguous() or steps.device != device:
        raise ValueError(f"block_steps[0] must be a contiguous 1-D tensor of {num_ids} counts on {device}, "
                         f"got shape {tuple(steps.shape)} on {steps.device}")
