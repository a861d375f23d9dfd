"""Which parameters SparseAdamW trains, at which density and with which weight decay.

:func:`param_groups` turns a model and PEFT-style ``target_modules`` into the param groups of a
:class:`~sparse_grad.SparseAdamW`::

    groups = sparse_grad.param_groups(model, target_modules=["q_proj", "v_proj", "mlp"],
                                      density=0.05, densities={"mlp": 0.02})
    optimizer = sparse_grad.SparseAdamW(groups, lr=1e-4, block_size=4096)

:meth:`sparse_grad.blueprint.Blueprint.param_groups` gives the same groups with each
submodule's density taken from a blueprint's recommendations.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from . import _checks

__all__ = ["decay_parameter_names", "param_groups"]

# The rule of transformers' Trainer.get_decay_parameter_names: no decay for parameters inside a
# LayerNorm/RMSNorm, nor for names that look like biases or norms.
NO_DECAY_NAME_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                       r"_norm(?:$|\.)"))
NORM_LAYERS = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
# SparseAdamW's default block size: a tensor below one block is cheaper to update whole.
DEFAULT_MIN_SPARSE_SIZE = 4096


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that get weight decay under transformers' Trainer rule."""
    _check_model(model)
    in_norm = {name if not prefix else f"{prefix}.{name}"
               for prefix, module in model.named_modules() if isinstance(module, NORM_LAYERS)
               for name, _ in module.named_parameters()}
    return {name for name, _ in model.named_parameters()
            if name not in in_norm and not any(p.search(name.lower()) for p in NO_DECAY_NAME_PATTERNS)}


def _module_paths(param_name: str) -> list[str]:
    """The module that owns a parameter and every module above it (not the model itself)."""
    parts = param_name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _suffix_regex(pattern: str, name: str) -> re.Pattern:
    """A name or regex matched against the end of a module path, at a ``.`` boundary (as PEFT's
    ``rank_pattern`` keys are)."""
    try:
        return re.compile(rf"(?:.*\.)?(?:{pattern})")
    except re.error as err:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None


def _target_matcher(target_modules) -> Callable[[str], bool]:
    """PEFT's ``target_modules``: None (every module), a list of names (a module whose path is
    the name or ends with ``.name``) or one regex string (a module whose whole path matches)."""
    if target_modules is None:
        return lambda param_name: True
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({err})") from None
        return lambda param_name: any(regex.fullmatch(m) for m in _module_paths(param_name))
    if isinstance(target_modules, Mapping) or not isinstance(target_modules, Iterable):
        raise TypeError("target_modules must be None, a regex string or a list of module names, got "
                        f"{type(target_modules).__name__}")
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"target_modules must hold non-empty module-name strings, got {names!r}")
    return lambda param_name: any(m == n or m.endswith("." + n) for m in _module_paths(param_name) for n in names)


def _density_of(density, densities) -> Callable[[str], float]:
    _checks.density(density, "density")
    if densities is None:
        return lambda param_name: density
    if not isinstance(densities, Mapping):
        raise TypeError(f"densities must be a dict {{module pattern: density}}, got {type(densities).__name__}")
    rules = []
    for pattern, value in densities.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"densities: keys must be non-empty module patterns, got {pattern!r}")
        _checks.density(value, f"densities[{pattern!r}]")
        rules.append((_suffix_regex(pattern, f"densities[{pattern!r}]"), value))

    def of(param_name: str) -> float:
        for module in _module_paths(param_name):  # the innermost module that a key matches decides
            for regex, value in rules:
                if regex.fullmatch(module):
                    return value
        return density
    return of


def _no_decay_of(model: nn.Module, no_decay) -> Callable[[str], bool]:
    if no_decay is None:
        decay = decay_parameter_names(model)
        return lambda param_name: param_name not in decay
    if isinstance(no_decay, str) or not isinstance(no_decay, Iterable):
        raise TypeError(f"no_decay must be None (transformers' rule) or a list of name patterns, got {no_decay!r}")
    patterns = list(no_decay)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"no_decay must hold non-empty strings, got {patterns!r}")
    regexes = []
    for p in patterns:
        try:
            regexes.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"no_decay: {p!r} is not a valid regular expression ({err})") from None
    return lambda param_name: any(r.search(param_name) for r in regexes)


def _groups(model: nn.Module, targeted: Callable[[str], bool], density_of: Callable[[str], float],
            min_sparse_size, weight_decay, no_decay, extra: dict) -> list[dict]:
    min_sparse_size = _checks.non_negative_int(min_sparse_size, "min_sparse_size")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    no_decay_of = _no_decay_of(model, no_decay)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    chosen = [(name, p) for name, p in trainable if targeted(name)]
    if not chosen:
        raise ValueError("target_modules matched no trainable parameter of the model")
    groups: dict[tuple[float, float], dict] = {}
    for name, p in chosen:
        density = 1.0 if p.numel() < min_sparse_size else float(density_of(name))
        decay = 0.0 if no_decay_of(name) else weight_decay
        group = groups.setdefault((density, decay), {"params": [], "density": density, "weight_decay": decay, **extra})
        group["params"].append((name, p))
    chosen_ids = {id(p) for _, p in chosen}
    for _, p in trainable:  # only once every argument has passed, so bad input changes nothing
        if id(p) not in chosen_ids:
            p.requires_grad_(False)
    return list(groups.values())


def param_groups(model: nn.Module, target_modules: str | Iterable[str] | None = None, *,
                 density: float = 0.05, densities: Mapping[str, float] | None = None,
                 min_sparse_size: int = DEFAULT_MIN_SPARSE_SIZE, weight_decay: float = 0.01,
                 no_decay: Iterable[str] | None = None) -> list[dict]:
    """Param groups for :class:`~sparse_grad.SparseAdamW` over the targeted modules of ``model``.

    Args:
        model: the model to fine-tune.
        target_modules: as PEFT's ``target_modules``: a list of module names (a module is
            targeted if its path is the name or ends with ``.name``: ``"q_proj"`` targets
            every ``...attn.q_proj``) or one regex string (a module is targeted if its whole
            path matches). A parameter is targeted if its module or a module above it is.
            None: every trainable parameter.
        density: the density of the targeted parameters.
        densities: ``{pattern: density}`` for some modules: a pattern (a name or a regex) is
            matched against the end of a module path at a ``.`` boundary, like PEFT's
            ``rank_pattern``; the innermost matching module decides, and among keys matching
            the same module, the first.
        min_sparse_size: parameters with fewer elements are updated densely (density 1.0): a
            tensor below one block costs little to update whole, and sparse updates of biases
            and norms save nothing.
        weight_decay: the weight decay of parameters that have one.
        no_decay: patterns (regexes searched in the parameter name, so plain substrings such
            as ``"bias"`` work) of parameters without weight decay; None: transformers'
            rule (biases and the weights of LayerNorm/RMSNorm or of anything named ``norm``).

    Returns:
        one group per (density, weight decay) pair that occurs, in the model's parameter order:
        ``{"params": [(name, param), ...], "density": d, "weight_decay": wd}``; names are kept
        so that a blueprint matches them.

    Untargeted parameters are left out of the groups and frozen: this sets their
    ``requires_grad`` to False (as PEFT does), so no gradient is computed or stored for them.
    Parameters already frozen stay frozen and are left out.
    """
    _check_model(model)
    return _groups(model, _target_matcher(target_modules), _density_of(density, densities), min_sparse_size,
                   weight_decay, no_decay, {})

