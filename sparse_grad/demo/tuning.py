"""Every stage-2 variant at its own hyper-parameters, chosen on a validation split.

One learning rate for all variants is not a fair comparison: a sparse update moves a few blocks,
and its best step size need not be dense AdamW's. So each variant runs at a small grid of
learning rates (multiples of the demo's base lr; dense AdamW gets the same grid) and keeps the run
with the lowest loss on the *tuning* split; the loss the demo reports is that run's loss on the
*held-out* split, which played no part in the choice (:func:`~.data.train_tune_test_split`).

Two families take the learning rate chosen for norm selection at their density instead of a grid
of their own: blueprint-guided selection (the same update with other blocks chosen; its grid is
the blueprint's blend weight) and compact state (the same selection and update, other storage;
at a density norm selection did not run at, it searches the lr grid itself). A variant that trains
to the same numbers as another (``Variant.twin_of``: the same optimizer with sparse_backward)
runs once, at its twin's choice.

Searching every grid is most of the default demo's time, so the choices can be recorded and
reused (:func:`recorded_choices`): a run that searched writes ``tuning.json`` (the config the
choice depends on, where and when, and every grid); a later run of the same config reads it and
runs each variant once at its recorded choice. The package ships the recording of the default
demo (``recorded_tuning.json``), so ``python -m sparse_grad demo`` reuses it and
``--retune`` searches again.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import _checks
from .stages import VariantResult
from .variants import Variant

__all__ = ["RECORDED", "Choice", "candidates", "check_grid", "choose", "recorded_choices", "rerun", "tune", "tuning_key",
           "write_recording"]

# The hyper-parameter each family searches; None: it reuses norm selection's lr at its density.
SEARCHED = {"dense": "lr", "norm": "lr", "random": "lr", "fixed-layer": "lr", "blueprint": "blueprint_weight",
            "compact": None}
BORROWS_LR_FROM_NORM = ("blueprint", "compact")
# The default demo's recorded choices (see the module's docstring).
RECORDED = Path(__file__).with_name("recorded_tuning.json")
# Config fields that do not change which hyper-parameters a grid chooses: where and how fast it runs,
# and the reruns of the choice.
_NOT_IN_KEY = ("device", "backend", "threads", "repeats")


@dataclass
class Choice:
    """One variant's grid: every run, and the one chosen (lowest tuning loss). ``recorded``: the
    grid of the recording this run reused (``runs`` is then the chosen run alone)."""

    name: str
    searched: str | None
    runs: list[VariantResult]
    chosen: VariantResult
    recorded: list[dict] | None = None

    def as_dict(self) -> dict:
        grid = self.recorded if self.recorded is not None else [
            {"hyper": r.hyper, "tune_loss": r.tune_loss, "val_loss": r.val_loss} for r in self.runs]
        return {"variant": self.name, "searched": self.searched, "chosen": self.chosen.hyper, "grid": grid,
                "source": "recorded" if self.recorded is not None else "searched"}


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
    order = sorted(range(len(variants)), key=lambda i: (variants[i].twin_of is not None,
                                                         variants[i].family in BORROWS_LR_FROM_NORM))
    names = {v.name for v in variants}
    chosen_norm_lr: dict[float, float] = {}
    choices: dict[int, Choice] = {}
    by_name: dict[str, Choice] = {}
    for i in order:
        variant = variants[i]
        if variant.twin_of is not None and variant.twin_of not in names:
            raise ValueError(f"variant {variant.name!r} is the twin of {variant.twin_of!r}, which is not run")
        twin = by_name.get(variant.twin_of)
        if twin is not None:
            grid = [variant.with_hyper(**twin.chosen.hyper)]
        else:
            grid = candidates(variant, chosen_norm_lr, lr_multipliers, blueprint_weights)
        runs = [run(c) for c in grid]
        best = choose(runs)
        if variant.family == "norm" and "lr" in best.hyper:
            chosen_norm_lr[variant.density] = best.hyper["lr"]
        searched = None if twin is not None else searched_by(variant, chosen_norm_lr)
        choices[i] = by_name[variant.name] = Choice(variant.name, searched, runs, best)
    return [choices[i] for i in range(len(variants))]


def rerun(variants: Sequence[Variant], run: Callable[[Variant], VariantResult], recorded: dict[str, dict]
          ) -> list[Choice]:
    """Every variant once, at its recorded choice (``recorded``: :func:`recorded_choices`)."""
    choices = []
    for variant in variants:
        entry = recorded[variant.name]
        result = run(variant.with_hyper(**entry["chosen"]) if entry["chosen"] else variant)
        choices.append(Choice(variant.name, entry["searched"], [result], result, recorded=entry["grid"]))
    return choices


def tuning_key(cfg) -> dict:
    """The fields of a demo config (:class:`~.experiment.DemoConfig`) the choices depend on, as JSON."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}))


