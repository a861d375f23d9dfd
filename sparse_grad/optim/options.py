"""The sparse optimizers' group options: their defaults, their checks, and what a bound step compares.

Hyper-parameters of the update (``lr``, ``betas``, ``eps``, ``weight_decay``) may change on any
step (a scheduler) and travel in the step's fp64 table; every other option shapes the step
(which blocks, how many, what state) and is part of a bound step's fingerprint
(docs/design.md §9): a change by hand makes the next step check the group again.
"""
from __future__ import annotations

import torch

from .. import _checks, backends

SCOPES = ("global", "tensor")
STATE_LAYOUTS = ("dense", "compact")
SCORES = ("l2", "rms")
SELECTIONS = ("norm", "random")
STATE_DTYPES = (None, torch.float32)

HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")
# torch.optim.AdamW's implementation flags: accepted so that AdamW configs load unchanged, stored in
# every group as torch stores them, and (but for the checks in check_group) no influence on the
# step, which has one implementation (SparseAdamW's docstring says what each means here).
ADAMW_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
# Options added after the first release, with the behaviour a group saved before them had: a
# state dict without them loads with these values (torch's optimizers fill theirs the same way).
LATER_OPTIONS = {"maximize": False, "selection": "norm", "seed": 0, **ADAMW_FLAGS}
# Every other option, in a fixed order: their values, as a tuple, are compared on every step.
SHAPING_KEYS = ("maximize", "density", "block_size", "scope", "reselect_every", "backend", "blueprint_weight",
                "state_dtype", "score", "score_ema", "min_blocks_per_tensor", "error_feedback",
                "max_grad_norm", "state_layout", "selection", "seed", "foreach", "fused", "capturable",
                "differentiable")
# SparseSGD's options that shape a step: momentum decides whether there are buffers, nesterov
# the kernel (docs/design.md §3.7). Absent from other optimizers' groups (compared as None).
SGD_SHAPING_KEYS = ("momentum", "nesterov")


def shaping_values(group: dict) -> tuple:
    """The values of a group's shaping options (no per-option Python call: one C-level map;
    an option the group's optimizer does not have reads as None)."""
    return tuple(map(group.get, SHAPING_KEYS + SGD_SHAPING_KEYS))


def sparsity_options(density, block_size, scope, reselect_every, backend, blueprint, blueprint_weight, state_dtype,
                     score, score_ema, min_blocks_per_tensor, error_feedback, max_grad_norm, state_layout, selection,
                     seed) -> dict:
    """The group options every sparse optimizer has (SparseAdamW documents them), in their order;
    ``blueprint`` only decides the default ``blueprint_weight`` (0.5 with one, else 0)."""
    if blueprint_weight is None:
        blueprint_weight = 0.0 if blueprint is None else 0.5
    return {"density": density, "block_size": block_size, "scope": scope, "reselect_every": reselect_every,
            "backend": backend, "blueprint_weight": blueprint_weight, "state_dtype": state_dtype, "score": score,
            "score_ema": score_ema, "min_blocks_per_tensor": min_blocks_per_tensor,
            "error_feedback": error_feedback, "max_grad_norm": max_grad_norm, "state_layout": state_layout,
            "selection": selection, "seed": seed}


def namer(where: str):
    return (lambda key: f"{where}[{key!r}]") if where else (lambda key: key)


def check_hyper(group: dict, where: str = "") -> None:
    """The update's hyper-parameters; cheap, so checked on every step."""
    # Also under torch.compile: a value changed by hand reaches a compiled step through a guard
    # (it recompiles), and a bad one must fail here, not deep in the kernels' tracing.
    name = namer(where)
    _checks.tensor_or(_checks.non_negative, group["lr"], name("lr"))
    check_betas(group["betas"], name("betas"))
    _checks.non_negative(group["eps"], name("eps"))
    _checks.tensor_or(_checks.non_negative, group["weight_decay"], name("weight_decay"))


