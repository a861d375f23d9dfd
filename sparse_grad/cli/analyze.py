"""``python -m sparse_grad analyze``: the heavy-tail report of a model's gradients, with plots.

Either trains the demo model for a few steps on the standard library's source while a
GradientMonitor records the block scores (``--model`` may name another byte-level LM: a
callable returning a module that maps tokens [batch, n] to logits [batch, n, 256]), or reads a
monitor dump (``--dump``). Prints
the report; writes ``heavy_tail.png`` (ranked norms with the power-law fit, concentration
curve) and ``module_heatmap.png`` (each submodule's share of the mass per step) to ``--out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import SparseAdamW, _checks
from ..analysis import GradientMonitor, GradientSnapshot
from ..demo import stdlib_bytes, train_steps
from . import checks
from .models import add_model_arguments, build_model

__all__ = ["add_parser", "run"]


def add_parser(commands) -> None:
    parser = commands.add_parser("analyze", help="heavy-tail report and plots of block gradient norms",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, help="read this monitor dump instead of training")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG plots (default: here)")
    parser.add_argument("--no-plots", action="store_true", help="print the report only")
    parser.add_argument("--save-dump", type=Path, help="also write the monitor dump here")
    parser.add_argument("--blueprint", type=Path, help="also write a gradient blueprint here")
    parser.add_argument("--depth", type=int, help="submodules: the first DEPTH components of a parameter's "
                                                  "module path (default: the whole path)")
    parser.add_argument("--target-share", type=float, default=0.9,
                        help="share of the mass the recommended k of a submodule holds (default 0.9)")
    parser.add_argument("--per-tensor", action="store_true", help="also print one row per tensor")
    train = parser.add_argument_group("training (without --dump)")
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--block-size", type=int, default=256)
    train.add_argument("--optimizer", choices=("adamw", "sparse"), default="adamw",
                       help="torch AdamW with monitor.update() (a dense first stage), or SparseAdamW "
                            "with the monitor as its score hook")
    train.add_argument("--density", type=float, default=0.2, help="SparseAdamW density")
    train.add_argument("--accumulate", choices=("mean", "ema"), default="mean")
    train.add_argument("--bytes", type=int, default=500_000, help="how much stdlib source to use")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    add_model_arguments(parser)
    parser.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    if args.dump is None:  # training options matter only without a dump
        checks.device(args.device)
        checks.positive_ints(args, "steps", "batch", "bytes")
        _checks.block_size(args.block_size, "--block-size")
        _checks.non_negative(args.lr, "--lr")
        _checks.density(args.density, "--density")
        checks.model_arguments(args)
    elif not args.dump.is_file():
        raise FileNotFoundError(f"--dump {args.dump}: no such file")
    checks.positive_ints(args, "depth")
    share = _checks.finite(args.target_share, "--target-share")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--target-share must be in (0, 1], got {share}")


def record(args: argparse.Namespace) -> GradientSnapshot:
    """Train for ``args.steps`` steps with a monitor attached; its snapshot."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    monitor = GradientMonitor(model, block_size=args.block_size, accumulate=args.accumulate)
    if args.optimizer == "sparse":
        opt = SparseAdamW(model.parameters(), lr=args.lr, density=args.density, block_size=args.block_size)
        monitor.attach(opt)
        after_backward = None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        after_backward = monitor.update
    losses = train_steps(model, opt, stdlib_bytes(args.bytes), steps=args.steps, batch=args.batch,
                         context=args.context, seed=args.seed + 1, device=device, after_backward=after_backward)
    print(f"trained {args.steps} steps with {args.optimizer}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    snapshot = monitor.snapshot()
    snapshot.extra.update(optimizer=args.optimizer, losses=losses)
    return snapshot


def run(args: argparse.Namespace) -> int:
    snapshot = GradientSnapshot.load(args.dump) if args.dump else record(args)
    report = snapshot.report(depth=args.depth, target_share=args.target_share)
    print(report.to_text(per_tensor=args.per_tensor))
    for path in (args.save_dump, args.blueprint):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.save_dump:
        snapshot.save(args.save_dump)
        print(f"wrote the monitor dump {args.save_dump}")
    if args.blueprint:
        from ..blueprint import Blueprint

        Blueprint.from_monitor(snapshot, target_share=args.target_share, depth=args.depth).save(args.blueprint)
        print(f"wrote the blueprint {args.blueprint}")
    if not args.no_plots:
        from ..analysis.plots import save_heavy_tail_figure, save_module_heatmap

        args.out.mkdir(parents=True, exist_ok=True)
        for path in (save_heavy_tail_figure(snapshot, report, args.out / "heavy_tail.png"),
                     save_module_heatmap(snapshot, args.out / "module_heatmap.png", depth=args.depth)):
            print(f"wrote {path}")
    return 0
