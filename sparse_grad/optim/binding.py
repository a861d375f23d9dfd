"""A param group's step, checked once and then bound (docs/design.md §9).

:func:`bind` checks a group in full (options, every param and grad, their state) without
writing anything, and returns a :class:`BoundStep`: the lists, layouts, counts and kernel caches
a step needs. :func:`reuse` answers, from a fingerprint that costs no Python call per tensor,
whether the bound step still describes the group:

    the group's param list (same list object, same length, the same param objects) and its shaping options
    (density, block_size, scope, ... : every option but the update's hyper-parameters),
    which params have a grad, the params' data pointers, shapes and contiguity, the
    optimizer's state mapping, and the group state (a load or clear drops the bound step).

With the extension ``sparse_grad._C`` the per-tensor part of the fingerprint is read in one C
call (``group_fingerprint``: on a GPU host about 0.3 us per param instead of several Python-level
accesses to each Parameter); without it, by C-level maps from Python. Same answers either way.

A grad re-allocated at another address is checked again (type, layout, dtype, device, shape,
contiguity, with C-level maps) and the kernel tables built from the old addresses are dropped;
any other change binds the group again, with the full check and its messages. The update's
hyper-parameters (lr, betas, eps, weight_decay) are checked on every step: they may change
on any step, and travel in the step's fp64 table.

Not bound (checked in full every step, as before binding existed): FSDP2-sharded groups,
groups with a non-contiguous grad (the step runs on a contiguous copy), and compiled steps.
Not seen: a grad replaced by another view of the same memory (same address, other strides),
and an entry of ``optimizer.state[p]`` replaced by hand; ``load_state_dict`` is the way to
replace state.
"""
from __future__ import annotations

from operator import attrgetter, is_

import torch

from .. import backends
from ..backends import native
from ..layout import cached_layout, check_tensor, num_blocks_of
from . import options, sharding
from .compact_state import check_compact
from .group_state import GroupState
from .group_view import PlainGroup
from .selection import Counts, selection_key

_data_ptr = torch.Tensor.data_ptr
_shape, _dtype, _device, _layout = attrgetter("shape"), attrgetter("dtype"), attrgetter("device"), attrgetter("layout")


class BoundStep:
    """A checked param group, ready to step; nothing has been written yet."""

    def __init__(self, index: int, group: dict, positions: list[int], params: list[torch.Tensor],
                 grads: list[torch.Tensor], view, backend: str, blueprint_scores: torch.Tensor | None,
                 state: GroupState, opt_state: dict, reusable: bool, rule, compact_view=None):
        self.index, self.group, self.state = index, group, state
        self.rule = rule  # the update (see .rules)
        self.moments = rule.moments(group)  # its state keys
        self.positions, self.params, self.grads = positions, params, grads
        self.view, self.backend = view, backend
        self.blueprint_scores = blueprint_scores  # fp32 [num_blocks] on device; None: no blend
        self.compact = group["state_layout"] == "compact"
        self.dtypes = [options.state_dtype(group, p) for p in params]
        self.counts = Counts.of(view.layout, group)
        # What a selection depends on besides the scores: a change of any of it reselects.
        self.selection_key = selection_key(group, positions)
        # The compact slot table counts blocks over all the group's params.
        self.compact_view = compact_view or view
        self.all_numels = tuple(p.numel() for p in group["params"])
        self.caches = {"norms": {}, "select": {}, "update": {}}  # kernel tables (see ops.unchecked)
        self.param_states: list[dict] | None = None  # filled on the first apply (it writes state)
        self.dense: tuple | None = None  # kernel lists of dense moments and counts, and all of them
        # The hyper-parameter objects last checked (rule.hyper_keys; bind checked them), kept
        # only when all are immutable numbers, and the table made from them (see check_hyper).
        self.checked_hyper = _immutable_values(group, rule)
        self.hyper_table: torch.Tensor | None = None
        self.errors: list[torch.Tensor] | None = None  # error-feedback buffers (local)
        track(self, group, params, grads, opt_state, reusable)

    def states(self) -> list[dict]:
        """The per-param state dicts of the params that take part (created empty if new)."""
        if self.param_states is None:
            self.param_states = [self.opt_state[p] for p in self.params]
        return self.param_states


