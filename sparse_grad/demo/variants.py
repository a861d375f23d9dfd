"""The optimizers stage 2 of the demo compares, each a small :class:`Variant` spec.

A variant builds its optimizer on a fresh copy of the stage-1 model; :func:`~.stages.run_variant`
trains any variant the same way (same start, same batches, same step budget). Its tunable
hyper-parameters (``lr``, a blueprint's blend weight) are in ``hyper``; ``variant.with_hyper(lr=...)``
is the same variant with other values (what :mod:`.tuning` searches over).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..nn import sparse_backward as attach_sparse_backward
from ..optim import SparseAdamW

__all__ = ["FAMILIES", "Variant", "dense_adamw", "fixed_layers", "sparse", "standard_variants"]

# Families in the order the report lists them; "norm" vs "random" is the comparison that matters.
# "interval": norm selection every few steps, with and without sparse_backward (the same numbers,
# other costs).
FAMILIES = ("dense", "norm", "random", "blueprint", "compact", "interval", "fixed-layer")


@dataclass(frozen=True)
class Variant:
    """One optimizer setting of stage 2.

    ``build(model, seed)`` returns the optimizer for ``model`` (and may freeze parameters it does
    not train: ``requires_grad_(False)``, so their grads are not computed either); ``seed``
    varies with the repeat, for variants that draw random numbers.
    """

    name: str
    family: str
    build: Callable[[torch.nn.Module, int], torch.optim.Optimizer] = field(compare=False)
    density: float | None = None  # fraction of the parameters' blocks updated per step, if fixed
    note: str = ""
    hyper: dict = field(default_factory=dict, compare=False)  # e.g. {"lr": 2e-3}
    respec: Callable[..., Variant] | None = field(default=None, compare=False)  # hyper -> the variant
    # The name of a variant this one trains to the same numbers as (e.g. the same optimizer
    # without sparse_backward): it runs once at that variant's chosen hyper-parameters.
    twin_of: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def with_hyper(self, **changes) -> Variant:
        """This variant with some of its ``hyper`` values changed."""
        unknown = sorted(set(changes) - set(self.hyper))
        if unknown or self.respec is None:
            raise ValueError(f"variant {self.name!r} has no hyper-parameter {(unknown or list(changes))[0]!r} "
                             f"(it has {sorted(self.hyper)})")
        return self.respec(**{**self.hyper, **changes})


def dense_adamw(lr: float, weight_decay: float) -> Variant:
    return Variant("AdamW (dense)", "dense",
                   lambda model, seed: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay),
                   density=1.0, note="torch.optim.AdamW on every parameter", hyper={"lr": lr},
                   respec=lambda lr: dense_adamw(lr, weight_decay))


def sparse(family: str, density: float, *, lr: float, weight_decay: float, block_size: int,
           backend: str = "auto", blueprint=None, blueprint_weight: float = 0.5, name: str | None = None,
           reselect_every: int = 1, sparse_backward: bool = False, twin_of: str | None = None,
           **extra_options) -> Variant:
    """SparseAdamW at ``density``: ``family`` "norm" (top blocks by gradient norm), "random"
    (as many blocks drawn uniformly at random: the control), "blueprint" (norms blended with the
    stage-1 blueprint), "compact" (norm selection, compact state layout) or "interval" (norm
    selection every ``reselect_every`` steps; with ``sparse_backward`` the Linear layers compute
    the weight gradients of the selected blocks only between reselections,
    :func:`sparse_grad.nn.sparse_backward`). ``extra_options`` go to SparseAdamW as they are
    (e.g. ``error_feedback=True``), ``name`` replaces the default."""
    options = {"lr": lr, "weight_decay": weight_decay, "density": density, "block_size": block_size,
               "backend": backend, **extra_options}
    hyper = {"lr": lr}
    if family == "random":
        note = "SparseAdamW, blocks drawn uniformly at random each step"
    elif family == "blueprint":
        if blueprint is None:
            raise ValueError("family 'blueprint' needs blueprint=")
        options.update(blueprint=blueprint, blueprint_weight=blueprint_weight)
        hyper["blueprint_weight"] = blueprint_weight
        note = f"SparseAdamW, norms blended with the stage-1 blueprint (weight {blueprint_weight:g})"
    elif family == "compact":
        options.update(state_layout="compact")
        note = "SparseAdamW, norm selection, moments kept only for the selected blocks"
    elif family == "norm":
        note = "SparseAdamW, top blocks by gradient norm each step"
    elif family == "interval":
        if reselect_every < 2:
            raise ValueError(f"family 'interval' needs reselect_every >= 2, got {reselect_every!r}")
        options.update(reselect_every=reselect_every)
        note = f"SparseAdamW, top blocks by gradient norm every {reselect_every} steps" + (
            "; between reselections the Linear layers compute only the selected blocks' weight gradients "
            "(sparse_backward)" if sparse_backward else "")
    else:
        raise ValueError(f"family must be 'norm', 'random', 'blueprint', 'compact' or 'interval', got {family!r}")
    if sparse_backward and family != "interval":
        raise ValueError(f"sparse_backward needs family 'interval' (it saves work between reselections), "
                         f"got {family!r}")

    def build(model: torch.nn.Module, seed: int) -> torch.optim.Optimizer:
        extra = {"selection": "random", "seed": seed} if family == "random" else {}
        opt = SparseAdamW(model.named_parameters(), **options, **extra)
        if sparse_backward:  # the patched layers hold the handle: it lives as long as the model
            attach_sparse_backward(model, opt)
        return opt

    def respec(**new_hyper) -> Variant:
        return sparse(family, density, weight_decay=weight_decay, block_size=block_size, backend=backend,
                      blueprint=blueprint, name=name, reselect_every=reselect_every,
                      sparse_backward=sparse_backward, twin_of=twin_of,
                      **{**{"blueprint_weight": blueprint_weight}, **new_hyper}, **extra_options)

    default_name = f"{family} d={density:g}" if family != "interval" else (
        f"norm d={density:g} R={reselect_every}" + (" +SB" if sparse_backward else ""))
    return Variant(name or default_name, family, build, density=density, note=note, hyper=hyper, respec=respec,
                   twin_of=twin_of)


def fixed_layers(lr: float, weight_decay: float, last: int = 1) -> Variant:
    """torch AdamW on the last ``last`` transformer layers, the final norm and the output head
    only (LISA-like layer freezing; everything else is frozen, so its grads are not computed)."""

    def build(model: torch.nn.Module, seed: int) -> torch.optim.Optimizer:
        keep = trained_by_fixed_layers(model, last)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        return torch.optim.AdamW([p for n, p in model.named_parameters() if n in keep], lr=lr,
                                 weight_decay=weight_decay)

    return Variant(f"last {last} layer{'s' if last > 1 else ''} (AdamW)", "fixed-layer", build,
                   note=f"torch.optim.AdamW on the last {last} layer(s), final norm and head; the rest frozen",
                   hyper={"lr": lr}, respec=lambda lr: fixed_layers(lr, weight_decay, last))


def trained_by_fixed_layers(model: torch.nn.Module, last: int) -> set[str]:
    """Names of the parameters the fixed-layer baseline trains on a :class:`~.model.TinyLM`."""
    layers = len(model.layers)
    if not 1 <= last <= layers:
        raise ValueError(f"last must be in [1, {layers}] (the model's layers), got {last}")
    prefixes = tuple(f"layers.{i}." for i in range(layers - last, layers)) + ("norm.", "head.")
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def standard_variants(densities: Sequence[float], *, lr: float, weight_decay: float, block_size: int,
                      blueprint, backend: str = "auto", compact_density: float | None = None,
                      fixed_last: int = 1, error_feedback: bool = False, interval_density: float | None = None,
                      reselect_every: int = 10) -> list[Variant]:
    """What the demo compares: dense AdamW; norm, random and blueprint selection at every
    density; compact state at ``compact_density``; norm selection every ``reselect_every``
    steps at ``interval_density``, without and with sparse_backward; the fixed-layer baseline.
    ``error_feedback``: every SparseAdamW variant keeps the unapplied gradient (its names end in
    "+EF"; it makes every step read the whole gradient, so sparse_backward then saves nothing)."""
    common = {"lr": lr, "weight_decay": weight_decay, "block_size": block_size, "backend": backend}
    suffix = " +EF" if error_feedback else ""
    if error_feedback:
        common["error_feedback"] = True

    def named(family: str, d: float) -> Variant:
        return sparse(family, d, blueprint=blueprint, name=f"{family} d={d:g}{suffix}" if error_feedback else None,
                      **common)

    variants = [dense_adamw(lr, weight_decay)]
    for family in ("norm", "random", "blueprint"):
        variants += [named(family, d) for d in densities]
    if compact_density is not None:
        variants.append(named("compact", compact_density))
    if interval_density is not None:
        plain = f"norm d={interval_density:g} R={reselect_every}{suffix}"
        variants += [sparse("interval", interval_density, reselect_every=reselect_every, name=plain, **common),
                     sparse("interval", interval_density, reselect_every=reselect_every, sparse_backward=True,
                            twin_of=plain, name=f"{plain} +SB", **common)]
    if fixed_last:
        variants.append(fixed_layers(lr, weight_decay, fixed_last))
    return variants
