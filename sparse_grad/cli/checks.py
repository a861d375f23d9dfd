"""Argument checks every command runs before any work (a bad value is one ``error:`` line and
exit status 2, not a traceback after minutes of training)."""
from __future__ import annotations

import argparse

import torch

from .. import _checks

__all__ = ["device", "model_arguments", "positive_ints"]


def device(text: str, name: str = "--device") -> torch.device:
    """A cpu or cuda device that exists here."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be cpu or cuda (cuda:N), got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be cpu or cuda (cuda:N), got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {text}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name} {text}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def positive_ints(args: argparse.Namespace, *names: str) -> None:
    """Each named option (attribute names; None is left alone) is a positive int."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            _checks.positive_int(value, "--" + name.replace("_", "-"))


def model_arguments(args: argparse.Namespace) -> None:
    """The demo model's size options (``--model demo``)."""
    if args.model != "demo":
        return
    positive_ints(args, "context", "width", "layers", "heads")
    if args.width % args.heads:
        raise ValueError(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