def track(bound, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], opt_state: dict,
          reusable: bool) -> None:
    """Record on ``bound`` (a :class:`BoundStep`, or sparsify's bound group: anything with the
    ``positions``, ``params``, ``grads``, ``view`` and ``caches`` reuse() reads) what
    :func:`reuse` compares: the group as checked now."""
    bound.reusable = reusable
    bound.opt_state = opt_state
    bound.param_list = group["params"]
    bound.all_params = list(group["params"])  # the objects: one may be replaced in place
    bound.num_params = len(group["params"])
    bound.options = options.shaping_values(group)
    bound.has_grad = [p.grad is not None for p in group["params"]]
    bound.all_have_grads = all(bound.has_grad)
    # Of the group as checked now (so the next reuse() is already the one C call), then as
    # reuse() last checked it in full; None without the extension.
    fingerprint = _fingerprint(group["params"]) if reusable else None
    bound.fingerprint = None if fingerprint is None else fingerprint[0]
    if reusable:
        bound.param_ptrs = list(map(_data_ptr, params))
        bound.param_shapes = list(map(_shape, params))
        bound.grad_ptrs = list(map(_data_ptr, grads))
        bound.grad_shapes = list(map(_shape, grads))
        bound.grad_dtypes = list(map(_dtype, grads))


def _native_fingerprint():
    """``sparse_grad._C.group_fingerprint`` where the extension loads, else None (then the
    maps of :func:`reuse` do the same work in Python)."""
    return native.extension_function("group_fingerprint")


def _fingerprint(params: list) -> tuple[bytes, list] | None:
    """``group_fingerprint(params)``: (bytes, grads), or None without the extension or where a
    tensor needs the full check."""
    fingerprint_of = _native_fingerprint()
    return None if fingerprint_of is None else fingerprint_of(params)


def reuse(bound: BoundStep | None, group: dict, opt_state: dict) -> bool:
    """Whether ``bound`` still describes ``group``; if only grads moved, it is updated to them.

    With the extension, one C call fingerprints the group (each param's object, address, shape
    and contiguity; each grad's presence, address, shape, contiguity, dtype, device and type):
    the same bytes as when the checks below last passed mean they pass again."""
    if (bound is None or not bound.reusable or group["params"] is not bound.param_list
            or len(group["params"]) != bound.num_params or opt_state is not bound.opt_state
            or options.shaping_values(group) != bound.options):
        return False
    fingerprint = _fingerprint(group["params"])
    if fingerprint is not None and fingerprint[0] == bound.fingerprint:
        bound.grads = fingerprint[1]
        return True
    bound.fingerprint = None
    if not all(map(is_, group["params"], bound.all_params)):
        return False
    grads = [p.grad for p in group["params"]]
    if not bound.all_have_grads:  # (when all had one, a None now fails the pointer map below)
        if bound.has_grad != [g is not None for g in grads]:
            return False
        grads = [grads[j] for j in bound.positions]
    params = bound.params  # a param's .data may be replaced (another address, shape or layout)
    try:
        ptrs = list(map(_data_ptr, grads))
        if (list(map(_data_ptr, params)) != bound.param_ptrs or list(map(_shape, params)) != bound.param_shapes
                or not all(map(torch.Tensor.is_contiguous, params))):
            return False
    except (RuntimeError, TypeError):  # a grad gone (None), or without storage: the full check says
        return False
    if ptrs != bound.grad_ptrs:
        if not _grads_fit(grads, bound):
            return False  # bind again: the full check says what is wrong
        bound.grad_ptrs = ptrs
        bound.caches["norms"].clear()
        bound.caches["update"].clear()
    bound.grads = grads
    bound.fingerprint = None if fingerprint is None else fingerprint[0]
    return True


