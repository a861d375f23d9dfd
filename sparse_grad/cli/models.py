"""How commands get a model: the demo transformer (with its size options) or ``module:callable``."""
from __future__ import annotations

import argparse
import importlib

import torch

from ..demo import TinyLM

__all__ = ["add_model_arguments", "build_model"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="demo",
                       help="'demo' (sparse_grad.demo.TinyLM, sized by the options below) or "
                            "'package.module:callable' returning a torch.nn.Module")
    group.add_argument("--context", type=int, default=64, help="demo: tokens per sequence")
    group.add_argument("--width", type=int, default=128, help="demo: model width")
    group.add_argument("--layers", type=int, default=2, help="demo: transformer layers")
    group.add_argument("--heads", type=int, default=4, help="demo: attention heads")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "demo":
        return TinyLM(args.context, width=args.width, layers=args.layers, heads=args.heads)
    module_name, sep, attribute = args.model.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model must be 'demo' or 'package.module:callable', got {args.model!r}")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise TypeError(f"--model {args.model}: {module_name} has no callable {attribute!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    return model
