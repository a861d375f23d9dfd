"""``python -m sparse_grad demo``: two-stage pretrain → blueprint → sparse adaptation, on text that
ships with Python (no download, no GPU needed).

Stage 1 trains a small byte-level transformer densely on the standard library's source, with a
GradientMonitor, a ResourceMeter and a MarginalReturnStopper, and saves a gradient blueprint.
Stage 2 adapts it to English prose (pydoc_data.topics; --task code: to other modules of the
standard library) with dense AdamW, SparseAdamW at several densities with norm-based, random (the
control) and blueprint-guided selection, compact state, selection every 10 steps with and without
sparse_backward, and a fixed-layer baseline, all from the same weights with the same batches and
step budget, each at the learning rate (blueprint: blend weight) that did best on a tuning split;
the reported losses are on a separate held-out split. The default settings reuse the packaged
recording of that search (each variant then trains once); --retune searches every grid again.
Writes report.md, results.json, results.csv and PNG plots to --out and prints a table.

With --data-selection it runs the parameter × data experiment instead
(sparse_grad.demo.data_selection: parameter blocks by gradient norm or at random × training
examples by influence or at random, and dense AdamW) and writes data_selection.md/json to --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import _checks
from ..demo.experiment import SIZES, check_config, config_for, default_threads, run_demo
from . import checks

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="two-stage pretrain -> blueprint -> sparse adaptation, with a report",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("sparse_grad_demo"),
                        help="folder for report.md, results.json/csv and the plots (default ./sparse_grad_demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (well under a minute)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="model and step budget: small (CPU default), medium, large (for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: one less than the cores, 1..4)")
    parser.add_argument("--backend", default="auto", help="SparseAdamW backend (default auto: cpp on CPU)")
    parser.add_argument("--task", choices=("prose", "code"), default="prose",
                        help="stage 2: English prose (default; a domain shift) or code (other standard-library "
                             "modules: near stage 1's domain)")
    parser.add_argument("--densities", type=float, nargs="+", help="SparseAdamW densities (default 0.01 0.05 0.2)")
    parser.add_argument("--lr-multipliers", type=float, nargs="+",
                        help="every variant's lr grid, as multiples of the base lr 0.002 (default 1 3 10)")
    parser.add_argument("--block-size", type=int,
                        help="SparseAdamW block size (default 256 for --size small; 64 gained about 3 points of dense "
                             "AdamW's gain at density 0.05 on both study tasks: docs/low_density_study.md)")
    parser.add_argument("--error-feedback", action="store_true",
                        help="SparseAdamW variants with error_feedback=True (at density 0.05 it recovered about "
                             "20 points more of dense AdamW's gain on both study tasks: docs/low_density_study.md)")
    parser.add_argument("--repeats", type=int, help="stage-2 runs per variant with other batch orders (default 1)")
    parser.add_argument("--stage1-steps", type=int, help="stage-1 step cap")
    parser.add_argument("--stage2-steps", type=int, help="stage-2 steps per variant")
    parser.add_argument("--seed", type=int, help="seed of the model init and the batch orders (default 0)")
    parser.add_argument("--retune", action="store_true",
                        help="search every variant's grid even where a recording of these settings exists "
                             "(about 3x the stage-2 time); writes tuning.json to --out")
    parser.add_argument("--tuning", type=Path,
                        help="reuse the choices recorded in this tuning.json (from an earlier run of the same "
                             "settings) instead of the packaged recording of the default demo")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--data-selection", action="store_true",
                        help="run the parameter x data selection experiment instead (CPU; --quick, --out, "
                             "--stage1-steps, --stage2-steps and --seed apply)")
    parser.set_defaults(run=run, check=check)


# The data-selection experiment has its own fixed model, budget and CPU setting (see its module).
_NOT_FOR_DATA_SELECTION = {"size": "small", "device": "cpu", "threads": None, "backend": "auto",
                           "densities": None, "repeats": None, "task": "prose", "lr_multipliers": None,
                           "error_feedback": False, "block_size": None, "retune": False, "tuning": None}


def run_data_selection(args: argparse.Namespace) -> int:
    from ..demo.data_selection import run_experiment, to_markdown

    results = run_experiment(args.quick, args.out, steps=args.stage2_steps, pretrain_steps=args.stage1_steps,
                             seeds=None if args.seed is None else (args.seed,))
    print(to_markdown(results))
    print(f"wrote {args.out / 'data_selection.md'}, {args.out / 'data_selection.json'}")
    return 0


def check(args: argparse.Namespace) -> None:
    if args.data_selection:
        for option, default in _NOT_FOR_DATA_SELECTION.items():
            if getattr(args, option) != default:
                raise ValueError(f"--{option} does not apply to --data-selection (it runs its own fixed "
                                 "setting on the CPU)")
        checks.positive_ints(args, "stage1_steps", "stage2_steps")
    else:
        check_config(_config(args))
        if args.retune and args.tuning is not None:
            raise ValueError("--retune searches every grid: it takes no --tuning recording")
    if args.seed is not None:
        _checks.non_negative_int(args.seed, "--seed")


def _config(args: argparse.Namespace):
    device = checks.device(args.device)
    threads = args.threads if args.threads is not None else (default_threads() if device.type == "cpu" else None)
    return config_for(args.size, args.quick, device=args.device, threads=threads, backend=args.backend,
                      densities=tuple(args.densities) if args.densities else None, repeats=args.repeats,
                      task=args.task, error_feedback=args.error_feedback or None, block_size=args.block_size,
                      lr_multipliers=tuple(args.lr_multipliers) if args.lr_multipliers else None,
                      stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    if args.data_selection:
        return run_data_selection(args)
    cfg = _config(args)
    started = time.perf_counter()
    results = run_demo(cfg, args.out, progress=not args.no_progress, retune=args.retune, tuning=args.tuning)
    from ..demo.report import (
        write_outputs,  # matplotlib is imported only once there is something to draw
    )

    table, files = write_outputs(results, args.out)
    print(table)
    print(f"\nwrote {', '.join(str(f) for f in files)} ({time.perf_counter() - started:.0f} s in all)")
    sys.stdout.flush()
    return 0