def check_hyper(bound: BoundStep, group: dict, where: str) -> None:
    """``bound.rule.check_hyper`` on a reused step, skipped when the group holds the very objects
    that passed last time and each is an immutable number or a tuple of them (a scheduler's new
    float ``lr`` is a new object: checked; a tensor ``lr`` may change in place: always checked)."""
    if bound.checked_hyper is not None and all(map(is_, map(group.get, bound.rule.hyper_keys),
                                                   bound.checked_hyper)):
        return
    bound.checked_hyper = bound.hyper_table = None
    bound.rule.check_hyper(group, where)
    bound.checked_hyper = _immutable_values(group, bound.rule)


def _immutable_values(group: dict, rule) -> tuple | None:
    """The group's values of ``rule.hyper_keys`` if every one is an immutable number (or a
    tuple of them), else None."""
    values = tuple(map(group.get, rule.hyper_keys))
    return values if all(map(_immutable_number, values)) else None


def _immutable_number(value) -> bool:
    return type(value) in _NUMBERS or (type(value) is tuple and all(type(v) in _NUMBERS for v in value))


_NUMBERS = (float, int)  # exactly: a bool is refused by the checks, a subclass may be mutable


def _grads_fit(grads: list[torch.Tensor], bound: BoundStep) -> bool:
    """The checks of :func:`bind` on new grads, without a Python call per tensor."""
    device = bound.view.device
    return (set(map(type, grads)) == {torch.Tensor} and set(map(_layout, grads)) == {torch.strided}
            and set(map(_device, grads)) == {device} and list(map(_dtype, grads)) == bound.grad_dtypes
            and list(map(_shape, grads)) == bound.grad_shapes and all(map(torch.Tensor.is_contiguous, grads)))


def bind(index: int, group: dict, state: GroupState, opt_state: dict, blueprint, rule) -> BoundStep | None:
    """Check one group and what stepping it needs, without writing anything; None if no param
    of the group has a grad. ``rule``: the optimizer's update rule (:mod:`.rules`)."""
    where = f"param_groups[{index}]"
    options.check_group(group, where, blueprint is not None, rule)
    positions, params, grads = [], [], []
    device = None
    # Params whose gradient is in the group's compact slab take part without a .grad (their
    # entry in grads is None, or a dense grad the step adds to the slab).
    covered = {} if state.compact_grad is None else state.compact_grad.covered
    reusable = not torch.compiler.is_compiling() and not covered
    for j, p in enumerate(group["params"]):
        if p.grad is None and id(p) not in covered:
            continue
        name = f"{where}['params'][{j}]"
        if device is None:
            device = p.device
        check_tensor(p, name, device, contiguous=False)  # a strided param steps on a contiguous copy
        reusable = reusable and p.is_contiguous()
        if p.grad is None:
            _check_param_state(opt_state.get(p, {}), p, group, where, name)
            positions.append(j)
            params.append(p)
            grads.append(None)
            continue
        if p.grad.layout != torch.strided:
            raise TypeError(f"{name}.grad is sparse; SparseAdamW needs dense gradients")
        grad = p.grad.contiguous()
        reusable = reusable and grad is p.grad
        check_tensor(grad, f"{name}.grad", device)
        if grad.shape != p.shape:  # .grad.data replaced by hand: the kernels would read past it
            raise ValueError(f"{name}.grad has shape {tuple(grad.shape)}, but the parameter has {tuple(p.shape)}")
        if sharding.is_dtensor(p):  # the kernels run on the local shards (see .sharding)
            grad = grad.to_local() if sharding.is_dtensor(grad) else grad
        _check_param_state(opt_state.get(p, {}), p, group, where, name)
        positions.append(j)
        params.append(p)
        grads.append(grad)
    if not params:
        return None
    _check_block_size(state, group, opt_state, where)
    sharded = sharding.of_params(params, where, positions, group["block_size"])
    if sharded is not None and covered:
        raise ValueError(f"{where} is sharded (DTensor params): it cannot have a compact gradient")
    if sharded is not None:
        device = sharded.device
        view = sharded
        reusable = False
    else:
        layout = cached_layout(tuple(p.numel() for p in params), group["block_size"], device)
        view = PlainGroup(layout, tuple(p.numel() for p in group["params"]))
    # All the group's params, sharded (compact state counts blocks over all): made once here.
    whole = None
    if sharded is not None or (state.compact is not None and group["state_layout"] == "compact"):
        whole = sharding.whole_group(group["params"], group["block_size"], where)
    if state.compact is not None and group["state_layout"] == "compact":
        numels = whole.compact_numels if whole is not None else [p.numel() for p in group["params"]]
        made_for = state.compact_numels()
        if list(made_for) != list(numels):
            raise ValueError(f"{where}'s compact state was made for params of {list(made_for)} elements, "
                             f"its params now have {list(numels)} (resized by hand?)")
    check_compact(state.compact, group, where, whole)
    backend = backends.resolve(group["backend"], device)
    blueprint_scores = _blueprint_scores(blueprint, state, index, group, positions, params)
    return BoundStep(index, group, positions, params, grads, view, backend, blueprint_scores, state, opt_state,
                     reusable, rule, whole)


