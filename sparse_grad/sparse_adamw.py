"""SparseAdamW: a drop-in for torch.optim.AdamW that updates only the blocks that matter."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import _checkpoint, _checks, _compact, _policies, _sharding, backends, library
from .layout import BlockLayout, cached_layout, check_tensor, num_blocks_of

__all__ = ["SparseAdamW"]

SCOPES = ("global", "tensor")
STATE_LAYOUTS = ("dense", "compact")


@dataclass
class _Selection:
    """The block ids a param group updates until its next reselection."""

    key: tuple  # (positions of params with a grad, block_size, density, scope)
    block_ids: torch.Tensor
    age: int  # steps taken with these ids
    draw: int = 0  # how many selections the group has made (selection="random" hashes it)


@dataclass
class _Plan:
    """A checked param group, ready to step: nothing has been written yet."""

    index: int
    group: dict
    positions: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    layout: BlockLayout
    backend: str  # concrete: "auto" resolved for the params' device
    blueprint_scores: torch.Tensor | None  # fp32 [num_blocks] on device; None: no blend
    sharding: _sharding.ShardedGroup | None = None  # FSDP2 DTensor params: local pieces (see _sharding)


def _check_hyperparameters(group: dict, where: str = "") -> None:
    def name(key):
        return f"{where}[{key!r}]" if where else key

    if torch.compiler.is_compiling():
        return  # checked when the group was added; a compiled step trusts it (no graph breaks)
    _checks.tensor_or(_checks.non_negative, group["lr"], name("lr"))
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name('betas')} must be a pair (beta1, beta2), got {betas!r}")
    _checks.tensor_or(_checks.beta, betas[0], f"{name('betas')}[0]")
    _checks.tensor_or(_checks.beta, betas[1], f"{name('betas')}[1]")
    _checks.non_negative(group["eps"], name("eps"))
    _checks.tensor_or(_checks.non_negative, group["weight_decay"], name("weight_decay"))
    _checks.density(group["density"], name("density"))
    _checks.positive_int(group["block_size"], name("block_size"))
    _checks.choice(group["scope"], SCOPES, name("scope"))
    _checks.positive_int(group["reselect_every"], name("reselect_every"))
    _checks.flag(group["maximize"], name("maximize"))
    backends.check_backend(group["backend"], name("backend"))
    _checks.unit_interval(group["blueprint_weight"], name("blueprint_weight"))
    _policies.check_options(group, name)
    _checks.choice(group["state_layout"], STATE_LAYOUTS, name("state_layout"))


def _split_names(params: list) -> tuple[list, list[str] | None]:
    """Tensors and names of a group's params, given as tensors or ``named_parameters()`` pairs."""
    if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
        return [p for _, p in params], [name for name, _ in params]
    return params, None


def _selection_key(plan: _Plan) -> tuple:
    """What a selection depends on besides the scores: a change of any of it reselects."""
    group = plan.group
    return (tuple(plan.positions), group["block_size"], group["density"], group["scope"],
            group["score"], group["min_blocks_per_tensor"], group["selection"], group["seed"])


