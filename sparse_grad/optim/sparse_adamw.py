"""SparseAdamW: a drop-in for torch.optim.AdamW that updates only the blocks that matter.

The class keeps torch's optimizer contract (param groups, ``state``, ``state_dict``, hooks) and
little else: each step binds every param group (:mod:`.binding`: checked once, reused while a
cheap fingerprint holds) and runs the functional step (:mod:`.functional`) on it. Per-group
state (selection, compact slabs) lives in one :class:`~.group_state.GroupState` per group.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .. import backends
from ..layout import check_tensor
from . import binding, checkpoint, options
from .compact_grads import CompactGrad
from .functional import sparse_step
from .gradients import check_scaling
from .group_state import GroupState, Selection
from .overflow import Overflow
from .rules import ADAMW, UpdateRule
from .selection import reselection_due, selection_key
from .step_hooks import hook_step
from .step_plan import GroupPlan, group_plan, taking_part

__all__ = ["SparseAdamW", "SparseOptimizer"]

# The key of a saved param group that holds the group's own state (selection, compact slabs).
GROUP_STATE_KEY = "sparse_grad"


def _split_names(params: list) -> tuple[list, list[str] | None]:
    """Tensors and names of a group's params, given as tensors or ``named_parameters()`` pairs."""
    named = [isinstance(p, tuple) and len(p) == 2 for p in params]
    if any(named) and not all(named):  # a ValueError, as torch.optim raises for it
        raise ValueError("all params of a group must be given with names (named_parameters() pairs) or "
                         "all without")
    if params and all(named):
        return [p for _, p in params], [name for name, _ in params]
    return params, None


def _check_unique(tensors: list[torch.Tensor], where: str, groups: list[dict]) -> None:
    """A param listed twice (tied weights) would be stepped twice per step, and the native
    kernels, which update a group's params in parallel, would race on it: refused (torch
    only warns within a group)."""
    seen = {}
    for j, p in enumerate(tensors):
        if id(p) in seen:
            raise ValueError(f"{where}['params'][{j}] is the same tensor as {where}['params'][{seen[id(p)]}]: "
                             "list a shared (tied) parameter once")
        seen[id(p)] = j
    for i, group in enumerate(groups):
        for k, q in enumerate(group["params"]):
            if id(q) in seen:
                raise ValueError(f"{where}['params'][{seen[id(q)]}] is already in param_groups[{i}]['params'][{k}]: "
                                 "a parameter may belong to one param group only")


def _new_group_params(param_group, index: int) -> tuple[str, list, list[torch.Tensor], list[str] | None]:
    """An added param group's name in messages, its params as a list, their tensors and names
    (checked as torch's add_param_group checks them)."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else params
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections")
    params = list(params)
    return (f"param_groups[{index}]", params, *_split_names(params))


def _saved_parts(state_dict, num_groups: int) -> tuple[list, dict]:
    """A state dict's param groups and state, if it has the form state_dict() gives."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) \
            or not isinstance(state_dict.get("state"), dict):
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as state_dict() gives")
    if len(state_dict["param_groups"]) != num_groups:
        raise ValueError(f"state_dict has {len(state_dict['param_groups'])} param groups, the optimizer {num_groups}")
    return state_dict["param_groups"], state_dict["state"]


