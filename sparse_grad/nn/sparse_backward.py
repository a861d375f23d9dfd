"""``sparse_backward(model, optimizer)``: the weight gradients of a model's Linear layers are
computed only where SparseAdamW's next step reads them (docs/design.md §11).

Each ``nn.Linear`` whose weight is in one of the optimizer's param groups gets an instance
``forward`` that asks the optimizer's :meth:`~sparse_grad.SparseAdamW.plan_next_step` (once per
step) what the step reads. A step that reads the whole gradient (a reselection, the first
step, clipping, error feedback, score hooks, density 1) runs the layer's own forward and
backward; otherwise the backward computes the weight gradient of the rows the selected blocks
touch, one GEMM over the gathered rows of the output gradient, and zeros elsewhere. The input
gradient is always complete. With ``compact_grads=True`` the selected blocks' gradient goes into
the group's compact slab instead (:meth:`~sparse_grad.SparseAdamW.compact_grad`) and the
weight's ``.grad`` stays None. Before the step, a step pre-hook checks that the step will read
what was computed, and refuses the step (nothing changed yet) if not.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..optim import SparseAdamW
from ..optim.sharding import is_dtensor
from .selected_rows import block_starts, rows_of_blocks, selected_rows_linear

__all__ = ["SparseBackward", "sparse_backward"]

# The handle patching a module, so that two handles never patch one layer.
_PATCHED_BY = "_sparse_grad_backward"


class SparseBackward:
    """What :func:`sparse_backward` returns: ``remove()`` restores the layers; also a context
    manager (removed on exit)."""

    def __init__(self, model: nn.Module, optimizer: SparseAdamW, compact_grads: bool = False):
        if not isinstance(compact_grads, bool):
            raise TypeError(f"compact_grads must be a bool, got {type(compact_grads).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, SparseAdamW):
            raise TypeError(f"optimizer must be a sparse_grad.SparseAdamW, got {type(optimizer).__name__}")
        in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and id(m.weight) in in_groups]
        for name, m in layers:
            where = f"model.{name}" if name else "model"
            if is_dtensor(m.weight):
                raise ValueError(f"{where}.weight is a DTensor (FSDP2 or tensor parallel): sparse_backward "
                                 "supports unsharded weights only (the sharded grads are reduce-scattered "
                                 "in full); train without it under FSDP2")
            if getattr(m, _PATCHED_BY, None) is not None:
                raise ValueError(f"{where} is already patched by another sparse_backward handle: "
                                 "remove() that one first")
        if not layers:
            raise ValueError("model has no nn.Linear whose weight is in one of optimizer's param groups: "
                             "sparse_backward would change nothing")
        self.optimizer = optimizer
        self.compact_grads = compact_grads
        self.layers = [m for _, m in layers]
        # This step's plan: id(weight) → (its first block, end block, the selected ids, block size,
        # its group's index, whether the group takes a compact gradient).
        self._plan: dict[int, tuple] | None = None
        # id(weight) → (ids, rows, its slab rows [lo, hi), its blocks' starts in the rows GEMM)
        self._rows: dict[int, tuple] = {}
        self._used: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this step: id(weight) → (weight, ids)
        self._hooks = [optimizer.register_step_pre_hook(self._check_step),
                       optimizer.register_step_post_hook(self._forget_step),
                       optimizer.register_load_state_dict_post_hook(self._forget_step)]
        # A forward set on the instance before (accelerate's hooks do that) is kept and restored.
        self._own_forwards = [m.__dict__.get("forward") for m in self.layers]
        for m in self.layers:
            setattr(m, _PATCHED_BY, (self, m.forward))
            m.forward = _not_compiled(types.MethodType(_forward, m))

    def remove(self) -> None:
        """Give the layers their own forward back and unregister the optimizer hooks."""
        for m, own in zip(self.layers, self._own_forwards):
            del m.forward
            if own is not None:
                m.forward = own
            delattr(m, _PATCHED_BY)
        for hook in self._hooks:
            hook.remove()
        self.layers, self._hooks, self._own_forwards = [], [], []
        self._forget_step()

    def __enter__(self) -> "SparseBackward":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def rows(self, weight: torch.Tensor) -> tuple[torch.Tensor, tuple | None] | None:
        """The rows of ``weight`` whose gradient the next step reads, and where the backward
        adds them in the group's compact gradient (``(slab rows, starts, block_size)``, or None:
        into ``weight.grad``); None: all rows, the layer's own backward."""
        if self._plan is None:  # the step's first forward, or the first after a refused step
            self._plan, self._used = {}, {}
            for plan in self.optimizer.plan_next_step():
                if plan.reads_all:
                    continue
                # One slab per group, in the params' dtype: a group of mixed dtypes keeps full-size grads.
                compact = self.compact_grads and len({p.dtype for p in plan.params}) == 1
                offset = 0
                for p in plan.params:
                    blocks = -(-p.numel() // plan.block_size)
                    self._plan[id(p)] = (offset, offset + blocks, plan.block_ids, plan.block_size, plan.index,
                                         compact)
                    offset += blocks
        entry = self._plan.get(id(weight))
        if entry is None or weight.dim() != 2:
            return None
        first, end, ids, block_size, index, compact = entry
        cached = self._rows.get(id(weight))
        if cached is None or cached[0] is not ids:  # rows are worked out once per selection
            rows = rows_of_blocks(ids, first, end, weight.numel(), weight.shape[1], block_size, weight.shape[0])
            lo, hi = torch.searchsorted(ids, torch.tensor([first, end], device=ids.device)).tolist()
            starts = block_starts(ids[lo:hi] - first, rows, weight.shape[1], block_size)
            self._rows[id(weight)] = cached = (ids, rows, lo, hi, starts)
        self._used[id(weight)] = (weight, ids)
        _, rows, lo, hi, starts = cached
        if not compact:
            return rows, None
        slab = self.optimizer.compact_grad(index, [weight])
        return rows, (slab[lo:hi], starts, block_size)

    def _check_step(self, optimizer, args, kwargs) -> None:
        """Refuse a step that would read gradient this backward did not compute (nothing has
        changed yet): the plan changed between the forward and the step."""
        if not self._used:
            return
        reads = {}
        for plan in optimizer.plan_next_step():
            for p in plan.params:
                reads[id(p)] = plan
        for weight, ids in self._used.values():
            plan = reads.get(id(weight))
            if plan is None or plan.reads_all or plan.block_ids is not ids:
                self._plan = None  # the next forward plans again (and computes what the step reads)
                why = "it no longer selected" if plan is None else plan.reason or "its selection changed"
                raise RuntimeError(
                    "sparse_backward computed the gradient of a weight's selected blocks only, but the step "
                    f"would read all of it ({why}): a group's options, or which params have a grad, changed "
                    "after the forward. The step was refused and changed nothing; zero the grads and run the "
                    "forward and backward again")

    def _forget_step(self, *args) -> None:
        self._plan = None
        self._used = {}


_NOT_COMPILED = ("sparse_grad.nn.sparse_backward runs the patched Linear layers eagerly (their backward reads "
                 "the optimizer's selection on the host): a graph break per layer, so fullgraph=True cannot "
                 "hold; remove() the handle to compile the whole model")


def _not_compiled(forward):
    try:
        return torch.compiler.disable(forward, reason=_NOT_COMPILED)
    except TypeError:  # a torch whose disable() takes no reason
        return torch.compiler.disable(forward)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    handle, forward = getattr(module, _PATCHED_BY)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return forward(x)
    planned = handle.rows(weight)
    if planned is None:
        return forward(x)
    return selected_rows_linear(x, weight, module.bias, *planned)


def sparse_backward(model: nn.Module, optimizer: SparseAdamW, compact_grads: bool = False) -> SparseBackward:
    """Compute only the weight gradients ``optimizer``'s next step reads, for every
    ``nn.Linear`` of ``model`` whose weight the optimizer trains.

    On steps that read the whole gradient (a reselection, the first step, ``max_grad_norm``,
    ``error_feedback``, a score hook, density 1) nothing changes. On the others, a weight's
    ``.grad`` holds the exact gradient on the rows its selected blocks touch and zeros on the
    rest, so the step gives the same parameters as without it. Returns a handle; ``remove()``
    (or leaving its ``with`` block) restores the layers.

    ``compact_grads=True``: on those steps a weight's gradient is not a full-size ``.grad`` but
    the rows of its selected blocks in its group's compact slab (``optimizer.compact_grad``),
    which the update kernel reads directly, so weight gradients take memory ∝ density. **The
    weights' ``.grad`` is then None between reselections**: ``clip_grad_norm_`` and other code
    reading ``.grad`` skip them silently (use the optimizer's ``max_grad_norm``, which makes
    every step compute full gradients), and a step under ``torch.amp.GradScaler`` is refused
    (a ``RuntimeError``, nothing changed): its inf check and ``unscale_`` skip None grads.
    """
    return SparseBackward(model, optimizer, compact_grads)
