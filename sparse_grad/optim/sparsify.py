"""``sparse_grad.sparsify``: any elementwise torch.optim optimizer, updating only the selected
blocks (docs/design.md §10).

The returned :class:`SparsifiedOptimizer` selects blocks exactly as SparseAdamW does (the same
norm pass, selection and group state: :func:`.functional._select`) and then runs the wrapped
optimizer's own functional update on those blocks only (:mod:`.torch_rules`). It takes the
wrapped optimizer over: its param groups (with their options, as a scheduler sees them) become
the wrapper's, and the wrapper keeps its own state.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .. import backends
from ..layout import cached_layout, check_tensor, num_blocks_of
from . import checkpoint, options, sharding, torch_rules
from .functional import _select
from .group_state import GroupState, Selection
from .group_view import PlainGroup
from .selection import Counts
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
    (``add_param_group``, or by editing ``param_groups``). ``state_layout`` must be ``"dense"``.
    The wrapped optimizer must not have stepped yet; step, schedule and checkpoint the returned
    optimizer from then on, not the wrapped one.
    """
    return SparsifiedOptimizer(optimizer, density=density, block_size=block_size, scope=scope,
                               reselect_every=reselect_every, state_layout=state_layout, selection=selection,
                               backend=backend, seed=seed, score=score, min_blocks_per_tensor=min_blocks_per_tensor)


@dataclass
class _Selecting:
    """What the shared selection (:func:`.functional._select`) reads of a step."""

    index: int
    group: dict
    view: PlainGroup
    state: GroupState
    selection_key: tuple
    backend: str
    counts: Counts
    reusable: bool = False  # no kernel caches: sparsify's cost is in the gathered update
    blueprint_scores: None = None


class SparsifiedOptimizer(Optimizer):
    """A torch.optim optimizer that updates only the selected blocks (see :func:`sparsify`).

    Per param group and step: the blocks are (re)selected as in SparseAdamW; the selected blocks
    of params, grads and state are gathered into compact buffers (a view where the blocks are one
    run of memory), torch's functional implementation of the wrapped class runs on them with the
    group's options, and the results are scattered back. Unselected blocks keep params and state
    bit for bit. Per-tensor scalars of torch's state (the step count; NAdam's ``mu_product``) are
    kept per block (``block_step``, ``block_mu_product``), so bias corrections follow each block's
    own updates. State per param: the wrapped optimizer's buffers, like the param, and those.
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
        if group["state_layout"] != "dense":
            raise ValueError(f"{name('state_layout')}={group['state_layout']!r} is not supported by sparsify: its "
                             "state is dense (use SparseAdamW for compact state)")
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
                group_state.set(None if selection is None else Selection(**selection), None)

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
        return (positions, params, grads) if params else None

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
        checked = [self._check_group(i, group) for i, group in enumerate(self.param_groups)]
        for index, (group, parts) in enumerate(zip(self.param_groups, checked)):
            if parts is not None:
                self._step_group(index, group, *parts)
        for group_state in self._group_states:
            group_state.refresh()
        return loss

    def _step_group(self, index: int, group: dict, positions: list[int], params: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> None:
        device = params[0].device
        layout = cached_layout(tuple(p.numel() for p in params), group["block_size"], device)
        states = [self.state[p] for p in params]
        for p, state, blocks in zip(params, states, layout.block_counts):
            torch_rules.init_state(self._rule, state, p, group, blocks)
        selecting = {**group, **_SELECTION_FIXED}
        key = (tuple(positions), group["block_size"], group["density"], group["scope"], group["score"],
               group["min_blocks_per_tensor"], group["selection"], group["seed"])
        step = _Selecting(index, selecting, PlainGroup(layout, tuple(p.numel() for p in group["params"])),
                          self._group_states[index], key, backends.resolve(group["backend"], device),
                          Counts.of(layout, selecting))
        block_ids, _, _ = _select(step, grads, None, None, False)
        local_ids = self._local_ids(index, block_ids, layout)
        torch_rules.apply(self._rule, group, params, grads, states, local_ids)

    def _local_ids(self, index: int, block_ids: torch.Tensor, layout) -> list[list[int]]:
        """The selected ids split per tensor, numbered within it; read to the host once per
        selection (a sync on CUDA)."""
        caches = self._group_states[index].caches
        cached = caches.get("local_ids")
        if cached is not None and cached[0] is block_ids:
            return cached[1]
        ids = block_ids.tolist()
        offsets = layout.block_offsets.tolist()
        local = []
        for t in range(len(offsets) - 1):
            lo, hi = bisect.bisect_left(ids, offsets[t]), bisect.bisect_left(ids, offsets[t + 1])
            local.append([b - offsets[t] for b in ids[lo:hi]])
        caches["local_ids"] = (block_ids, local)
        return local

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
            if not isinstance(part, dict) or not set(part) <= {"selection"}:
                raise ValueError(f"{name} must be a dict with a 'selection' entry, as state_dict() gives")
            selection = None
            if "selection" in part:
                selection = checkpoint.loaded_selection(part["selection"], group["params"], f"{name}['selection']")
            elif stepped:
                raise ValueError(f"{name} has no selection, but the group has stepped: the state dict was cut short")
            selections.append(selection)
            groups.append({key: value for key, value in saved.items() if key != GROUP_STATE_KEY})
        # Checked: write.
        super().load_state_dict({"state": saved_state, "param_groups": groups})
        # Optimizer.load_state_dict casts every state tensor to the param's dtype: the per-block
        # counts are int32 and the mu_products keep torch's scalar dtype.
        for p, state in own.items():
            for key, value in state.items():
                self.state[p][key] = value.to(device=p.device, copy=True)
        for group_state, selection in zip(self._group_states, selections):
            group_state.set(selection, None)


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
