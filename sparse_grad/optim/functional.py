"""One sparse optimizer step of one param group, written once for every group view and update
rule (docs/design.md §3).

:func:`sparse_step` takes a :class:`~sparse_grad.optim.binding.BoundStep` (a checked group: its
params, grads, view, backend, counts and caches) and runs, in order: error feedback, the norm
pass and selection (if due), clipping and unscaling folded into one device scalar, the update
on the selected blocks, and the score hooks. It writes state, never checks: the caller bound
the group first. Kernels are reached through ``sparse_grad.ops.unchecked``; the update is the
bound step's rule (:mod:`.rules`: AdamW, SGD or Lion), the rest is the same for every rule.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .. import ops
from ..ops import unchecked
from . import compact_state
from .compact_grads import add_dense_grads
from .dense_state import init_dense_state, init_error
from .gradients import Scaling, add_error, grad_coef, keep_error
from .group_state import Selection
from .overflow import Overflow, Undo
from .random_draws import random_scores
from .selection import blend, reselection_due, scores_of, select, update_ema


def sparse_step(step, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                 hooks: Iterable[Callable], optimizer, overflow: Overflow | None = None) -> None:
    """Step the group of ``step``; ``hooks`` are called as ``hook(optimizer, group_index, params,
    scores, block_ids)`` after the update. ``overflow``: where an AMP step records the host
    state it changes, undone if ``found_inf`` turns out nonzero (see :mod:`.overflow`)."""
    group, view = step.group, step.view
    scaling = Scaling.of(grad_scale, found_inf, view.device)
    states = step.states()
    grads, inv_scale = step.grads, scaling.inv_scale
    if group["error_feedback"]:
        grads = add_error(grads, _errors(step, states), scaling)
        inv_scale = None  # the buffers hold unscaled gradients
    if overflow is not None:
        _remember(step, overflow)
    block_ids, scores, reselected = _select(step, grads, inv_scale, scaling.skip, bool(hooks))
    coef = grad_coef(scores, group["max_grad_norm"], inv_scale)
    kernel_ids = view.kernel_ids(block_ids, step.state.caches)
    if step.compact:
        slabs = _compact_slabs(step, block_ids, reselected)
        moments, block_steps = [[slabs[key]] for key in step.moments], [slabs["block_step"]]
        kernel_params = _kernel_params(step)
        mutated = None
        cache = step.caches["update"]
        if cache.get("slabs") is not slabs["block_step"]:  # new slabs (their first allocation): new tables
            cache.clear()
            cache["slabs"] = slabs["block_step"]
    else:
        kernel_params, moments, block_steps, mutated = _dense(step, states)
        cache = step.caches["update"]
    hyper = step.hyper_table
    if hyper is None:
        hyper = ops.hyper_table(step.rule.hyper(group), view.device)
        if step.reusable and step.checked_hyper is not None:  # kept until check_hyper sees new values
            step.hyper_table = hyper
    compact_grad = step.state.compact_grad  # checked by the optimizer: made for these block_ids
    if view.has_work() and (not view.sharded or kernel_ids.numel()):
        if compact_grad is None:
            kernel_grads, layout_flag = view.kernel_tensors(grads), {}
        else:
            kernel_grads = [add_dense_grads(compact_grad, step.params, grads, group["block_size"])]
            layout_flag = {"compact_grads": True}
        step.rule.apply(kernel_params, kernel_grads, moments, block_steps, kernel_ids, hyper,
                        group["block_size"], group, step.backend, coef, scaling.found_inf, step.compact,
                        cache if step.reusable else None, mutated, **layout_flag)
        _write_back(step, kernel_params)
    if view.sharded and not step.compact:
        view.count_remote_steps([s["block_step"] for s in states], block_ids, scaling.skip)
    if group["error_feedback"] and view.has_work():
        keep_error(view.kernel_tensors(grads), kernel_ids, view.kernel_layout, scaling.skip)
    for hook in hooks:
        hook(optimizer, step.index, step.params, scores, block_ids)


def _kernel_params(step) -> list[torch.Tensor]:
    """The params as the kernels take them (flat, block by block): a strided param of a plain
    group as a contiguous copy, which :func:`_write_back` copies back after the update. Such a
    group is never bound for reuse, so a bound step's params are the params themselves."""
    params = step.view.kernel_tensors(step.view.local(step.params))
    return params if step.reusable else list(map(torch.Tensor.contiguous, params))


def _write_back(step, kernel_params: list[torch.Tensor]) -> None:
    if step.reusable or step.view.sharded:  # the kernels wrote the params themselves
        return
    for p, updated in zip(step.params, kernel_params):
        if updated is not p:
            p.copy_(updated)


def _errors(step, states: list[dict]) -> list[torch.Tensor]:
    """The error-feedback buffers of the params that take part (local shards), made once per
    bound step, with the buffers themselves on their first step."""
    if step.errors is None:
        errors = step.view.local([init_error(s, p, d) for s, p, d in zip(states, step.params, step.dtypes)])
        if not step.reusable:
            return errors
        step.errors = errors
    return step.errors


def _dense(step, states: list[dict]) -> tuple:
    """The kernel lists of dense state: params, one list per moment of the rule, counts, and all
    the tensors the update mutates (their versions are bumped); made once per bound step, with
    the state itself."""
    if step.dense is None:
        group, view = step.group, step.view
        for s, p, dtype in zip(states, step.params, step.dtypes):
            init_dense_state(s, p, dtype, group["block_size"], view.device, step.moments)
        params = _kernel_params(step)
        moments = [view.kernel_tensors(view.local([s[key] for s in states])) for key in step.moments]
        block_steps = view.block_steps([s["block_step"] for s in states])
        dense = (params, moments, block_steps, [*params, *(t for m in moments for t in m), *block_steps])
        if not step.reusable:
            return dense
        step.dense = dense
    return step.dense


