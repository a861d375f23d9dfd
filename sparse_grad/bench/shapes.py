"""Named parameter shape sets for benchmarks (the CLI's ``--shapes`` and benchmarks/).

Each set is about 400M parameters at ``scale=1.0``; ``scale`` shrinks the tensors (not their
number) so CPU runs and CI fit: "llm-400m" and "one-flat" shrink every matrix's rows, "many-small"
every tensor's length.
"""
from __future__ import annotations

import random

from .._checks import choice, density

__all__ = ["SHAPE_SETS", "shapes"]


def llm_400m(scale: float) -> list[tuple[int, ...]]:
    """192 tensors of a 24-layer transformer of width 1184 with a 4x MLP (403.8M parameters):
    per layer qkv, out, up and down projections and two norms' weights and biases. Width 1184
    rather than 1024 brings the 8-tensor layers, without embeddings, to 400M."""
    width, layers = 1184, 24
    rows = lambda n: max(1, int(n * scale))  # noqa: E731
    shapes = []
    for _ in range(layers):
        shapes += [(rows(3 * width), width), (rows(width), width), (rows(4 * width), width),
                   (rows(width), 4 * width), (width,), (width,), (width,), (width,)]
    return shapes


def one_flat(scale: float) -> list[tuple[int, ...]]:
    """One tensor of 400M x ``scale`` parameters."""
    return [(max(1, int(400_000_000 * scale)),)]


def many_small(scale: float) -> list[tuple[int, ...]]:
    """1,000 tensors of 1K-64K elements each at full size (log-uniform, fixed seed: 15.3M in
    all), the worst case for per-tensor launches."""
    rng = random.Random(0)
    return [(max(1, int(2 ** rng.uniform(10, 16) * scale)),) for _ in range(1000)]


SHAPE_SETS = {"llm-400m": llm_400m, "one-flat": one_flat, "many-small": many_small}


def shapes(name: str, scale: float = 1.0) -> list[tuple[int, ...]]:
    """The shapes of the set ``name`` at ``scale`` (in (0, 1])."""
    choice(name, tuple(SHAPE_SETS), "shapes")
    return SHAPE_SETS[name](density(scale, "scale"))  # same range as a density: (0, 1]
