"""Every stage-2 variant at its own hyper-parameters, chosen on a validation split.

One learning rate for all variants is not a fair comparison: a sparse update moves a few blocks,
and its best step size need not be dense AdamW's. So each variant runs at a small grid of
learning rates (multiples of the demo's base lr; dense AdamW gets the same grid) and keeps the run
with the lowest loss on the *tuning* split; the loss the demo reports is that run's loss on the
*held-out* split, which played no part in the choice (:func:`~.data.train_tune_test_split`).

Two families take the learning rate chosen for norm selection at their density instead of a grid
of their own: blueprint-guided selection (the same update with other blocks chosen; its grid is
the blueprint's blend weight) and compact state (the same selection and update, other storage;
at a density norm selection did not run at, it searches the lr grid itself).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import _checks
from .stages import VariantResult
from .variants import Variant

__all__ = ["Choice", "candidates", "check_grid", "choose", "tune"]

# The hyper-parameter each family searches; None: it reuses norm selection's lr at its density.
SEARCHED = {"dense": "lr", "norm": "lr", "random": "lr", "fixed-layer": "lr", "blueprint": "blueprint_weight",
            "compact": None}
BORROWS_LR_FROM_NORM = ("blueprint", "compact")


@dataclass
class Choice:
    """One variant's grid: every run, and the one chosen (lowest tuning loss)."""

    name: str
    searched: str | None
    runs: list[VariantResult]
    chosen: VariantResult

    def as_dict(self) -> dict:
        return {"variant": self.name, "searched": self.searched, "chosen": self.chosen.hyper,
                "grid": [{"hyper": r.hyper, "tune_loss": r.tune_loss, "val_loss": r.val_loss} for r in self.runs]}


def check_grid(values: Sequence[float], name: str, check: Callable[[float, str], float] = _checks.positive
               ) -> tuple[float, ...]:
    """A non-empty grid of distinct values, each passing ``check``."""
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        check(v, name)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has repeated values: {values!r}")
    return values


def candidates(variant: Variant, chosen_norm_lr: dict[float, float], lr_multipliers: Sequence[float],
               blueprint_weights: Sequence[float]) -> list[Variant]:
    """The grid ``variant`` runs at. ``chosen_norm_lr[density]``: the lr chosen for norm selection
    at that density (blueprint and compact variants borrow it; norm variants run first)."""
    searched = searched_by(variant, chosen_norm_lr)
    if variant.family in BORROWS_LR_FROM_NORM and variant.density in chosen_norm_lr and "lr" in variant.hyper:
        variant = variant.with_hyper(lr=chosen_norm_lr[variant.density])
    if searched is None:
        return [variant]
    if searched == "lr":
        return [variant.with_hyper(lr=variant.hyper["lr"] * m) for m in lr_multipliers]
    return [variant.with_hyper(**{searched: value}) for value in blueprint_weights]


def searched_by(variant: Variant, chosen_norm_lr: dict[float, float]) -> str | None:
    """The hyper-parameter ``variant`` searches (None: none, it borrows norm selection's lr, or
    it declares no such hyper-parameter and runs as it is)."""
    if variant.family in BORROWS_LR_FROM_NORM and variant.density not in chosen_norm_lr:
        searched = "lr" if variant.family == "compact" else SEARCHED[variant.family]
    else:
        searched = SEARCHED.get(variant.family, "lr")
    return searched if searched in variant.hyper else None


def choose(runs: Sequence[VariantResult]) -> VariantResult:
    """The run with the lowest tuning loss (the first of equals: the grid's order breaks ties)."""
    if not runs or any(r.tune_loss is None for r in runs):
        raise ValueError("every run needs a tune_loss (run_variant with tune_batches)")
    return min(runs, key=lambda r: r.tune_loss)


def tune(variants: Sequence[Variant], run: Callable[[Variant], VariantResult], *,
         lr_multipliers: Sequence[float], blueprint_weights: Sequence[float]) -> list[Choice]:
    """Run every variant's grid with ``run`` and choose; norm variants go first so that the
    families that borrow their lr find it."""
    order = sorted(range(len(variants)), key=lambda i: variants[i].family in BORROWS_LR_FROM_NORM)
    chosen_norm_lr: dict[float, float] = {}
    choices: dict[int, Choice] = {}
    for i in order:
        variant = variants[i]
        runs = [run(c) for c in candidates(variant, chosen_norm_lr, lr_multipliers, blueprint_weights)]
        best = choose(runs)
        if variant.family == "norm" and "lr" in best.hyper:
            chosen_norm_lr[variant.density] = best.hyper["lr"]
        choices[i] = Choice(variant.name, searched_by(variant, chosen_norm_lr), runs, best)
    return [choices[i] for i in range(len(variants))]
