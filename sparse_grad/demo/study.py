"""The low-density study (docs/low_density_study.md): at densities 0.01-0.2, which setting of
norm selection recovers the most of dense AdamW's loss gain, on the demo's stage-2 tasks.

Per task, from one stage 1 (the demo's): dense AdamW and norm selection at every density run on
the learning-rate grid; the lr with the lowest mean loss on the tuning split over the repeats is
chosen (dense AdamW's too); then every other setting (error feedback, a score EMA, reselecting
every few steps, another block size, the RMS score) runs at its density's chosen lr. Every run is
repeated with other batch orders; a repeat's share of dense gain is (start − loss) / (start −
dense loss of the same repeat), so shares and their differences are paired by repeat.

``python benchmarks/low_density_study.py --out DIR`` writes ``DIR/low_density_study.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .. import _checks
from .experiment import DemoConfig, Stage2Setup, _cpu_name, config_for, default_threads, prepare
from .stages import VariantResult
from .tuning import check_grid
from .variants import dense_adamw, sparse

__all__ = ["FACTORS", "main", "paired", "run_study", "run_task", "to_markdown"]

# The settings tried at each density's chosen lr: (label, SparseAdamW options).
FACTORS = (("error_feedback", {"error_feedback": True}), ("score_ema 0.9", {"score_ema": 0.9}),
           ("reselect_every 10", {"reselect_every": 10}), ("score rms", {"score": "rms"}),
           ("block 64", {"block_size": 64}), ("block 4096", {"block_size": 4096}))


def paired(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of per-repeat values (NaN error for one repeat)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _shares(runs: Sequence[VariantResult], dense: Sequence[VariantResult], start: float) -> list[float]:
    return [(start - r.val_loss) / (start - d.val_loss) for r, d in zip(runs, dense)]


def _cpr_vs_dense(runs: Sequence[VariantResult], dense: Sequence[VariantResult], start: float) -> list[float]:
    # gain per second of training over dense's: Γ = device time, as in the demo's CPR column
    return [((start - r.val_loss) / r.resources["elapsed_s"]) / ((start - d.val_loss) / d.resources["elapsed_s"])
            for r, d in zip(runs, dense)]


def _tune_loss(runs: Sequence[VariantResult]) -> float:
    return statistics.fmean(r.tune_loss for r in runs)


def run_task(setup: Stage2Setup, densities: Sequence[float], lr_multipliers: Sequence[float], repeats: int,
             factors=FACTORS, log=print) -> dict:
    """Every row of one task's tables (see the module docstring)."""
    cfg = setup.cfg
    common = {"weight_decay": cfg.weight_decay, "backend": cfg.backend}

    def run_all(variant, label: str) -> list[VariantResult]:
        started = time.perf_counter()
        runs = [setup.run(variant, r) for r in range(repeats)]
        log(f"{cfg.task}: {label}: held-out {statistics.fmean(r.val_loss for r in runs):.4f}, tuning "
            f"{_tune_loss(runs):.4f} ({time.perf_counter() - started:.0f} s)")
        return runs

    dense_grid = {m: run_all(dense_adamw(cfg.stage2_lr * m, cfg.weight_decay), f"dense lr x{m:g}")
                  for m in lr_multipliers}
    dense_m = min(lr_multipliers, key=lambda m: _tune_loss(dense_grid[m]))
    dense = dense_grid[dense_m]
    start = dense[0].curve[0]["val_loss"]
    rows = []

    def row(density, setting, lr, runs, base=None) -> dict:
        shares = _shares(runs, dense, start)
        out = {"density": density, "setting": setting, "lr": lr, "val_loss": statistics.fmean(r.val_loss for r in runs),
               "tune_loss": _tune_loss(runs), "share": paired(shares), "cpr_vs_dense": paired(
                   _cpr_vs_dense(runs, dense, start)), "shares": shares}
        if base is not None:
            out["vs_base"] = paired([a - b for a, b in zip(shares, base["shares"])])
        log(f"{cfg.task}: d={density:g} {setting} (lr {lr:g}): share of dense gain {_pm(out['share'])}"
            + (f", vs chosen lr {_pm(out['vs_base'], '.1%', '+')}" if base is not None else ""))
        return out

    for m in lr_multipliers:
        rows.append(row(1.0, f"dense lr x{m:g}", cfg.stage2_lr * m, dense_grid[m]))
    for d in densities:
        grid = {m: run_all(sparse("norm", d, lr=cfg.stage2_lr * m, block_size=cfg.block_size, **common),
                           f"norm d={d:g} lr x{m:g}") for m in lr_multipliers}
        best_m = min(lr_multipliers, key=lambda m: _tune_loss(grid[m]))
        lr_rows = {m: row(d, f"lr x{m:g}", cfg.stage2_lr * m, grid[m]) for m in lr_multipliers}
        base = lr_rows[best_m]
        base["chosen"] = True
        rows += lr_rows.values()
        for label, options in factors:
            options = {"block_size": cfg.block_size, **options}
            name = f"norm d={d:g} {label}"
            runs = run_all(sparse("norm", d, lr=cfg.stage2_lr * best_m, name=name, **common, **options), name)
            rows.append(row(d, label, cfg.stage2_lr * best_m, runs, base))
    return {"task": cfg.task, "data": setup.data, "start_val_loss": start, "dense_lr": cfg.stage2_lr * dense_m,
            "dense_val_loss": statistics.fmean(r.val_loss for r in dense), "rows": rows}


