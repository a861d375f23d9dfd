"""The torch.optim optimizers ``sparse_grad.sparsify`` can wrap, and how it runs their update on
the selected blocks only (docs/design.md §10).

Each supported class is described by an :class:`UpdateRule`: torch's own functional
implementation (``torch.optim.adam.adam``, ...), the per-param state lists it takes, in its
positional order, and which of them exist under which options. Only elementwise optimizers
qualify: their update of an element reads nothing but that element's param, grad and state and
a few per-tensor scalars (the step count, NAdam's ``mu_product``), so running the functional on
the selected blocks gathered into compact buffers gives each block exactly the numbers the
unwrapped optimizer would. Those per-tensor scalars become per-block vectors here (a block's
step count is the number of times *it* was updated), and blocks are run in cohorts that share
them (:func:`apply`).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.optim import adagrad, adam, adamax, adamw, nadam, radam, rmsprop, sgd
from torch.optim.optimizer import _get_scalar_dtype

# A per-tensor scalar of torch's state, kept per block under this key (the step count is an
# int32 count, as SparseAdamW keeps it; the scalar torch wants is made from it per cohort).
BLOCK_KEYS = {"step": "block_step", "mu_product": "block_mu_product"}


@dataclass(frozen=True)
class UpdateRule:
    """How to run one torch optimizer's update on compact buffers.

    ``lists``: the functional's state arguments after ``params`` and ``grads``, as state keys
    (``"step"`` and ``"mu_product"`` are per-tensor scalars, kept per block). ``when``: a key
    present only under an option (``amsgrad``, ``centered``, ``momentum``). ``lazy``: a buffer
    torch creates from the gradient on a param's first step (SGD's momentum), passed as None
    for a block that has never been updated. ``fill``: the group option whose value a new
    buffer starts at (Adagrad's ``initial_accumulator_value``), else zeros.
    """

    functional: Callable
    lists: tuple[str, ...]
    when: dict[str, Callable[[dict], bool]] = field(default_factory=dict)
    lazy: str | None = None
    fill: dict[str, str] = field(default_factory=dict)

    def state_keys(self, group: dict) -> list[str]:
        """The elementwise (param-shaped) state keys this group's options use, in list order."""
        return [key for key in self.lists if key not in BLOCK_KEYS and self.when.get(key, _always)(group)]

    def moments(self, group: dict) -> tuple[str, ...]:
        """The state keys as the compact-state and checkpoint code reads them (SparseAdamW's rules'
        name): the elementwise buffers, one slab each in compact state."""
        return tuple(self.state_keys(group))

    def per_slot(self, group: dict) -> dict[str, torch.dtype]:
        """Per-block scalars kept beside the step count (NAdam's mu_product), with their dtype."""
        return {"block_mu_product": _scalar_dtype(group)} if "mu_product" in self.lists else {}

    def fresh(self, group: dict) -> dict[str, float]:
        """What a block's state starts at where not zero: a buffer's ``fill`` option (Adagrad's
        initial accumulator) and a mu_product of 1, as torch initialises them."""
        values = {key: group[option] for key, option in self.fill.items()}
        return {**values, **dict.fromkeys(self.per_slot(group), 1.0)}

    @property
    def nonnegative(self) -> tuple[str, ...]:
        """State a checkpoint load refuses with negative values."""
        return tuple(key for key in self.lists if key in SQUARES)

    @functools.cached_property
    def options(self) -> tuple[str, ...]:
        """The functional's keyword arguments after its lists (its options)."""
        names = list(inspect.signature(self.functional).parameters)
        return tuple(names[2 + len(self.lists):])


def _always(group: dict) -> bool:
    return True


RULES: dict[type, UpdateRule] = {
    torch.optim.SGD: UpdateRule(sgd.sgd, ("momentum_buffer",), {"momentum_buffer": lambda g: g["momentum"] != 0},
                                lazy="momentum_buffer"),
    torch.optim.Adam: UpdateRule(adam.adam, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
                                 {"max_exp_avg_sq": lambda g: g["amsgrad"]}),
    torch.optim.AdamW: UpdateRule(adamw.adamw, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
                                  {"max_exp_avg_sq": lambda g: g["amsgrad"]}),
    torch.optim.RMSprop: UpdateRule(rmsprop.rmsprop, ("square_avg", "grad_avg", "momentum_buffer", "step"),
                                    {"grad_avg": lambda g: g["centered"],
                                     "momentum_buffer": lambda g: g["momentum"] > 0}),
    torch.optim.Adagrad: UpdateRule(adagrad.adagrad, ("sum", "step"), fill={"sum": "initial_accumulator_value"}),
    torch.optim.Adamax: UpdateRule(adamax.adamax, ("exp_avg", "exp_inf", "step")),
    torch.optim.NAdam: UpdateRule(nadam.nadam, ("exp_avg", "exp_avg_sq", "mu_product", "step")),
    torch.optim.RAdam: UpdateRule(radam.radam, ("exp_avg", "exp_avg_sq", "step")),
}

# State that is a mean or sum of squares: never negative (a load refuses a negative one).
SQUARES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")


def rule_of(optimizer) -> UpdateRule:
    """The rule of ``optimizer``'s class; anything else is refused, naming the class. Exact
    classes only: a subclass may change the update in ways the rule cannot see."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    rule = RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in RULES)
        kind = type(optimizer)
        raise TypeError(f"sparsify cannot wrap {kind.__module__}.{kind.__qualname__}: it runs only the "
                        f"elementwise torch.optim optimizers whose update it knows ({supported}); "
                        "subclasses, non-elementwise optimizers (LBFGS, factored or sparse state) and "
                        "other classes are refused")
    return rule


def init_state(rule: UpdateRule, state: dict, p: torch.Tensor, group: dict, num_blocks: int) -> None:
    """A param's state on its first step, or the buffers a changed option now needs: per-block
    scalars, and every elementwise buffer the options use."""
    fresh = rule.fresh(group)
    if "block_step" not in state:
        state["block_step"] = torch.zeros(num_blocks, dtype=torch.int32, device=p.device)
    for key, dtype in rule.per_slot(group).items():
        if key not in state:
            state[key] = torch.full((num_blocks,), fresh[key], dtype=dtype, device=p.device)
    for key in rule.state_keys(group):
        if key not in state:
            state[key] = torch.full_like(p, fresh.get(key, 0.0), memory_format=torch.preserve_format)


def _scalar_dtype(group: dict) -> torch.dtype:
    # What torch's classes give their step and mu_product tensors.
    return torch.float32 if group.get("fused") else _get_scalar_dtype()


def _on_device(group: dict) -> bool:
    """Whether torch keeps the per-tensor scalars on the param's device (else on the CPU)."""
    return bool(group.get("capturable") or group.get("fused"))


def _kwargs(rule: UpdateRule, group: dict) -> dict:
    """The functional's options from the group, as torch's class passes them."""
    kwargs = {}
    for name in rule.options:
        if name in ("beta1", "beta2"):
            kwargs[name] = group["betas"][name == "beta2"]
        elif name in ("has_complex", "has_sparse_grad"):
            kwargs[name] = False  # refused before (sparse_grad takes real, dense tensors)
        elif name in group and name not in ("grad_scale", "found_inf"):
            kwargs[name] = group[name]
    return kwargs


class Piece:
    """Some blocks of one flat tensor: a view if they are one run of memory, else gathered into a
    compact copy (:meth:`take`) and scattered back (:meth:`put`). ``last``: the elements of the
    last listed block (fewer than ``block_size`` for a tensor's partial last block; a compact
    slab row holds it in its first ``last`` elements)."""

    def __init__(self, block_ids: list[int], block_size: int, last: int, device: torch.device):
        first, final = block_ids[0], block_ids[-1]
        self.blocks = _blocks(block_ids, device)
        if isinstance(self.blocks, slice):  # one run: a view, updated in place
            self.run = slice(first * block_size, final * block_size + last)
            self.index = None
            return
        self.run = None
        index = (self.blocks[:, None] * block_size + torch.arange(block_size, device=device)).view(-1)
        short = block_size - last
        self.index = index[:index.numel() - short] if short > 0 else index

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.view(-1)
        return flat[self.run] if self.run is not None else flat.index_select(0, self.index)

    def put(self, tensor: torch.Tensor, part: torch.Tensor) -> None:
        flat = tensor.view(-1)
        if self.run is None:
            flat.index_copy_(0, self.index, part)
        elif part.data_ptr() != flat[self.run].data_ptr():  # a buffer torch made (a lazy one)
            flat[self.run].copy_(part)


def _blocks(block_ids: list[int], device: torch.device) -> slice | torch.Tensor:
    """Ascending block ids as a slice where they are one run (most tensors at high density: no
    tensor to build), else as an int64 tensor, for indexing per-block vectors."""
    if block_ids[-1] - block_ids[0] + 1 == len(block_ids):
        return slice(block_ids[0], block_ids[-1] + 1)
    return torch.tensor(block_ids, dtype=torch.int64, device=device)


def cohorts(scalars: list, spans: list[tuple[int, int, int]]) -> dict[tuple, dict[int, range | list[int]]]:
    """The selected blocks grouped by their per-block scalars (``scalars``: one tuple per selected
    block, in selection order; ``spans``: ``(tensor, start, stop)`` of each tensor's blocks in that
    order): ``{scalars: {tensor: positions in the selection}}``. One cohort in one pass when all
    blocks share their scalars (density 1, a stable selection): no Python call per block."""
    if not scalars:
        return {}
    if scalars.count(scalars[0]) == len(scalars):
        return {scalars[0]: {t: range(lo, hi) for t, lo, hi in spans}}
    groups: dict[tuple, dict[int, list[int]]] = {}
    for t, lo, hi in spans:
        for i in range(lo, hi):
            groups.setdefault(scalars[i], {}).setdefault(t, []).append(i)
    return groups


@dataclass
class Selected:
    """Where a step's selected blocks live (built once per selection, see ``sparsify``).

    ``spans``: per tensor with selected blocks, ``(t, start, stop)``: its blocks' positions in
    the selection. ``ids``: per selected block, its id within its tensor. ``stores``: per tensor,
    the dict that holds its state buffers and per-block scalars (dense: the param's state;
    compact: the group's slabs). ``rows``: per selected block, its row in its store's per-block
    vectors (dense: its id; compact: its slot, which is its position in the selection).
    """

    spans: list[tuple[int, int, int]]
    ids: list[int]
    stores: list[dict]
    rows: list[int]


def apply(rule: UpdateRule, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
          selected: Selected, scalars: list[tuple]) -> None:
    """The wrapped optimizer's update on the selected blocks, in place; every other element of
    params and state is untouched. ``scalars``: each selected block's (step count, mu_product)
    in selection order.

    Blocks are run in cohorts of equal per-block scalars, one call of torch's functional per
    cohort on one compact buffer per state list (per tensor where they are views), so every block
    sees the scalars it would have under the unwrapped optimizer had it been updated only at
    these steps.
    """
    block_size, device = group["block_size"], params[0].device
    keys = rule.state_keys(group)
    has_mu = "mu_product" in rule.lists
    kwargs = _kwargs(rule, group)
    where = device if _on_device(group) else torch.device("cpu")
    scalar_dtype = _scalar_dtype(group)
    ids, rows, stores = selected.ids, selected.rows, selected.stores
    for (step, mu), members in cohorts(scalars, selected.spans).items():
        pieces = []
        for t, positions in members.items():
            numel = params[t].numel()
            own = [ids[i] for i in positions]
            last = min(block_size, numel - own[-1] * block_size)
            piece = Piece(own, block_size, last, device)
            slots = [rows[i] for i in positions]
            pieces.append((t, piece, piece if slots == own else Piece(slots, block_size, last, device)))
        lazy = rule.lazy if step == 0 and rule.lazy in keys else None  # made by torch from the grad
        buffers = {key: [held.take(stores[t][key]) for t, _, held in pieces] for key in keys if key != lazy}
        taken_params = [piece.take(params[t]) for t, piece, _ in pieces]
        taken_grads = [piece.take(grads[t]) for t, piece, _ in pieces]
        # Parts of tensors run as one buffer per list: each of torch's ops makes one pass over the
        # cohort instead of one per tensor (its launch costs more than a few blocks' arithmetic),
        # and its for-loop implementation loops once in Python. Whole params (density 1) stay
        # apart: the update runs in place on them, with no copy.
        joined = len(pieces) > 1 and any(piece.run != slice(0, params[t].numel()) for t, piece, _ in pieces)
        if joined:
            sizes = [part.numel() for part in taken_params]
            taken_params, taken_grads = [torch.cat(taken_params)], [torch.cat(taken_grads)]
            buffers = {key: [torch.cat(parts)] for key, parts in buffers.items()}
        count = len(taken_params)
        if lazy is not None:
            buffers[lazy] = [None] * count
        # One scalar tensor per entry: the functional increments each in place.
        buffers["step"] = list(torch.full((count,), float(step), dtype=scalar_dtype, device=where).unbind())
        if has_mu:
            buffers["mu_product"] = list(torch.full((count,), mu, dtype=scalar_dtype, device=where).unbind())
        rule.functional(taken_params, taken_grads, *(buffers.get(key, []) for key in rule.lists), **kwargs)
        if joined:  # (a lazy buffer is torch's new tensor, in the list it was given)
            taken_params = taken_params[0].split(sizes)
            buffers.update({key: buffers[key][0].split(sizes) for key in keys})
        for j, (t, piece, held) in enumerate(pieces):
            piece.put(params[t], taken_params[j])
            for key in keys:
                held.put(stores[t][key], buffers[key][j])
            if has_mu:
                stores[t]["block_mu_product"][held.blocks] = buffers["mu_product"][min(j, count - 1)].to(device)


def count_steps(selected: Selected, compact: bool) -> None:
    """One more step for every selected block (after :func:`apply`)."""
    if compact:  # one vector for the group, and every slot is a selected block
        selected.stores[selected.spans[0][0]]["block_step"] += 1
        return
    for t, lo, hi in selected.spans:
        counts = selected.stores[t]["block_step"]
        blocks = _blocks(selected.rows[lo:hi], counts.device)
        if isinstance(blocks, slice):
            counts[blocks] += 1
        else:
            counts.index_add_(0, blocks, torch.ones(hi - lo, dtype=torch.int32, device=counts.device))