def _normalized(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` divided by their sum, on device. NaN is left out of the sum, so a NaN block
    stays NaN and still ranks first; an all-zero vector stays zero."""
    return scores / torch.nansum(scores).clamp_min(torch.finfo(torch.float32).tiny)


class SparseAdamW(Optimizer):
    r"""AdamW on the blocks with the largest gradients; at ``density=1.0`` it is ``torch.optim.AdamW``.

    Each param group's parameters are viewed flat and cut into blocks of ``block_size`` elements
    (DESIGN §2). Per group, ``step()`` does::

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
            the selected blocks, see :mod:`sparse_grad._compact`).
        selection: ``"norm"`` (rank blocks by their scores, above) or ``"random"``: the same
            number of blocks, under the same scope and minima, drawn uniformly at random at
            each reselection — the control an informed selection must beat. No norm pass;
            ``score_ema`` must be 0 and a blueprint is not blended in.
        seed: the random draws' seed (``selection="random"``); draw ``r`` of group ``i`` hashes
            (seed, i, r, block id) on device, so a resumed run draws the same blocks.

    ``lr``, ``betas`` and ``weight_decay`` may be one-element tensors (read on device: a
    scheduler changing them neither syncs nor recompiles ``torch.compile(opt.step)``).
    Under ``torch.amp.GradScaler`` the kernels unscale the grads and an overflowed step changes
    nothing (``_step_supports_amp_scaling``).

    State per parameter (dense): ``exp_avg``, ``exp_avg_sq`` (like the parameter, in the state
    dtype) and ``block_step`` (int32, one count per block); with the options, ``score_ema``
    (fp32 per block) and ``error``. ``state_dict()`` also holds each group's current selection
    and compact state, so a run resumed mid-interval continues bit for bit.
    """

    # torch.amp.GradScaler.step then sets self.grad_scale / self.found_inf instead of unscaling
    # the grads itself: the update kernel unscales them and skips an overflowed step on device.
    _step_supports_amp_scaling = True

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
    ):
        if amsgrad is not False:
            raise ValueError("amsgrad=True is not supported by SparseAdamW")
        if blueprint is not None and not callable(getattr(blueprint, "block_scores", None)):
            raise TypeError("blueprint must have a block_scores(params, names, block_size) method "
                            f"(a sparse_grad.blueprint.Blueprint), got {type(blueprint).__name__}")
        if blueprint_weight is None:
            blueprint_weight = 0.0 if blueprint is None else 0.5
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
                    "density": density, "block_size": block_size, "scope": scope,
                    "reselect_every": reselect_every, "backend": backend, "blueprint_weight": blueprint_weight,
                    "state_dtype": state_dtype, "score": score, "score_ema": score_ema,
                    "min_blocks_per_tensor": min_blocks_per_tensor, "error_feedback": error_feedback,
                    "max_grad_norm": max_grad_norm, "state_layout": state_layout, "selection": selection,
                    "seed": seed}
        _check_hyperparameters(defaults)
        self._blueprint = blueprint
        self._check_blueprint_weight(defaults, "blueprint_weight")
        self._selections: dict[int, _Selection] = {}
        self._compact: dict[int, dict[str, torch.Tensor]] = {}  # per group index (see _compact)
        self._blueprint_scores: dict[tuple, torch.Tensor] = {}
        self._score_hooks: OrderedDict[int, Callable] = OrderedDict()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_selections", {})
        self.__dict__.setdefault("_compact", {})
        self.__dict__.setdefault("_blueprint", None)
        self.__dict__.setdefault("_blueprint_scores", {})
        self.__dict__.setdefault("_score_hooks", OrderedDict())
        for group in self.param_groups:  # state dicts saved before these options existed
            group.setdefault("selection", "norm")
            group.setdefault("seed", 0)

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
        selected = []
        for index, selection in sorted(self._selections.items()):
            positions, block_size = selection.key[0], selection.key[1]
            params = [self.param_groups[index]["params"][j] for j in positions]
            selected.append((index, params, selection.block_ids, block_size))
        return selected

    def _check_blueprint_weight(self, group: dict, name: str) -> None:
        if self._blueprint is None and group["blueprint_weight"] != 0.0:
            raise ValueError(f"{name} is {group['blueprint_weight']}, but SparseAdamW has no blueprint "
                             "to blend (pass blueprint=...)")
        if group["selection"] == "random" and group["blueprint_weight"] != 0.0:
            raise ValueError(f"{name} is {group['blueprint_weight']}, but selection='random' blends no "
                             "blueprint: set blueprint_weight=0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"param_groups[{len(self.param_groups)}]"
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else params
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections")
        params = list(params)
        tensors, names = _split_names(params)
        group = {**self.defaults, **param_group}
        _check_hyperparameters(group, where)
        self._check_blueprint_weight(group, f"{where}['blueprint_weight']")
        device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
        for j, p in enumerate(tensors):
            check_tensor(p, f"{where}['params'][{j}]", device)
        if self._blueprint is not None and group["blueprint_weight"] > 0.0 and tensors:
            self._blueprint.block_scores(tensors, names, group["block_size"])  # raises on a mismatch
        if device is not None:  # load the backend now (an import), not inside a compiled step
            backends.unavailable_reason(backends.resolve("auto", device) if group["backend"] == "auto"
                                        else group["backend"], device)
        super().add_param_group({**param_group, "params": params})

    def _plan(self, index: int, group: dict) -> _Plan | None:
        """Check one group and what stepping it needs, without writing anything."""
        where = f"param_groups[{index}]"
        _check_hyperparameters(group, where)
        self._check_blueprint_weight(group, f"{where}['blueprint_weight']")
        positions, params, grads = [], [], []
        device = None
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = f"{where}['params'][{j}]"
            if device is None:
                device = p.device
            check_tensor(p, name, device)
            if p.grad.layout != torch.strided:
                raise TypeError(f"{name}.grad is sparse; SparseAdamW needs dense gradients")
            grad = p.grad.contiguous()
            check_tensor(grad, f"{name}.grad", device)
            if _sharding.is_dtensor(p):  # the kernels run on the local shards (see _sharding)
                grad = grad.to_local() if _sharding.is_dtensor(grad) else grad
            state = self.state.get(p, {})
            if "block_step" in state and group["state_layout"] == "compact":
                raise ValueError(f"{where}['state_layout'] is 'compact', but {name} has dense state")
            if "block_step" in state and state["block_step"].numel() != num_blocks_of(p.numel(), group["block_size"]):
                raise ValueError(f"{where}['block_size'] is {group['block_size']}, but the state of "
                                 f"{name} was made with another block size")
            if "exp_avg" in state and state["exp_avg"].dtype != _policies.state_dtype(group, p):
                raise ValueError(f"{where}['state_dtype'] is {group['state_dtype']}, but the state of "
                                 f"{name} is {state['exp_avg'].dtype}")
            positions.append(j)
            params.append(p)
            grads.append(grad)
        if not params:
            return None
        sharding = _sharding.of_params(params, where, positions, group["block_size"])
        if sharding is not None:
            device = sharding.piece_global.device
        self._check_compact(index, group, where)
        layout = cached_layout(tuple(p.numel() for p in params), group["block_size"], device)
        return _Plan(index, group, positions, params, grads, layout, backends.resolve(group["backend"], device),
                     self._blueprint_scores_of(index, group, positions, params), sharding)

    def _check_compact(self, index: int, group: dict, where: str) -> None:
        """Raise unless the group's compact state (if any) fits its layout option, block size and
        state dtype."""
        state = self._compact.get(index)
        if group["state_layout"] == "dense":
            if state is not None:
                raise ValueError(f"{where}['state_layout'] is 'dense', but the group has compact state")
            return
        dtypes = {_policies.state_dtype(group, p) for p in group["params"]}
        if len(dtypes) > 1:
            raise ValueError(f"{where}['state_layout'] is 'compact', which keeps one state dtype per group, "
                             f"but its params have several ({sorted(map(str, dtypes))}): set state_dtype")
        if state is not None:
            blocks = sum(num_blocks_of(p.numel(), group["block_size"]) for p in group["params"])
            if _sharding.is_dtensor(group["params"][0]):  # slots of this rank's blocks only
                blocks = _sharding.compact_blocks(self, index)
            if state["exp_avg"].shape[1] != group["block_size"] or state["slot_of_block"].numel() != blocks:
                raise ValueError(f"{where}['block_size'] is {group['block_size']}, but the group's compact "
                                 "state was made with another block size")
            if state["exp_avg"].dtype not in dtypes:
                raise ValueError(f"{where}['state_dtype'] is {group['state_dtype']}, but the group's compact "
                                 f"state is {state['exp_avg'].dtype}")

    def _compact_state(self, plan: _Plan, block_ids: torch.Tensor, reselected: bool) -> dict:
        """The group's compact state, its slots reassigned to a new selection."""
        group = plan.group
        state = self._compact.get(plan.index)
        if state is None:
            numels = [p.numel() for p in group["params"]]
            state = _compact.create(numels, group["block_size"], _policies.state_dtype(group, plan.params[0]),
                                    plan.layout.device)
            reselected = True
        if reselected:
            ids = _compact.group_ids(block_ids, tuple(p.numel() for p in group["params"]),
                                     tuple(plan.positions), group["block_size"])
            state = self._compact[plan.index] = _compact.reassign(state, ids)
        return state

    def _blueprint_scores_of(self, index: int, group: dict, positions: list[int],
                             params: list[torch.Tensor]) -> torch.Tensor | None:
        """The blueprint's scores for these params' blocks, on their device (cached per group,
        params taking part and block size, so a step copies nothing to the device)."""
        if self._blueprint is None or group["blueprint_weight"] == 0.0:
            return None
        key = (index, tuple(positions), group["block_size"])
        if key not in self._blueprint_scores:
            names = group.get("param_names")
            names = None if names is None else [names[j] for j in positions]
            scores = self._blueprint.block_scores(params, names, group["block_size"])
            expected = sum(num_blocks_of(p.numel(), group["block_size"]) for p in params)
            if not isinstance(scores, torch.Tensor) or scores.shape != (expected,):
                raise ValueError(f"blueprint.block_scores returned {type(scores).__name__} "
                                 f"{tuple(getattr(scores, 'shape', ()))} for param_groups[{index}], "
                                 f"expected a tensor of {expected} block scores")
            self._blueprint_scores[key] = scores.to(device=params[0].device, dtype=torch.float32)
        return self._blueprint_scores[key]

    def _select(self, plan: _Plan, grads: list[torch.Tensor], inv_scale: torch.Tensor | None,
                skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """The block ids this step updates, this step's block sums of squares (of the unscaled
        grads) if a norm pass ran (for a reselection, a score hook or clipping), and whether the
        blocks were reselected."""
        group, layout = plan.group, plan.layout
        key = _selection_key(plan)
        selection = self._selections.get(plan.index)
        # Counted only for random draws: a count changing every step would make a compiled step
        # recompile (dynamo specializes on it).
        draw = selection.draw if selection is not None and group["selection"] == "random" else 0
        due = (selection is None or selection.key != key
               or (group["density"] < 1.0 and selection.age >= group["reselect_every"]))
        ranks_current = (due and group["density"] < 1.0 and group["blueprint_weight"] < 1.0
                         and group["selection"] == "norm")
        scores = None
        if ranks_current or self._score_hooks or group["max_grad_norm"] is not None:
            scores = (library.block_sqnorms(grads, layout.block_size, plan.backend) if plan.sharding is None
                      else plan.sharding.block_sqnorms(grads, plan.backend))  # reduced over the ranks
            if inv_scale is not None:
                scores = scores * inv_scale.square()
        if due:
            if group["density"] == 1.0:
                ids = torch.arange(layout.num_blocks, dtype=torch.int64, device=layout.device)
            elif group["selection"] == "random":
                ranks = _policies.random_scores(layout, group["seed"], plan.index, draw)
                ids = _policies.select(ranks, layout, group, plan.backend)
            else:
                ids = _policies.select(self._selection_scores(plan, scores, skip), layout, group, plan.backend)
            if skip is not None and selection is not None and selection.key == key:
                ids = torch.where(skip, selection.block_ids, ids)  # an overflowed step keeps it
            draw += group["selection"] == "random"
            selection = self._selections[plan.index] = _Selection(key, ids, 0, draw)
        selection.age += 1
        return selection.block_ids, scores, due

    def _selection_scores(self, plan: _Plan, sqnorms: torch.Tensor | None,
                          skip: torch.Tensor | None = None) -> torch.Tensor:
        """What the selection ranks (DESIGN §3.2): this step's scores ("l2" or "rms"), their EMA
        (``score_ema``), then the blend with the blueprint's."""
        group, weight = plan.group, plan.group["blueprint_weight"]
        if plan.blueprint_scores is not None and weight == 1.0:
            return plan.blueprint_scores  # the blueprint's own ranking: its to_mask()
        scores = _policies.scores_of(sqnorms, plan.layout, group["score"])
        if group["score_ema"] > 0.0:
            scores = _policies.update_ema([self.state[p] for p in plan.params], scores, plan.layout,
                                          group["score_ema"], skip)
        if plan.blueprint_scores is None or weight == 0.0:
            return scores  # exactly the selection without a blueprint
        return weight * _normalized(plan.blueprint_scores) + (1.0 - weight) * _normalized(scores)

    def _apply(self, plan: _Plan, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        if plan.sharding is not None:
            _sharding.apply(self, plan, grad_scale, found_inf)
            return
        group = plan.group
        scaling = _policies.Scaling.of(grad_scale, found_inf, plan.layout.device)
        dtypes = [_policies.state_dtype(group, p) for p in plan.params]
        compact = group["state_layout"] == "compact"
        for p, dtype in zip(plan.params, dtypes):
            state = self.state[p]
            if not compact:
                _policies.init_dense_state(state, p, dtype, group["block_size"], p.device)
        states = [self.state[p] for p in plan.params]
        grads, inv_scale = plan.grads, scaling.inv_scale
        if group["error_feedback"]:
            grads = _policies.add_error(grads, states, dtypes, scaling)
            inv_scale = None  # the buffers hold unscaled gradients
        block_ids, scores, reselected = self._select(plan, grads, inv_scale, scaling.skip)
        # Clipping and unscaling: one device scalar the update kernel multiplies the grads by.
        grad_coef = inv_scale
        if group["max_grad_norm"] is not None:
            grad_coef = _policies.clip_coef(scores, group["max_grad_norm"])
            grad_coef = grad_coef if inv_scale is None else grad_coef * inv_scale
        # The plan checked params and grads, and the state is the optimizer's own: call the op
        # (library.step) directly rather than sparse_grad.ops, which would check all of it again.
        if compact:
            slabs = self._compact_state(plan, block_ids, reselected)
            moments = [slabs["exp_avg"]], [slabs["exp_avg_sq"]], [slabs["block_step"]]
        else:
            moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["block_step"] for s in states])
        beta1, beta2 = group["betas"]
        floats, hyper = library.hyper_table([group["lr"], beta1, beta2, group["eps"], group["weight_decay"]],
                                            plan.layout.device)
        library.step(
            plan.params, grads, *moments, block_ids, group["block_size"], *floats, group["maximize"],
            plan.backend, grad_coef, scaling.found_inf, compact, hyper)
        if group["error_feedback"]:
            _policies.keep_error(grads, block_ids, plan.layout, scaling.skip)
        for hook in list(self._score_hooks.values()):
            hook(self, plan.index, plan.params, scores, block_ids)

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
        _policies.check_scaling(grad_scale, "grad_scale")
        _policies.check_scaling(found_inf, "found_inf")
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]
        for plan in plans:
            if plan is not None:
                self._apply(plan, grad_scale, found_inf)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["selections"] = {
            i: {"key": s.key, "block_ids": s.block_ids, "age": s.age, "draw": s.draw}
            for i, s in self._selections.items()
        }
        state_dict["compact"] = {i: dict(c) for i, c in self._compact.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checked in full before anything changes."""
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer "
                             f"{len(self.param_groups)}")
        own_dtypes, compact = {}, {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict's param group {i} has {len(saved['params'])} params, "
                                 f"the optimizer's {len(group['params'])}")
            _check_hyperparameters({**self.defaults, **saved}, f"state_dict['param_groups'][{i}]")
            self._check_blueprint_weight({**self.defaults, **saved},
                                         f"state_dict['param_groups'][{i}]['blueprint_weight']")
            for j, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                if saved_id not in saved_state:
                    continue
                state = saved_state[saved_id]
                name = f"param_groups[{i}]['params'][{j}]"
                _checkpoint.check_param_state(state, p, {**self.defaults, **saved}, name)
                own_dtypes[p] = state
            if i in state_dict.get("compact", {}):
                compact[i] = _checkpoint.loaded_compact(state_dict["compact"][i], {**self.defaults, **saved},
                                                        group["params"], i)
        selections = {}
        for i, s in state_dict.get("selections", {}).items():
            if not 0 <= int(i) < len(self.param_groups):
                raise ValueError(f"state_dict has a selection for param group {i}, which does not exist")
            device = self.param_groups[int(i)]["params"][0].device
            key = (tuple(s["key"][0]), *s["key"][1:])
            selections[int(i)] = _Selection(key, s["block_ids"].to(device), int(s["age"]), int(s.get("draw", 0)))
        super().load_state_dict({"state": saved_state, "param_groups": saved_groups})
        # Optimizer.load_state_dict casts every state tensor to the param's dtype; the counts are
        # int32, and state_dtype / score EMAs may be fp32 beside 16-bit params: keep their dtypes.
        for p, state in own_dtypes.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._selections = selections
        self._compact = compact
