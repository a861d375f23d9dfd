"""The update rules a sparse optimizer applies to its selected blocks (docs/design.md §3.7).

Everything before the update (binding, norm pass, selection, clipping, AMP, error feedback,
both state layouts, checkpoints) is the same for every sparse optimizer; what differs is the
per-block update, described here once per rule:

    moments(group)   the per-param state tensors shaped like the param (dense) or slabs
                     (compact), e.g. AdamW ("exp_avg", "exp_avg_sq"); every rule also keeps
                     "block_step", one int32 count per block
    check_hyper      the hyper-parameters' checks (cheap: run on every step they changed)
    hyper_keys       the group keys check_hyper and hyper read
    hyper(group)     their values for the op's fp64 table, in the op's order
    apply(...)       the call of the unchecked op
    later_options    options a state dict saved before they existed is filled with
    nonnegative      moments a checkpoint load refuses with negative values
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import _checks
from ..ops import unchecked
from . import options


@dataclass(frozen=True)
class UpdateRule:
    name: str
    moments: Callable[[dict], tuple[str, ...]]
    check_hyper: Callable[[dict, str], None]
    hyper_keys: tuple[str, ...]
    hyper: Callable[[dict], list]
    apply: Callable[..., None]
    check_flags: Callable[[dict, str], None]
    later_options: dict
    nonnegative: tuple[str, ...] = ()
    compact_grads: bool = False  # apply(..., compact_grads=True) reads one grad slab (.compact_grads)


def _adamw_apply(params, grads, moments, block_steps, block_ids, hyper, block_size, group, backend, coef,
                 found_inf, compact, cache, mutated, compact_grads=False):
    unchecked.sparse_adamw_step(params, grads, moments[0], moments[1], block_steps, block_ids, hyper, block_size,
                                group["maximize"], backend, coef, found_inf, compact, cache, mutated,
                                compact_grads)


ADAMW = UpdateRule(
    name="SparseAdamW",
    moments=lambda group: ("exp_avg", "exp_avg_sq"),
    check_hyper=options.check_hyper,
    hyper_keys=("lr", "betas", "eps", "weight_decay"),
    hyper=lambda group: [group["lr"], group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"]],
    apply=_adamw_apply,
    check_flags=options.check_adamw_flags,
    later_options=options.LATER_OPTIONS,
    nonnegative=("exp_avg_sq",),
    compact_grads=True,
)


def _check_sgd_hyper(group: dict, where: str = "") -> None:
    name = options.namer(where)
    _checks.tensor_or(_checks.non_negative, group["lr"], name("lr"))
    _checks.tensor_or(_checks.non_negative, group["weight_decay"], name("weight_decay"))
    _checks.non_negative(group["dampening"], name("dampening"))


def _check_sgd_flags(group: dict, where: str = "") -> None:
    """SGD's shaping options: momentum decides whether there are buffers at all, so it is a
    number (not a tensor) and part of the fingerprint; torch's implementation flags as AdamW's."""
    name = options.namer(where)
    _checks.non_negative(group["momentum"], name("momentum"))
    _checks.flag(group["nesterov"], name("nesterov"))
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{name('nesterov')}=True requires a momentum and zero dampening, as torch.optim.SGD")
    options.check_adamw_flags(group, where)


def _sgd_apply(params, grads, moments, block_steps, block_ids, hyper, block_size, group, backend, coef, found_inf,
               compact, cache, mutated):
    unchecked.sparse_sgd_step(params, grads, moments[0] if moments else [], block_steps, block_ids, hyper,
                              block_size, group["maximize"], group["nesterov"], backend, coef, found_inf, compact,
                              cache, mutated)


SGD = UpdateRule(
    name="SparseSGD",
    moments=lambda group: ("momentum_buffer",) if group["momentum"] != 0 else (),
    check_hyper=_check_sgd_hyper,
    hyper_keys=("lr", "momentum", "dampening", "weight_decay"),
    hyper=lambda group: [group["lr"], group["momentum"], group["dampening"], group["weight_decay"]],
    apply=_sgd_apply,
    check_flags=_check_sgd_flags,
    later_options={"maximize": False, "selection": "norm", "seed": 0, "foreach": None, "fused": None,
                   "differentiable": False},
)


def _check_lion_hyper(group: dict, where: str = "") -> None:
    name = options.namer(where)
    _checks.tensor_or(_checks.non_negative, group["lr"], name("lr"))
    options.check_betas(group["betas"], name("betas"))
    _checks.tensor_or(_checks.non_negative, group["weight_decay"], name("weight_decay"))


def _lion_apply(params, grads, moments, block_steps, block_ids, hyper, block_size, group, backend, coef, found_inf,
                compact, cache, mutated):
    unchecked.sparse_lion_step(params, grads, moments[0], block_steps, block_ids, hyper, block_size,
                               group["maximize"], backend, coef, found_inf, compact, cache, mutated)


LION = UpdateRule(
    name="SparseLion",
    moments=lambda group: ("exp_avg",),
    check_hyper=_check_lion_hyper,
    hyper_keys=("lr", "betas", "weight_decay"),
    hyper=lambda group: [group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"]],
    apply=_lion_apply,
    check_flags=lambda group, where="": None,
    later_options={"maximize": False, "selection": "norm", "seed": 0},
)
