"""``python -m sparse_grad <command>`` (or the ``sparse-grad`` console script, the same
:func:`main`): one module per command, each with ``add_parser`` and
``run``; add a command by adding its module to ``COMMANDS``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import analyze, bench, blueprint, demo

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (demo, analyze, blueprint, bench)


def build_parser() -> argparse.ArgumentParser:
    # the name the user typed, for usage lines and errors
    prog = "sparse-grad" if Path(sys.argv[0]).stem == "sparse-grad" else "python -m sparse_grad"
    parser = argparse.ArgumentParser(prog=prog,
                                     description="sparse_grad tools: the demo, gradient analysis, blueprints and benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (errors in the input print one line, status 2)."""
    args = build_parser().parse_args(argv)
    try:
        check = getattr(args, "check", None)
        if check is not None:  # every argument, before any work
            check(args)
        return args.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