def _remember(step, overflow: Overflow) -> None:
    """Record the group's host state if an overflow of this step could change it: with a
    reselection every step and a selection, compact state and score EMAs already made, the
    device blends keep everything (the age is 1 after any step) and nothing is recorded."""
    group, state = step.group, step.state
    selection = state.selection
    seeded = ([s for s in step.states() if "score_ema" not in s]
              if group["score_ema"] > 0.0 and group["selection"] == "norm" else [])
    if (selection is None or selection.key != step.selection_key or seeded
            or (step.compact and state.compact is None)
            or (group["density"] < 1.0 and (group["reselect_every"] > 1 or group["selection"] == "random"))):
        undo = Undo.of(state)
        undo.seeded = seeded
        overflow.undos.append(undo)


def _select(step, grads: list[torch.Tensor], inv_scale: torch.Tensor | None, skip: torch.Tensor | None,
            hooked: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The block ids this step updates, this step's block sums of squares (of the unscaled grads)
    if a norm pass ran (for a reselection, a score hook or clipping), and whether the blocks
    were reselected."""
    group, layout, state = step.group, step.view.layout, step.state
    key = step.selection_key
    selection = state.selection
    # Counted only for random draws: a count changing every step would make a compiled step
    # recompile (dynamo specializes on it).
    draw = selection.draw if selection is not None and group["selection"] == "random" else 0
    due = reselection_due(selection, key, group)
    ranks_current = (due and group["density"] < 1.0 and group["blueprint_weight"] < 1.0
                     and group["selection"] == "norm")
    scores = None
    first_pass = _first_pass(step, inv_scale) if ranks_current else None
    if ranks_current or hooked or group["max_grad_norm"] is not None:
        scores = step.view.block_sqnorms(grads, step.backend, step.caches["norms"] if step.reusable else None,
                                         first_pass)
        if inv_scale is not None:
            scores = scores * inv_scale.square()
    if due:
        cache = step.caches["select"] if step.reusable else None
        if group["density"] == 1.0:
            ids = torch.arange(layout.num_blocks, dtype=torch.int64, device=layout.device)
        elif group["selection"] == "random":
            ids = select(random_scores(layout, group["seed"], step.index, draw), step.counts, step.backend, cache)
        else:
            ids = select(_selection_scores(step, scores, skip), step.counts, step.backend, cache, first_pass)
        if skip is not None and selection is not None and selection.key == key:
            ids = torch.where(skip, selection.block_ids, ids)  # an overflowed step keeps it
        draw += group["selection"] == "random"
        selection = state.selection = Selection(key, ids, 0, draw)
    selection.age += 1
    return selection.block_ids, scores, due


def _first_pass(step, inv_scale: torch.Tensor | None):
    """The selection histograms the norm pass fills (docs/design.md §3.3), where the selection
    ranks its sums unchanged in one call: scores "l2", no EMA, no blueprint blend, no unscaling,
    no global minima (their two selections rank other scores), a plain group (a sharded one sums
    the scores over the ranks after the pass). ``None`` otherwise, or where the backend has none."""
    group, counts = step.group, step.counts
    if (group["score"] != "l2" or group["score_ema"] > 0.0 or inv_scale is not None or counts.minima is not None
            or (step.blueprint_scores is not None and group["blueprint_weight"] > 0.0) or step.view.sharded):
        return None
    return unchecked.first_pass(step.backend, len(counts.sizes) if counts.per_tensor else 1, counts.per_tensor,
                                step.view.layout.device)


def _selection_scores(step, sqnorms: torch.Tensor | None, skip: torch.Tensor | None) -> torch.Tensor:
    """What the selection ranks (docs/design.md §3.2): this step's scores ("l2" or "rms"), their
    EMA (``score_ema``), then the blend with the blueprint's."""
    group, weight, layout = step.group, step.group["blueprint_weight"], step.view.layout
    if step.blueprint_scores is not None and weight == 1.0:
        return step.blueprint_scores  # the blueprint's own ranking: its to_mask()
    scores = scores_of(sqnorms, layout, group["score"])
    if group["score_ema"] > 0.0:
        scores = update_ema(step.states(), scores, layout, group["score_ema"], skip)
    if step.blueprint_scores is None or weight == 0.0:
        return scores  # exactly the selection without a blueprint
    return blend(step.blueprint_scores, scores, weight)


def _compact_slabs(step, block_ids: torch.Tensor, reselected: bool) -> dict:
    """The group's compact state, its slots reassigned to a new selection (staying blocks keep
    their moments, see :mod:`.compact_state`)."""
    group, state, view = step.group, step.state, step.compact_view
    slabs = state.compact
    if slabs is None:
        slabs = compact_state.create(view.compact_numels, group["block_size"], step.dtypes[0], view.device,
                                     step.moments)
        state.made_compact(slabs, view.compact_numels)
        reselected = True
    if reselected:
        ids = compact_state.group_ids(block_ids, step.all_numels, tuple(step.positions), group["block_size"])
        slabs = state.compact = compact_state.reassign(slabs, view.compact_ids(ids))
    return slabs
