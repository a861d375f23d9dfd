"""``sparse_grad.sparsify``: any elementwise torch.optim optimizer, updating only the selected
blocks (docs/design.md §10).

The returned :class:`SparsifiedOptimizer` selects blocks exactly as SparseAdamW does (the same
norm pass, selection and group state: :func:`.functional._select`) and then runs the wrapped
optimizer's own functional update on those blocks only (:mod:`.torch_rules`). It takes the
wrapped optimizer over: its param groups (with their options, as a scheduler sees them) become
the wrapper's, and the wrapper keeps its own state.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .. import backends
from ..layout import cached_layout, check_tensor, num_blocks_of
from . import binding, checkpoint, compact_state, options, sharding, torch_rules
from .functional import _select
from .group_state import GroupState, Selection
from .group_view import PlainGroup
from .selection import Counts
from .step_hooks import hook_step
from .sparse_adamw import GROUP_STATE_KEY, _check_unique, _new_group_params, _saved_parts

__all__ = ["SparsifiedOptimizer", "sparsify"]

# sparsify's own options, added to every param group beside the wrapped optimizer's.
SPARSIFY_DEFAULTS = {"density": 0.05, "block_size": 4096, "scope": "global", "reselect_every": 1,
                     "state_layout": "dense", "selection": "norm", "backend": "auto", "seed": 0, "score": "l2",
                     "min_blocks_per_tensor": 0}
# What the shared selection reads that sparsify does not offer (SparseAdamW's blueprint, score
# EMA and clipping): fixed off. Clip with torch.nn.utils.clip_grad_norm_ as for the unwrapped one.
_SELECTION_FIXED = {"blueprint_weight": 0.0, "score_ema": 0.0, "max_grad_norm": None}


def sparsify(optimizer: Optimizer, *, density: float = 0.05, block_size: int = 4096, scope: str = "global",
             reselect_every: int = 1, state_layout: str = "dense", selection: str = "norm", backend: str = "auto",
             seed: int = 0, score: str = "l2", min_blocks_per_tensor: int = 0) -> "SparsifiedOptimizer":
    """Wrap ``optimizer`` (SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam or RAdam) so that each
    step updates only the ``density`` fraction of blocks with the largest gradients.

    The options are SparseAdamW's (docs/design.md §3) and may be set per param group
    (``add_param_group``, or by editing ``param_groups``). ``state_layout="compact"`` keeps the
    wrapped optimizer's state for the selected blocks only (memory ∝ density; a block entering
    the selection starts afresh, docs/design.md §4, §10).
    The wrapped optimizer must not have stepped yet; step, schedule and checkpoint the returned
    optimizer from then on, not the wrapped one.
    """
    return SparsifiedOptimizer(optimizer, density=density, block_size=block_size, scope=scope,
                               reselect_every=reselect_every, state_layout=state_layout, selection=selection,
                               backend=backend, seed=seed, score=score, min_blocks_per_tensor=min_blocks_per_tensor)


class _Bound:
    """A checked param group's step (what the shared selection, :func:`.functional._select`, and
    the update read), kept while :func:`.binding.reuse` finds the group unchanged: then a step
    checks nothing per tensor (docs/design.md §9, §10)."""

    blueprint_scores = None  # sparsify has no blueprint

    def __init__(self, index: int, group: dict, positions: list[int], params: list[torch.Tensor],
                 grads: list[torch.Tensor], state: GroupState, opt_state: dict, rule: torch_rules.UpdateRule):
        device = params[0].device
        self.index, self.state = index, state
        self.positions, self.params, self.grads = positions, params, grads
        self.all_numels = tuple(p.numel() for p in group["params"])
        layout = cached_layout(tuple(p.numel() for p in params), group["block_size"], device)
        self.view = PlainGroup(layout, self.all_numels)
        self.group = {**group, **_SELECTION_FIXED}
        self.counts = Counts.of(layout, self.group)
        self.selection_key = (tuple(positions), group["block_size"], group["density"], group["scope"],
                              group["score"], group["min_blocks_per_tensor"], group["selection"], group["seed"])
        self.backend = backends.resolve(group["backend"], device)
        self.compact = group["state_layout"] == "compact"
        self.state_keys = rule.state_keys(group)  # options outside the shaping ones change them
        self.caches = {"norms": {}, "select": {}, "update": {}}  # kernel tables, valid while bound
        self.states: list[dict] | None = None  # the params' state dicts, made on the first step
        self.step_counts: list[torch.Tensor] | None = None  # dense: the params' block_step vectors
        self.mu_products: list[torch.Tensor] | None = None
        # Not under torch.compile (the step is kept out of it, see NOT_COMPILED), and only
        # contiguous grads: a copy made by .contiguous() is new every step.
        reusable = not torch.compiler.is_compiling() and all(g is p.grad for g, p in zip(grads, params))
        binding.track(self, group, params, grads, opt_state, reusable)


class SparsifiedOptimizer(Optimizer):
    """A torch.optim optimizer that updates only the selected blocks (see :func:`sparsify`).

    Per param group and step: the blocks are (re)selected as in SparseAdamW; the selected blocks
    of params, grads and state are gathered into compact buffers (a view where the blocks are one
    run of memory), torch's functional implementation of the wrapped class runs on them with the
    group's options, and the results are scattered back. Unselected blocks keep params and state
    bit for bit. Per-tensor scalars of torch's state (the step count; NAdam's ``mu_product``) are
    kept per block (``block_step``, ``block_mu_product``), so bias corrections follow each block's
    own updates. State per param (``state_layout="dense"``): the wrapped optimizer's buffers, like
    the param, and those; ``"compact"``: per group, slabs of those buffers for the selected
    blocks only, with per-slot counts (:mod:`.compact_state`).
    """

    def __init__(self, optimizer: Optimizer, **sparsify_options: Any):
        rule = torch_rules.rule_of(optimizer)
        # (Adagrad makes its state, at step 0, in its constructor.)
        if any(state and float(state.get("step", 1)) > 0 for state in optimizer.state.values()):
            raise ValueError(f"optimizer ({type(optimizer).__name__}) has already stepped: sparsify a fresh "
                             "optimizer (its per-tensor step counts cannot become per-block ones)")
        unknown = set(sparsify_options) - set(SPARSIFY_DEFAULTS)
        if unknown:
            raise TypeError(f"sparsify got an unexpected option {sorted(unknown)[0]!r}")
        defaults = {**optimizer.defaults, **SPARSIFY_DEFAULTS, **sparsify_options}
        self._rule = rule
        self._wrapped_class = type(optimizer)
        self._group_states: list[GroupState] = []
        self._check_options(defaults, "")
        super().__init__([dict(group) for group in optimizer.param_groups], defaults)

    @property
    def wrapped_class(self) -> type:
        """The torch.optim class whose update runs on the selected blocks."""
        return self._wrapped_class

    def _check_options(self, group: dict, where: str) -> None:
        options.check_selection(group, where)
        name = options.namer(where)
        if group.get("differentiable", False):
            raise ValueError(f"{name('differentiable')}=True is not supported by sparsify: the update runs on "
                             "gathered copies, which autograd cannot see through")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where, params, tensors, _ = _new_group_params(param_group, len(self.param_groups))
        self._check_options({**self.defaults, **param_group}, where)
        device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
        for j, p in enumerate(tensors):
            _check_param(p, f"{where}['params'][{j}]", device)
        _check_unique(tensors, where, self.param_groups)
        backend = param_group.get("backend", self.defaults["backend"])
        if device is not None:  # load the backend now (an import), not inside a step
            backends.unavailable_reason(backends.resolve("auto", device) if backend == "auto" else backend, device)
        super().add_param_group({**param_group, "params": params})
        self._group_states.append(GroupState())

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; a copy also needs the wrapped class (its
        # rule is looked up again: it holds lambdas, which pickle cannot copy) and the selections.
        state = super().__getstate__()
        state["group_states"] = [group_state.state_dict() for group_state in self._group_states]
        state["wrapped_class"] = self._wrapped_class
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved_states = state.pop("group_states", None)
        if "wrapped_class" in state:
            self._wrapped_class = state.pop("wrapped_class")
            self._rule = torch_rules.RULES[self._wrapped_class]
        super().__setstate__(state)
        if saved_states is not None:
            self._group_states = [GroupState() for _ in saved_states]
            for group_state, saved in zip(self._group_states, saved_states):
                selection = saved.get("selection")
                group_state.set(None if selection is None else Selection(**selection), saved.get("compact"))

    def selected_blocks(self) -> list[tuple[int, list[torch.Tensor], torch.Tensor, int]]:
        """As :meth:`SparseAdamW.selected_blocks`: ``[(group_index, params, block_ids, block_size)]``."""
        selected = []
        for index, state in enumerate(self._group_states):
            if state.selection is not None:
                positions, block_size = state.selection.key[0], state.selection.key[1]
                params = [self.param_groups[index]["params"][j] for j in positions]
                selected.append((index, params, state.selection.block_ids, block_size))
        return selected

    def _check_group(self, index: int, group: dict) -> tuple | None:
        """The group's params with a grad, checked with their state; None if none has a grad.
        Writes nothing."""
        where = f"param_groups[{index}]"
        self._check_options(group, where)
        positions, params, grads = [], [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = f"{where}['params'][{j}]"
            _check_param(p, name, params[0].device if params else None)
            grad = p.grad
            if grad.layout != torch.strided:
                raise TypeError(f"{name}.grad is sparse; sparsify needs dense gradients")
            check_tensor(grad, f"{name}.grad", p.device, contiguous=False)
            if grad.shape != p.shape:
                raise ValueError(f"{name}.grad has shape {tuple(grad.shape)}, but the parameter has {tuple(p.shape)}")
            _check_state(self.state.get(p, {}), p, group, name)
            positions.append(j)
            params.append(p)
            grads.append(grad.contiguous())
        _check_compact(self._group_states[index], group, where)
        return (positions, params, grads) if params else None

    def _bind(self, index: int, group: dict) -> _Bound | None:
        """The group's bound step: the last one while nothing it depends on changed (one
        fingerprint, no Python call per tensor), else the group checked in full and bound again."""
        state = self._group_states[index]
        bound = state.bound
        if (bound is not None and bound.state_keys == self._rule.state_keys(group)
                and binding.reuse(bound, group, self.state)):
            bound.group = {**group, **_SELECTION_FIXED}  # the update's options may change on any step
            return bound
        state.bound = None
        parts = self._check_group(index, group)
        if parts is None:
            return None
        bound = state.bound = _Bound(index, group, *parts, state, self.state, self._rule)
        return bound

    @hook_step  # torch's hooks and profiler range, the range only under a profiler
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step over every param group; returns ``closure()``'s loss if given. Every group
        is checked before anything is written. Never traced by ``torch.compile``: a compiled
        ``opt.step`` runs it eagerly (:data:`NOT_COMPILED` says why)."""
        return _eager_step(self, closure)

    def _step(self, closure: Callable[[], Any] | None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bounds = [self._bind(i, group) for i, group in enumerate(self.param_groups)]
        for group, bound in zip(self.param_groups, bounds):
            if bound is not None:
                self._step_group(group, bound)
                bound.grads = None  # as SparseAdamW: zero_grad(set_to_none=True) then frees them
        for group_state in self._group_states:
            group_state.refresh()
        return loss

    def _step_group(self, group: dict, bound: _Bound) -> None:
        rule = self._rule
        if bound.states is None and not bound.compact:  # (compact: no per-param state at all)
            bound.states = [self.state[p] for p in bound.params]
            for p, state, blocks in zip(bound.params, bound.states, bound.view.layout.block_counts):
                torch_rules.init_state(rule, state, p, group, blocks)
            bound.step_counts = [state["block_step"] for state in bound.states]
            if rule.per_slot(group):
                bound.mu_products = [state["block_mu_product"] for state in bound.states]
        block_ids, _, reselected = _select(bound, bound.grads, None, None, False)
        compact = self._compact_state(bound, group, block_ids, reselected) if bound.compact else None
        selected = self._selected(bound, block_ids, compact)
        torch_rules.apply(rule, group, bound.params, bound.grads, selected, self._scalars(bound, block_ids, compact))
        torch_rules.count_steps(selected, bound.compact)

    def _compact_state(self, bound: _Bound, group: dict, block_ids: torch.Tensor, reselected: bool) -> dict:
        """The group's compact state, its slots reassigned to a new selection (the policy of
        :mod:`.compact_state`: staying blocks keep their state and counts, entering ones start
        as the wrapped optimizer starts a param)."""
        state, rule, block_size = bound.state, self._rule, group["block_size"]
        slabs = state.compact
        if slabs is None:
            slabs = compact_state.create(list(bound.all_numels), block_size, bound.params[0].dtype,
                                         bound.view.device, rule.moments(group), rule.per_slot(group))
            state.made_compact(slabs, list(bound.all_numels))
            reselected = True
        fresh = rule.fresh(group)
        for key in bound.state_keys:  # a buffer an option asks for since the last step (momentum > 0)
            if key not in slabs:
                capacity = slabs["block_of_slot"].numel()
                slabs[key] = torch.full((capacity, block_size), fresh.get(key, 0.0),
                                        dtype=bound.params[0].dtype, device=bound.view.device)
        if reselected:
            ids = compact_state.group_ids(block_ids, bound.all_numels, tuple(bound.positions), block_size)
            slabs = state.compact = compact_state.reassign(slabs, ids, fresh)
        return slabs

    def _selected(self, bound: _Bound, block_ids: torch.Tensor, compact: dict | None) -> torch_rules.Selected:
        """Where the selected blocks live (:class:`.torch_rules.Selected`), made once per
        selection from one read of the ids to the host (a sync on CUDA), with a constant number
        of Python calls: no loop over the group's tensors."""
        caches = bound.state.caches
        cached = caches.get("selected")
        if cached is not None and cached[0] is block_ids and cached[1] is bound and cached[2] is compact:
            return cached[3]
        offsets, ids = bound.view.layout.block_offsets, block_ids.cpu()
        tensor_of = torch.searchsorted(offsets, ids, right=True) - 1
        local = (ids - offsets[tensor_of]).tolist()
        tensors, sizes = torch.unique_consecutive(tensor_of, return_counts=True)
        stops = sizes.cumsum(0).tolist()
        spans = list(zip(tensors.tolist(), [0, *stops[:-1]], stops))
        if compact is None:
            selected = torch_rules.Selected(spans, local, bound.states, local)
        else:  # slot i holds the i-th selected block
            selected = torch_rules.Selected(spans, local, [compact] * len(bound.params), list(range(len(local))))
        caches["selected"] = (block_ids, bound, compact, selected)
        return selected

    def _scalars(self, bound: _Bound, block_ids: torch.Tensor, compact: dict | None) -> list[tuple]:
        """Each selected block's (step count, mu_product), in selection order: one read to the
        host per step (a sync on CUDA), for all the group's tensors at once."""
        if compact is not None:
            steps = compact["block_step"].tolist()
            mus = compact["block_mu_product"].tolist() if "block_mu_product" in compact else None
        else:
            ids = block_ids.to(bound.step_counts[0].device)
            steps = torch.cat(bound.step_counts).index_select(0, ids).tolist()
            mus = None if bound.mu_products is None else torch.cat(bound.mu_products).index_select(0, ids).tolist()
        return list(zip(steps, mus if mus is not None else itertools.repeat(None)))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; each saved param group also holds its selection under
        ``"sparse_grad"``, as SparseAdamW's does (docs/design.md §4)."""
        state_dict = super().state_dict()
        for saved, group_state in zip(state_dict["param_groups"], self._group_states):
            saved[GROUP_STATE_KEY] = group_state.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checked in full before anything changes."""
        saved_groups, saved_state = _saved_parts(state_dict, len(self.param_groups))
        own, selections, groups = {}, [], []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"{where} must be a dict with the group's 'params'")
            missing = [key for key in self.defaults if key not in saved]
            if missing:
                raise ValueError(f"{where} has no {missing[0]!r} option: it was not saved by a sparsified "
                                 f"{self._wrapped_class.__name__}")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict's param group {i} has {len(saved['params'])} params, "
                                 f"the optimizer's {len(group['params'])}")
            self._check_options(saved, where)
            stepped = False
            for j, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                if saved_id in saved_state:
                    state = saved_state[saved_id]
                    _check_state(state, p, saved, f"param_groups[{i}]['params'][{j}]", self._rule)
                    own[p] = state
                    stepped = stepped or bool(state)
            part = saved.get(GROUP_STATE_KEY, {})
            name = f"{where}[{GROUP_STATE_KEY!r}]"
            if not isinstance(part, dict) or not set(part) <= {"selection", "compact"}:
                raise ValueError(f"{name} must be a dict with 'selection' and 'compact' entries, as state_dict() gives")
            selection = compact = None
            if "selection" in part:
                selection = checkpoint.loaded_selection(part["selection"], group["params"], f"{name}['selection']")
            if "compact" in part:
                compact = checkpoint.loaded_compact(part["compact"], {**saved, "state_dtype": None}, group["params"],
                                                    i, f"{name}['compact']", self._rule, self._rule.per_slot(saved))
                checkpoint.check_compact_selection(compact, selection, tuple(p.numel() for p in group["params"]),
                                                   saved["block_size"], f"{name}['compact']")
            stepped = stepped or compact is not None
            if selection is None and stepped:
                raise ValueError(f"{name} has no selection, but the group has stepped: the state dict was cut short")
            if saved["state_layout"] == "compact" and selection is not None and compact is None:
                raise ValueError(f"{name} has no compact state, but the group's state_layout is 'compact' and it "
                                 "has stepped: the state dict was cut short")
            selections.append((selection, compact))
            groups.append({key: value for key, value in saved.items() if key != GROUP_STATE_KEY})
        # Checked: write.
        super().load_state_dict({"state": saved_state, "param_groups": groups})
        # Optimizer.load_state_dict casts every state tensor to the param's dtype: the per-block
        # counts are int32 and the mu_products keep torch's scalar dtype.
        for p, state in own.items():
            for key, value in state.items():
                self.state[p][key] = value.to(device=p.device, copy=True)
        for group_state, (selection, compact) in zip(self._group_states, selections):
            group_state.set(selection, compact)


# Why dynamo is kept out of the step (docs/design.md §10): tracing it broke inside dynamo's guards
# (torch 2.13) around its host reads, and a graph broken at every read would gain nothing.
NOT_COMPILED = ("sparsify's step reads the selected blocks' ids and step counts on the host to group "
                "them, so it runs eagerly: compile the model, not opt.step")
_eager_step = torch.compiler.disable(SparsifiedOptimizer._step, reason=NOT_COMPILED)


def _check_param(p, name: str, device: torch.device | None) -> None:
    """A param sparsify can step: dense, real floating and contiguous (its blocks are gathered
    from its flat view), on the group's device, and not an FSDP2 shard (whose blocks would be
    selected per rank)."""
    check_tensor(p, name, device)
    if sharding.is_dtensor(p):
        raise ValueError(f"{name} is a DTensor (FSDP2): sparsify does not step sharded params; use SparseAdamW")


def _check_state(state: dict, p: torch.Tensor, group: dict, name: str, rule=None) -> None:
    """A param's state against the param (``p.data`` may be resized by hand) and, for a saved
    state (``rule`` given), against what the rule keeps under the saved group's options."""
    if state and group["state_layout"] == "compact":
        raise ValueError(f"the state of {name} is per param, but its group's state_layout is 'compact' (its "
                         "state lives in the group's slabs)")
    blocks = num_blocks_of(p.numel(), group["block_size"])
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the state of {name}: its {key} must be a tensor, got {type(value).__name__}")
        per_block = key in torch_rules.BLOCK_KEYS.values()
        if per_block and value.shape != (blocks,):
            raise ValueError(f"the state of {name}: its {key} has shape {tuple(value.shape)}, expected ({blocks},) "
                             f"(block_size {group['block_size']}; changed, or the param resized?)")
        if not per_block and value.shape != p.shape:
            raise ValueError(f"the state of {name}: its {key} has shape {tuple(value.shape)}, the parameter "
                             f"{tuple(p.shape)} (resized by hand?)")
    if rule is None:
        return
    known = {*rule.state_keys(group), "block_step", *(("block_mu_product",) if "mu_product" in rule.lists else ())}
    for key, value in state.items():
        if key not in known:
            raise ValueError(f"state_dict does not fit {name}: unknown state {key!r} for these options")
        if key == "block_step":
            if value.dtype != torch.int32:
                raise ValueError(f"state_dict does not fit {name}: its block_step is {value.dtype}, expected int32")
            checkpoint.check_counts(value, f"the state of {name}: its block_step")
        elif key in torch_rules.SQUARES:
            checkpoint.check_second_moment(value, f"the state of {name}: its {key}")
    if state and "block_step" not in state:
        raise ValueError(f"state_dict does not fit {name}: its state has no block_step")


def _check_compact(state: GroupState, group: dict, where: str) -> None:
    """A group's compact state (or its absence) against its layout, params and block size. A
    compact group keeps one state dtype, its params' (torch keeps state like the param)."""
    if group["state_layout"] == "compact" and group["params"]:
        dtypes = {p.dtype for p in group["params"]}
        if len(dtypes) > 1:
            raise ValueError(f"{where}['state_layout'] is 'compact', which keeps one state dtype per group, but "
                             f"its params have several ({sorted(map(str, dtypes))}): put them in separate groups")
        slabs = state.compact
        if slabs is not None:
            numels = [p.numel() for p in group["params"]]
            if list(state.compact_numels()) != numels:
                raise ValueError(f"{where}'s compact state was made for params of {list(state.compact_numels())} "
                                 f"elements, its params now have {numels} (resized by hand?)")
            dtype = next(iter(dtypes))
            held = [slabs[key].dtype for key in compact_state.moment_keys(slabs) if slabs[key].dim() == 2]
            if held and held[0] != dtype:
                raise ValueError(f"{where}'s compact state is {held[0]}, its params {dtype} (converted by hand?)")
    compact_state.check_compact(state.compact, {**group, "state_dtype": None}, where)