def check_betas(betas, name: str) -> None:
    """A pair (beta1, beta2), each a number or a one-element tensor in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {_checks.show(betas, 'repr')}")
    _checks.tensor_or(_checks.beta, betas[0], f"{name}[0]")
    _checks.tensor_or(_checks.beta, betas[1], f"{name}[1]")


def check_group(group: dict, where: str = "", has_blueprint: bool = False, rule=None) -> None:
    """Every option of a group; ``where`` prefixes the key in a message (``param_groups[1]``).
    ``rule``: the optimizer's update rule (:mod:`.rules`; None: AdamW's), which checks its own
    hyper-parameters and flags."""
    (check_hyper if rule is None else rule.check_hyper)(group, where)
    check_selection(group, where)
    name = namer(where)
    _checks.flag(group["maximize"], name("maximize"))
    _checks.unit_interval(group["blueprint_weight"], name("blueprint_weight"))
    if group["selection"] == "random" and group["score_ema"] != 0.0:
        raise ValueError(f"{name('score_ema')} is {_checks.show(group['score_ema'])}, but selection='random' ranks "
                         "no scores: set score_ema=0")
    _checks.beta(group["score_ema"], name("score_ema"))
    _checks.flag(group["error_feedback"], name("error_feedback"))
    if group["max_grad_norm"] is not None:
        _checks.positive(group["max_grad_norm"], name("max_grad_norm"))
    if group["state_dtype"] not in STATE_DTYPES:
        raise ValueError(f"{name('state_dtype')} must be None (the param's dtype) or torch.float32, "
                         f"got {_checks.show(group['state_dtype'], 'repr')}")
    check_blueprint_weight(group, name("blueprint_weight"), has_blueprint)
    (check_adamw_flags if rule is None else rule.check_flags)(group, where)


def check_selection(group: dict, where: str = "") -> None:
    """The options that choose the blocks and lay out their state: shared by SparseAdamW and
    ``sparse_grad.sparsify``, which selects the same way."""
    name = namer(where)
    _checks.density(group["density"], name("density"))
    _checks.block_size(group["block_size"], name("block_size"))
    _checks.choice(group["scope"], SCOPES, name("scope"))
    _checks.positive_int(group["reselect_every"], name("reselect_every"))
    backends.check_backend(group["backend"], name("backend"))
    _checks.choice(group["score"], SCORES, name("score"))
    _checks.choice(group["selection"], SELECTIONS, name("selection"))
    _checks.non_negative_int(group["seed"], name("seed"))
    _checks.non_negative_int(group["min_blocks_per_tensor"], name("min_blocks_per_tensor"))
    _checks.choice(group["state_layout"], STATE_LAYOUTS, name("state_layout"))


def check_adamw_flags(group: dict, where: str = "") -> None:
    """torch.optim.AdamW's flags (ADAMW_FLAGS); a group without them (saved before they
    existed) has torch's defaults."""
    name = namer(where)
    for key in ("foreach", "fused"):
        value = group.get(key)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name(key)} must be None or a bool, got {value!r}")
    for key in ("capturable", "differentiable"):
        _checks.flag(group.get(key, False), name(key))
    if group.get("differentiable", False):
        raise ValueError(f"{name('differentiable')}=True is not supported: SparseAdamW's step runs under "
                         "torch.no_grad() in fused kernels, so autograd cannot see through it")
    # Dynamo sets capturable=True in its traced view of every param group of an optimizer it
    # compiles (torch's own optimizers then take their capturable path): not the user's choice.
    if group.get("capturable", False) and group["backend"] == "reference" and not torch.compiler.is_compiling():
        raise ValueError(f"{name('capturable')}=True with backend='reference': that backend reads block ids "
                         "on the host (a sync on CUDA), so its step cannot be captured in a CUDA graph; "
                         "use backend='auto', 'triton' or 'cuda'")


def check_blueprint_weight(group: dict, name: str, has_blueprint: bool) -> None:
    if not has_blueprint and group["blueprint_weight"] != 0.0:
        raise ValueError(f"{name} is {_checks.show(group['blueprint_weight'])}, but SparseAdamW has no blueprint "
                         "to blend (pass blueprint=...)")
    if group["selection"] == "random" and group["blueprint_weight"] != 0.0:
        raise ValueError(f"{name} is {_checks.show(group['blueprint_weight'])}, but selection='random' blends no "
                         "blueprint: set blueprint_weight=0")


def saved_group(saved: dict, defaults: dict, where: str, later: dict = LATER_OPTIONS) -> dict:
    """A saved param group with the options it predates filled in (:data:`LATER_OPTIONS`); any
    other option missing means the group was not saved by SparseAdamW."""
    if not isinstance(saved, dict) or "params" not in saved:
        raise ValueError(f"{where} must be a dict with the group's 'params'")
    missing = [key for key in defaults if key not in saved and key not in later]
    if missing:
        raise ValueError(f"{where} has no {missing[0]!r} option: it was not saved by this optimizer's state_dict()")
    return {**{key: value for key, value in later.items() if key not in saved}, **saved}


def state_dtype(group: dict, param: torch.Tensor) -> torch.dtype:
    """The dtype of a param's float state (moments, error buffer)."""
    return group["state_dtype"] or param.dtype