def write_recording(path: Path, cfg, environment: dict, choices: Sequence[Choice]) -> None:
    """Write ``choices`` (a run that searched its grids) where :func:`recorded_choices` reads them."""
    if any(c.recorded is not None for c in choices):
        raise ValueError("only a run that searched its grids can be recorded (this one reused a recording)")
    recording = {"config": tuning_key(cfg), "recorded": {k: environment.get(k) for k in
                                                          ("date_utc", "machine", "torch", "sparse_grad")},
                 "choices": [c.as_dict() for c in choices]}
    Path(path).write_text(json.dumps(recording, indent=1) + "\n")


def recorded_choices(cfg, variants: Sequence[Variant], path: Path | None = None) -> tuple[dict, dict] | None:
    """The recorded choice of every one of ``variants`` (by name: ``{"searched", "chosen",
    "grid"}``) and the recording's ``recorded`` (where and when), if the recording at ``path``
    (default: the packaged :data:`RECORDED`) was made with the same :func:`tuning_key` and holds
    every variant; else None (the run searches). A recording given by ``path`` that does not
    fit raises ValueError saying why; every value is checked, nothing is executed (JSON only)."""
    explicit = path is not None
    path = Path(path) if explicit else RECORDED
    try:
        recording = json.loads(path.read_text())
    except FileNotFoundError:
        if explicit:
            raise ValueError(f"tuning recording {path} does not exist") from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"tuning recording {path} is not JSON: {exc}") from None
    try:
        return _check_recording(recording, cfg, variants, path)
    except _Mismatch as why:
        if explicit:
            raise ValueError(f"tuning recording {path} does not fit this run: {why}") from None
        return None


class _Mismatch(Exception):
    """A well-formed recording of another config or other variants (the run searches instead)."""


def _check_recording(recording, cfg, variants: Sequence[Variant], path: Path) -> tuple[dict, dict]:
    def bad(why: str) -> ValueError:
        return ValueError(f"tuning recording {path}: {why}")

    if not isinstance(recording, dict) or not {"config", "recorded", "choices"} <= recording.keys():
        raise bad("needs the keys 'config', 'recorded' and 'choices'")
    if not isinstance(recording["recorded"], dict) or not isinstance(recording["choices"], list):
        raise bad("'recorded' must be an object and 'choices' a list")
    key = tuning_key(cfg)
    if recording["config"] != key:
        saved = recording["config"] if isinstance(recording["config"], dict) else {}
        differ = sorted(k for k in set(key) | set(saved) if key.get(k) != saved.get(k))
        raise _Mismatch(f"it was made with other settings ({', '.join(differ) or 'config'})")
    entries = {}
    for entry in recording["choices"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("variant"), str)
                and isinstance(entry.get("chosen"), dict) and isinstance(entry.get("grid"), list)
                and (entry.get("searched") is None or isinstance(entry.get("searched"), str))):
            raise bad("every choice needs 'variant' (a name), 'searched', 'chosen' (an object) and 'grid' (a list)")
        for name, value in entry["chosen"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise bad(f"{entry['variant']!r}: chosen {name} must be a finite number >= 0, got {value!r}")
        entries[entry["variant"]] = {k: entry[k] for k in ("searched", "chosen", "grid")}
    for variant in variants:
        entry = entries.get(variant.name)
        if entry is None:
            raise _Mismatch(f"it has no choice for variant {variant.name!r}")
        if set(entry["chosen"]) != set(variant.hyper):
            raise bad(f"{variant.name!r}: chosen {sorted(entry['chosen'])}, but the variant's hyper-parameters "
                      f"are {sorted(variant.hyper)}")
    return entries, recording["recorded"]