class SparseOptimizer(Optimizer):
    """What every sparse optimizer shares: torch's optimizer contract (param groups, ``state``,
    ``state_dict``, hooks), the binding of each group and the functional step; a subclass names
    its update rule (:mod:`.rules`) and its options. See :class:`SparseAdamW` for the options
    every sparse optimizer has."""

    _rule: UpdateRule

    # torch.amp.GradScaler.step then sets self.grad_scale / self.found_inf instead of unscaling
    # the grads itself: the update kernel unscales them and skips an overflowed step on device.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], blueprint: Any = None):
        if blueprint is not None and not callable(getattr(blueprint, "block_scores", None)):
            raise TypeError("blueprint must have a block_scores(params, names, block_size) method "
                            f"(a sparse_grad.blueprint.Blueprint), got {type(blueprint).__name__}")
        options.check_group(defaults, has_blueprint=blueprint is not None, rule=self._rule)
        self._blueprint = blueprint
        self._group_states: list[GroupState] = []
        self._score_hooks: OrderedDict[int, Callable] = OrderedDict()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; a copy (deepcopy, pickle, torch.save of
        # the optimizer) also needs the groups' selections and compact slabs, and the blueprint.
        # Score hooks are dropped, like torch's own step hooks; a pending overflow undo is applied.
        self._settle()
        state = super().__getstate__()
        state["group_states"] = [group_state.state_dict() for group_state in self._group_states]
        state["blueprint"] = self._blueprint
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved_states = state.pop("group_states", None)  # absent when load_state_dict calls this
        if "blueprint" in state:
            self._blueprint = state.pop("blueprint")
        super().__setstate__(state)
        self.__dict__.setdefault("_blueprint", None)
        self.__dict__.setdefault("_score_hooks", OrderedDict())
        self.__dict__.setdefault("_group_states", [])
        if saved_states is not None:
            self._group_states = [GroupState() for _ in saved_states]
            for group_state, saved in zip(self._group_states, saved_states):
                selection = saved.get("selection")
                group_state.set(None if selection is None else Selection(**selection), saved.get("compact"))
        self._group_states.extend(GroupState() for _ in range(len(self.param_groups) - len(self._group_states)))
        for group in self.param_groups:  # pickled before these options existed
            for key, value in self._rule.later_options.items():
                group.setdefault(key, value)

    def register_score_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(optimizer, group_index, params, scores, block_ids)`` after every group step.

        ``params`` are the group's params that took part (those with a grad), ``scores`` their
        fp32 block scores ``[num_blocks]`` (this step's sums of squares of the grads, before any
        blend with a blueprint) and ``block_ids`` the int64 ids of the blocks updated, all on the
        params' device; block ids follow :class:`~sparse_grad.BlockLayout` over ``params``.
        The hook must not modify them.

        Cost: while any score hook is registered, every step runs the norm pass, also where it
        would skip it (density 1.0, steps between reselections, ``blueprint_weight=1``): one
        extra read of the grads, about ``4 / (4 + 28 · density)`` of a step's memory traffic.

        Returns:
            a handle whose ``remove()`` unregisters the hook.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._score_hooks)
        self._score_hooks[handle.id] = hook
        return handle

    def selected_blocks(self) -> list[tuple[int, list[torch.Tensor], torch.Tensor, int]]:
        """The blocks each param group updates now: ``[(group_index, params, block_ids,
        block_size)]`` for every group that has made a selection (none before the first step).

        ``params`` are the group's params that took part in the selection (those with a grad
        then), ``block_ids`` the ascending int64 ids on their device, numbered by
        :class:`~sparse_grad.BlockLayout` over ``params`` with ``block_size``. Read-only views
        of the optimizer's own selection: do not modify them.
        """
        self._settle()
        selected = []
        for index, state in enumerate(self._group_states):
            selection = state.selection
            if selection is None:
                continue
            positions, block_size = selection.key[0], selection.key[1]
            params = [self.param_groups[index]["params"][j] for j in positions]
            selected.append((index, params, selection.block_ids, block_size))
        return selected

    def plan_next_step(self) -> list[GroupPlan]:
        """What the next ``step()`` will read of each param group's gradients, one
        :class:`~sparse_grad.optim.step_plan.GroupPlan` per group: whether it reselects, whether
        it reads every block's gradient (and why), else the selected blocks it reads. For code
        that computes only the gradients a step reads (``sparse_grad.nn.sparse_backward``).

        Ask after the last step and before the next one; the params that take part are those
        with a grad, or before any has one, those of the current selection. Changing a group's
        options or which params get a grad after asking may make the step reselect.
        """
        self._settle()
        hooked = bool(self._score_hooks)
        return [group_plan(i, group, state, hooked)
                for i, (group, state) in enumerate(zip(self.param_groups, self._group_states))]

    def compact_grad(self, index: int, params: list[torch.Tensor]) -> torch.Tensor:
        """The compact gradient of param group ``index`` that its next step reads for ``params``,
        for code that computes only the selected blocks' gradients
        (``sparse_grad.nn.sparse_backward(..., compact_grads=True)``; docs/design.md §11).

        Returns one slab ``[len(block_ids), block_size]`` (the ids of :meth:`plan_next_step`), in
        the params' dtype, zero when first asked after a step or ``zero_grad``: row ``i`` is the
        gradient of block ``block_ids[i]`` (a partial last block uses the front of its row).
        Add each param's selected blocks' gradient into its rows and leave its ``.grad`` None:
        the step takes ``params`` as having a gradient, adds the dense grads of the group's other
        params into their rows, reads the slab in the update kernel and drops it. The same slab
        is returned for every call until then (gradient accumulation adds into it).

        Raises ValueError (nothing changes) if the group's next step reads every block's
        gradient (a reselection, clipping, ...: ``plan_next_step`` says why), a param is not one
        the selection was made over, or the params do not share one dtype; TypeError for an
        optimizer whose update has no compact-grad form (only SparseAdamW's has).
        """
        if not self._rule.compact_grads:
            raise TypeError(f"{type(self).__name__}'s update does not read compact grads (SparseAdamW's does)")
        if not isinstance(index, int) or not 0 <= index < len(self.param_groups):
            raise ValueError(f"index must be a param group index in [0, {len(self.param_groups)}), got {index!r}")
        params = list(params)
        plan = self.plan_next_step()[index]
        if plan.reads_all:
            raise ValueError(f"param_groups[{index}]'s next step reads every block's gradient "
                             f"({plan.reason or 'no selection yet'}): it has no compact gradient")
        in_plan = {id(p) for p in plan.params}
        for j, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or id(p) not in in_plan:
                raise ValueError(f"params[{j}] is not one of the params param_groups[{index}]'s selection "
                                 "was made over")
        dtypes = {p.dtype for p in plan.params}
        if len(dtypes) != 1:
            raise ValueError(f"param_groups[{index}]'s params have dtypes {sorted(map(str, dtypes))}: a compact "
                             "gradient needs one dtype per group")
        state = self._group_states[index]
        compact = state.compact_grad
        if compact is None or compact.block_ids is not plan.block_ids:
            first = plan.params[0]
            slab = torch.zeros(plan.block_ids.numel(), plan.block_size, dtype=first.dtype, device=first.device)
            compact = state.compact_grad = CompactGrad(plan.block_ids, slab)
        compact.covered.update((id(p), p) for p in params)
        return compact.slab

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops the groups' compact gradients (:meth:`compact_grad`)."""
        super().zero_grad(set_to_none)
        for group_state in self._group_states:
            group_state.compact_grad = None

    @property
    def blueprint(self) -> Any:
        """The blueprint the selection blends in (``blueprint=``), or None."""
        return self._blueprint

    def group_state(self, index: int) -> GroupState:
        """The state of param group ``index`` beside its per-param state: its current selection
        and compact slabs (:class:`~sparse_grad.optim.group_state.GroupState`). For tools that
        save or rebuild it (``sparse_grad.distributed``); a step owns it otherwise."""
        self._settle()  # an overflowed step's undo must not land on state read or replaced here
        return self._group_states[index]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where, params, tensors, names = _new_group_params(param_group, len(self.param_groups))
        group = {**self.defaults, **param_group}
        options.check_group(group, where, self._blueprint is not None, self._rule)
        device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
        for j, p in enumerate(tensors):
            check_tensor(p, f"{where}['params'][{j}]", device, contiguous=False)
        _check_unique(tensors, where, self.param_groups)
        if self._blueprint is not None and group["blueprint_weight"] > 0.0 and tensors:
            self._blueprint.block_scores(tensors, names, group["block_size"])  # raises on a mismatch
        if device is not None:  # load the backend now (an import), not inside a compiled step
            backends.unavailable_reason(backends.resolve("auto", device) if group["backend"] == "auto"
                                        else group["backend"], device)
        super().add_param_group({**param_group, "params": params})
        self._group_states.append(GroupState())

    def _bind(self, index: int, group: dict) -> binding.BoundStep | None:
        """The group's bound step: the last one if its fingerprint holds, else a new one (checked
        in full). Writes nothing but the group's cache of it."""
        state = self._group_states[index]
        bound = state.bound
        if state.compact_grad is not None:  # params without a .grad take part: checked in full
            state.bound = None
            return binding.bind(index, group, state, self.state, self._blueprint, self._rule)
        if binding.reuse(bound, group, self.state):
            binding.check_hyper(bound, group, f"param_groups[{index}]")  # they may change on any step
            return bound
        bound = binding.bind(index, group, state, self.state, self._blueprint, self._rule)
        state.bound = bound if bound is not None and bound.reusable else None
        return bound

    @hook_step  # torch's hooks and profiler range, the range only under a profiler
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step over every param group; returns ``closure()``'s loss if given.

        Every group is checked before any parameter or state is written, so bad input leaves
        the optimizer and the model as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step (see _step_supports_amp_scaling), else absent.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        check_scaling(grad_scale, "grad_scale")
        check_scaling(found_inf, "found_inf")
        self._settle()
        hooks = list(self._score_hooks.values())
        for i, group_state in enumerate(self._group_states):
            if group_state.compact_grad is not None:
                self._check_compact_grad(i, grad_scale, found_inf)
        steps = [self._bind(i, group) for i, group in enumerate(self.param_groups)]
        overflow = Overflow.of(found_inf)
        for step in steps:
            if step is not None:
                sparse_step(step, grad_scale, found_inf, hooks, self, overflow)
                # Hold no grad past the step: after zero_grad(set_to_none=True) the next backward
                # can then reuse their memory, so the grads come back at the same addresses and
                # the bound step's kernel tables stay valid (else they are rebuilt every step).
                step.grads = None
        for group_state in self._group_states:
            if group_state.compact_grad is not None:  # (no setattr otherwise: a compiled step traces this)
                group_state.compact_grad = None  # read: the next backward starts a new one
        if overflow is not None:  # (none under torch.compile, whose dynamo 2.11 refuses a setattr here)
            self._overflow = overflow.close()
        for group_state in self._group_states:
            group_state.refresh()  # a state dict handed out before shows this step
        return loss

    def _check_compact_grad(self, index: int, grad_scale, found_inf) -> None:
        """A group's compact gradient must be what this step reads (nothing is written yet)."""
        compact = self._group_states[index].compact_grad
        where = f"param_groups[{index}]"
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                f"{where} has a compact gradient, but the step runs under torch.amp.GradScaler, whose inf/NaN "
                "check and unscale_ skip params whose .grad is None (the compact gradient would go unchecked and "
                "unscaled). The step was refused and changed nothing; use compact_grads=False with GradScaler "
                "(bf16 autocast needs no scaler)")
        plan = self.plan_next_step()[index]
        state = self._group_states[index]
        group = self.param_groups[index]
        if not plan.reads_all and reselection_due(state.selection, selection_key(group, taking_part(group, state)),
                                                  group):
            plan = replace(plan, reads_all=True, reason="the params with a gradient changed: the step reselects")
        if plan.reads_all or plan.block_ids is not compact.block_ids:
            why = plan.reason or "its selection changed"
            raise RuntimeError(
                f"{where} has a compact gradient of the selected blocks only, but the step would read all of "
                f"its gradient ({why}): an option, or which params have a grad, changed after the backward. "
                "The step was refused and changed nothing; call zero_grad() and run the backward again")
        in_plan = {id(p) for p in plan.params}
        if not in_plan.issuperset(compact.covered):
            raise RuntimeError(f"{where}'s compact gradient covers a param the selection was not made over; "
                               "the step was refused and changed nothing")
        if compact.slab.shape != (plan.block_ids.numel(), plan.block_size):
            raise RuntimeError(f"{where}'s compact gradient has shape {tuple(compact.slab.shape)}, the step reads "
                               f"{(plan.block_ids.numel(), plan.block_size)}: replaced by hand? The step was "
                               "refused and changed nothing")

    def _settle(self) -> None:
        """Undo the host-side changes of the last step if it overflowed (see .overflow): read
        before anything looks at or replaces the selection."""
        overflow = getattr(self, "_overflow", None)  # (not __dict__.pop: dynamo 2.11 cannot trace it)
        if overflow is not None:
            self._overflow = None
            overflow.settle()
            for group_state in self._group_states:
                group_state.refresh()

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; each saved param group also holds the group's own state under
        ``"sparse_grad"`` (its selection and compact slabs), so torch's checkpoint APIs and any
        framework that saves ``state`` and ``param_groups`` keep it. Like torch's, it holds the
        live state: a state dict kept across a step shows that step (take a copy to keep one)."""
        self._settle()
        state_dict = super().state_dict()
        for saved, group_state in zip(state_dict["param_groups"], self._group_states):
            saved[GROUP_STATE_KEY] = group_state.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checked in full before anything changes, so
        a state dict that loads also steps."""
        saved_groups, saved_state = _saved_parts(state_dict, len(self.param_groups))
        self._settle()
        own_dtypes, parts, groups = {}, [], []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            saved = options.saved_group(saved, self.defaults, where, self._rule.later_options)
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict's param group {i} has {len(saved['params'])} params, "
                                 f"the optimizer's {len(group['params'])}")
            options.check_group(saved, where, self._blueprint is not None, self._rule)
            stepped = False
            for j, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                if saved_id not in saved_state:
                    continue
                state = saved_state[saved_id]
                name = f"param_groups[{i}]['params'][{j}]"
                checkpoint.check_param_state(state, p, saved, name, self._rule)
                own_dtypes[p] = state
                stepped = stepped or bool(state)
            parts.append(self._loaded_group_state(state_dict, saved, group["params"], i, stepped))
            groups.append({key: value for key, value in saved.items() if key != GROUP_STATE_KEY})
        # Checked: write.
        super().load_state_dict({"state": saved_state, "param_groups": groups})
        # Optimizer.load_state_dict casts every state tensor to the param's dtype; the counts are
        # int32, and state_dtype / score EMAs may be fp32 beside 16-bit params: keep their dtypes.
        for p, state in own_dtypes.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for group_state, (selection, compact) in zip(self._group_states, parts):
            group_state.set(selection, compact)

    def _loaded_group_state(self, state_dict: dict, saved: dict, params: list, index: int,
                            stepped: bool) -> tuple[Selection | None, dict | None]:
        """A saved group's selection and compact slabs, checked against ``params``."""
        name = f"state_dict['param_groups'][{index}][{GROUP_STATE_KEY!r}]"
        part = saved.get(GROUP_STATE_KEY)
        if part is None:  # the layout before the group state moved into param_groups
            part = {key: state_dict[old][index] for key, old in (("selection", "selections"), ("compact", "compact"))
                    if index in state_dict.get(old, {})}
        if not isinstance(part, dict) or not set(part) <= {"selection", "compact"}:
            raise ValueError(f"{name} must be a dict with 'selection' and 'compact' entries, as state_dict() gives")
        selection = compact = None
        if "selection" in part:
            selection = checkpoint.loaded_selection(part["selection"], params, f"{name}['selection']")
        if "compact" in part:
            compact = checkpoint.loaded_compact(part["compact"], saved, params, index, f"{name}['compact']",
                                                self._rule)
            checkpoint.check_compact_selection(compact, selection, tuple(p.numel() for p in params),
                                               saved["block_size"], f"{name}['compact']")
        stepped = stepped or compact is not None
        if stepped and selection is None:
            raise ValueError(f"{name} has no selection, but the group has stepped: the state dict was cut "
                             "short (a resumed run would reselect early)")
        if saved["state_layout"] == "compact" and selection is not None and compact is None:
            raise ValueError(f"{name} has no compact state, but the group's state_layout is 'compact' and it "
                             "has stepped: its moments are missing")
        return selection, compact