def run_study(cfg: DemoConfig, out_dir: Path, *, tasks: Sequence[str] = ("prose", "code"),
              densities: Sequence[float] = (0.01, 0.05, 0.2), lr_multipliers: Sequence[float] = (1.0, 3.0, 10.0),
              repeats: int = 2, factors=FACTORS, log=print) -> dict:
    _checks.positive_int(repeats, "repeats")
    check_grid(densities, "densities", _checks.density)
    check_grid(lr_multipliers, "lr_multipliers")
    started = time.perf_counter()
    stage1, results = None, []
    for task in tasks:
        setup = prepare(replace(cfg, task=task), out_dir, progress=False, stage1=stage1)
        stage1 = setup.stage1  # one stage 1 for every task
        results.append(run_task(setup, densities, lr_multipliers, repeats, factors, log))
    return {"config": {"stage2_steps": cfg.stage2_steps, "stage2_lr": cfg.stage2_lr, "block_size": cfg.block_size,
                       "width": cfg.width, "layers": cfg.layers, "seed": cfg.seed, "threads": cfg.threads},
            "repeats": repeats, "densities": list(densities), "lr_multipliers": list(lr_multipliers),
            "stage1": {"steps": stage1.steps, "stopped_by": stage1.stopped_by,
                       "val_loss": stage1.curve[-1]["val_loss"]},
            "machine": _cpu_name(), "elapsed_s": time.perf_counter() - started, "tasks": results}


def _pm(pair: tuple[float, float], spec: str = ".1%", sign: str = "") -> str:
    mean, se = pair
    return format(mean, sign + spec) + ("" if math.isnan(se) else f" ± {format(se, spec)}")


def to_markdown(study: dict) -> str:
    lines = [f"Stage 1: {study['stage1']['steps']} steps ({study['stage1']['stopped_by']}), held-out source loss "
             f"{study['stage1']['val_loss']:.3f}. {study['repeats']} repeats per setting, "
             f"{study['config']['stage2_steps']} stage-2 steps, base lr {study['config']['stage2_lr']:g}, blocks of "
             f"{study['config']['block_size']}; {study['machine']}, {study['elapsed_s'] / 60:.0f} min.", ""]
    for task in study["tasks"]:
        lines += [f"### Task `{task['task']}`", "", f"{task['data']['stage2']}. Start (held-out) "
                  f"{task['start_val_loss']:.4f}; dense AdamW at its chosen lr {task['dense_lr']:g}: "
                  f"{task['dense_val_loss']:.4f}.", "",
                  "| density | setting | lr | held-out loss | tuning loss | share of dense gain | vs chosen lr "
                  "(paired) | CPR vs dense |", "|---|---|---|---|---|---|---|---|"]
        for r in task["rows"]:
            setting = f"**{r['setting']}** (chosen)" if r.get("chosen") else r["setting"]
            lines.append(f"| {r['density']:g} | {setting} | {r['lr']:g} | {r['val_loss']:.4f} | {r['tune_loss']:.4f} "
                         f"| {_pm(r['share'])} | {_pm(r['vs_base'], '.1%', '+') if 'vs_base' in r else ''} | "
                         f"{_pm(r['cpr_vs_dense'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("low_density_study"))
    parser.add_argument("--tasks", nargs="+", choices=("prose", "code"), default=["prose", "code"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--lr-multipliers", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the demo's --quick model and budget (a smoke test)")
    args = parser.parse_args(argv)
    cfg = config_for(quick=args.quick, threads=default_threads())
    study = run_study(cfg, args.out, tasks=args.tasks, densities=args.densities, lr_multipliers=args.lr_multipliers,
                      repeats=args.repeats)
    (args.out / "low_density_study.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    (args.out / "low_density_study.md").write_text(to_markdown(study), encoding="utf-8")
    print(to_markdown(study))
    return 0
