"""``python -m sparse_grad blueprint {show,validate,combine}``: inspect, check and merge blueprints."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..blueprint import Blueprint
from .models import add_model_arguments, build_model

__all__ = ["add_parser", "run_combine", "run_show", "run_validate"]


def add_parser(commands) -> None:
    parser = commands.add_parser("blueprint", help="show, validate or combine gradient blueprints",
                                 description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)

    show = actions.add_parser("show", help="print a blueprint's metadata, recommendations and statistics")
    show.add_argument("path", type=Path)
    show.add_argument("--per-tensor", action="store_true", help="also print one row per tensor")
    show.set_defaults(run=run_show)

    validate = actions.add_parser("validate", help="check that a blueprint fits a model (exit 1 if not)")
    validate.add_argument("path", type=Path)
    validate.add_argument("--block-size", type=int, help="also require this block size")
    add_model_arguments(validate)
    validate.set_defaults(run=run_validate)

    combine = actions.add_parser("combine", help="weighted mean of blueprints of the same model")
    combine.add_argument("output", type=Path)
    combine.add_argument("inputs", type=Path, nargs="+")
    combine.add_argument("--weights", type=float, nargs="+", help="one per input (default: equal)")
    combine.set_defaults(run=run_combine)


def run_show(args: argparse.Namespace) -> int:
    print(Blueprint.load(args.path).describe(per_tensor=args.per_tensor))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    bp = Blueprint.load(args.path)
    model = build_model(args)
    try:
        bp.validate(model, block_size=args.block_size)
    except ValueError as err:
        print(f"{args.path}: does not fit: {err}")
        return 1
    print(f"{args.path}: fits the model ({len(bp.names)} parameters, {bp.num_blocks:,} blocks of {bp.block_size}; "
          f"fingerprint {bp.fingerprint[:16]}…)")
    return 0


def run_combine(args: argparse.Namespace) -> int:
    combined = Blueprint.combine([Blueprint.load(p) for p in args.inputs], args.weights)
    combined.save(args.output)
    print(f"wrote {args.output}: {combined.provenance[-1]}")
    return 0