def _check_block_size(state: GroupState, group: dict, opt_state: dict, where: str) -> None:
    """Dense per-block counts made with another block size may still number as many blocks (12
    elements are 3 blocks of 4 or of 5): the group's selection remembers the size they were made
    with."""
    selection = state.selection
    if (selection is None or selection.key[1] == group["block_size"] or group["state_layout"] != "dense"
            or not any("block_step" in opt_state.get(p, ()) for p in group["params"])):
        return
    raise ValueError(f"{where}['block_size'] is {group['block_size']}, but the group's state was made "
                     f"with block_size {selection.key[1]}")


def _check_param_state(state: dict, p: torch.Tensor, group: dict, where: str, name: str) -> None:
    """The param's state against its current size (``p.data`` may have been replaced by hand):
    counted in elements, not only blocks."""
    if "block_step" in state and group["state_layout"] == "compact":
        raise ValueError(f"{where}['state_layout'] is 'compact', but {name} has dense state")
    moments = [key for key in state if key not in ("block_step", "score_ema", "error")]
    for key in (*moments, "error"):
        if key in state and state[key].shape != p.shape:
            raise ValueError(f"the state of {name} was made for shape {tuple(state[key].shape)}, the "
                             f"parameter has {tuple(p.shape)} (resized by hand?)")
    blocks = num_blocks_of(p.numel(), group["block_size"])
    if "block_step" in state and state["block_step"].numel() != blocks:
        raise ValueError(f"{where}['block_size'] is {group['block_size']}, but the state of "
                         f"{name} was made with another block size")
    if "score_ema" in state and state["score_ema"].numel() != blocks:
        raise ValueError(f"the score_ema of {name} has {state['score_ema'].numel()} blocks, the parameter "
                         f"{blocks} (resized by hand, or block_size changed?)")
    for key in moments[:1]:
        if state[key].dtype != options.state_dtype(group, p):
            raise ValueError(f"{where}['state_dtype'] is {group['state_dtype']}, but the state of "
                             f"{name} is {state[key].dtype}")


def _blueprint_scores(blueprint, state: GroupState, index: int, group: dict, positions: list[int],
                      params: list[torch.Tensor]) -> torch.Tensor | None:
    """The blueprint's scores for these params' blocks, on their device (cached per params taking
    part and block size, so a step copies nothing to the device)."""
    if blueprint is None or group["blueprint_weight"] == 0.0:
        return None
    key = (tuple(positions), group["block_size"])
    if key not in state.blueprint_scores:
        names = group.get("param_names")
        names = None if names is None else [names[j] for j in positions]
        scores = blueprint.block_scores(params, names, group["block_size"])
        expected = sum(num_blocks_of(p.numel(), group["block_size"]) for p in params)
        if not isinstance(scores, torch.Tensor) or scores.shape != (expected,):
            raise ValueError(f"blueprint.block_scores returned {type(scores).__name__} "
                             f"{tuple(getattr(scores, 'shape', ()))} for param_groups[{index}], "
                             f"expected a tensor of {expected} block scores")
        state.blueprint_scores[key] = scores.to(device=params[0].device, dtype=torch.float32)
    return state.blueprint_scores[key]