class SparseAdamW(SparseOptimizer):
    r"""AdamW on the blocks with the largest gradients; at ``density=1.0`` it is ``torch.optim.AdamW``.

    Each param group's parameters are viewed flat and cut into blocks of ``block_size`` elements
    (docs/design.md §2). Per group, ``step()`` does::

        params with a grad → blocks numbered globally (params whose grad is None take no part)
        g = grad (+ error buffer, with error_feedback)
        if a reselection is due (every reselect_every steps, or the set of params with a grad,
        the block size, density, scope, score or min_blocks_per_tensor changed):
            scores = sum of squares of g over each block (score="rms": / block elements)
            scores = β · ema + (1 − β) · scores                     (score_ema = β > 0)
            scores = α · blueprint/Σ + (1 − α) · scores/Σ      (only with a blueprint, α > 0)
            (selection="random": scores = a hash of (seed, group, draw, block id) instead)
            ids    = the ceil(density · n) highest-scoring blocks, ties to the lower id;
                     scope="tensor": ceil(density · blocks of t) blocks of every tensor t;
                     each tensor gets at least min(min_blocks_per_tensor, its blocks)
            (density 1.0: all blocks, no pass over the grads unless a score hook or
            max_grad_norm wants them)
        c = min(1, max_grad_norm / (‖g‖ + 1e-6)) / loss scale  (a device scalar the kernel reads)
        for every selected block b, with per-block step count s_b += 1, g_b ← c · g_b:
            θ_b ← θ_b · (1 − lr·λ)
            m_b ← β₁ m_b + (1 − β₁) g_b
            v_b ← β₂ v_b + (1 − β₂) g_b²
            θ_b ← θ_b − lr / (1 − β₁^s_b) · m_b / (√v_b / √(1 − β₂^s_b) + ε)

    ``params`` may be ``model.named_parameters()`` (torch stores the names in each group's
    ``param_names``; a blueprint uses them). Score hooks (:meth:`register_score_hook`) see every
    step's block scores, e.g. for a :class:`sparse_grad.analysis.GradientMonitor`.

    Blocks not selected keep their parameters and moments bit for bit. Bias correction uses the
    block's own step count, so a block that was idle catches up like a freshly started AdamW.

    Args:
        params: iterable of parameters or param-group dicts; each group may set any of the
            options below.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``
            (``amsgrad=True`` is not supported).
        density: fraction of blocks updated per step, in (0, 1].
        block_size: elements per block (positive int; powers of two are fastest).
        scope: ``"global"`` (top blocks of the whole group) or ``"tensor"`` (of every tensor).
        reselect_every: reselect the blocks every this many steps; in between the same blocks
            are updated and no pass over the grads is made.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"`` or ``"cuda"`` (see
            :mod:`sparse_grad.ops`).
        blueprint: per-block scores from an earlier run that guide the selection, usually a
            :class:`sparse_grad.blueprint.Blueprint` (any object with a
            ``block_scores(params, names, block_size)`` method returning fp32 scores for those
            params' blocks). Parameters are matched by name: build the optimizer from
            ``model.named_parameters()``, or bind the blueprint first (``bp.bind(model)``).
            Checked when each param group is added (a mismatch names the parameter).
        blueprint_weight: α in [0, 1] (per group; default 0.5 with a blueprint, 0 without).
            Selection ranks ``α · b / Σb + (1 − α) · s / Σs``, where ``b`` are the blueprint's
            and ``s`` this step's block scores, each normalized to sum 1 over the group's blocks
            that take part, so both weigh the same whatever their scale. ``α = 0`` selects
            exactly as without a blueprint; ``α = 1`` selects from the blueprint alone (a fixed
            mask, equal to ``blueprint.to_mask``) and needs no norm pass. A new α takes effect
            at the next reselection.

        state_dtype: ``None`` (the param's dtype) or ``torch.float32`` (fp32 moments and error
            buffer beside bf16/fp16 params; no master copy of the params).
        score: ``"l2"`` (block sum of squares) or ``"rms"`` (mean square per element).
        score_ema: β in [0, 1): rank an EMA of the scores, updated at each reselection (0: off).
        min_blocks_per_tensor: every tensor keeps at least this many of its top blocks.
        error_feedback: keep the gradient of unselected blocks and add it to the next step's.
        max_grad_norm: clip the group's gradient like ``torch.nn.utils.clip_grad_norm_``, with
            the norm from the same norm pass and the coefficient applied inside the update kernel.
        state_layout: ``"dense"`` (moments like the params) or ``"compact"`` (moments only for
            the selected blocks, see :mod:`sparse_grad.optim.compact_state`).
        selection: ``"norm"`` (rank blocks by their scores, above) or ``"random"``: the same
            number of blocks, under the same scope and minima, drawn uniformly at random at
            each reselection — the control an informed selection must beat. No norm pass;
            ``score_ema`` must be 0 and a blueprint is not blended in.
        seed: the random draws' seed (``selection="random"``); draw ``r`` of group ``i`` hashes
            (seed, i, r, block id) on device, so a resumed run draws the same blocks.
        foreach, fused: accepted as in ``torch.optim.AdamW`` (configs that set them load
            unchanged) and stored in each param group; they choose nothing: every backend's
            step is already multi-tensor and fused (one norm pass, one selection and one update
            launch per group), and there is no per-tensor loop to fall back to.
        capturable: ``torch.optim.AdamW``'s flag for CUDA-graph capture. The ``triton`` and
            ``cuda`` backends never read device values on the host (step counts, ids and
            hyper-parameters stay on device), so their step is capturable whatever this flag
            says; ``capturable=True`` refuses ``backend="reference"``, whose step reads ids on
            the host.
        differentiable: must be False; ``True`` raises a ValueError (the step runs under
            ``torch.no_grad()`` in fused kernels, so there is no graph to differentiate).

    ``lr``, ``betas`` and ``weight_decay`` may be one-element tensors (read on device: a
    scheduler changing them neither syncs nor recompiles ``torch.compile(opt.step)``).
    Under ``torch.amp.GradScaler`` the kernels unscale the grads and an overflowed step changes
    nothing (``_step_supports_amp_scaling``).

    State per parameter (dense): ``exp_avg``, ``exp_avg_sq`` (like the parameter, in the state
    dtype) and ``block_step`` (int32, one count per block); with the options, ``score_ema``
    (fp32 per block) and ``error``. ``state_dict()`` also holds each group's current selection
    and compact state, so a run resumed mid-interval continues bit for bit.
    """


    _rule = ADAMW

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        density: float = 0.05,
        block_size: int = 4096,
        scope: str = "global",
        reselect_every: int = 1,
        backend: str = "auto",
        blueprint: Any = None,
        blueprint_weight: float | None = None,
        state_dtype: torch.dtype | None = None,
        score: str = "l2",
        score_ema: float = 0.0,
        min_blocks_per_tensor: int = 0,
        error_feedback: bool = False,
        max_grad_norm: float | None = None,
        state_layout: str = "dense",
        selection: str = "norm",
        seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        if amsgrad is not False:
            raise ValueError("amsgrad=True is not supported by SparseAdamW")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
                    **options.sparsity_options(density, block_size, scope, reselect_every, backend, blueprint,
                                               blueprint_weight, state_dtype, score, score_ema,
                                               min_blocks_per_tensor, error_feedback, max_grad_norm,
                                               state_layout, selection, seed),
                    "foreach": foreach, "fused": fused, "capturable": capturable, "differentiable": differentiable}
        super().__init__(params, defaults, blueprint)
