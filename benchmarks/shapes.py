"""Parameter shape sets for benchmarks."""
from __future__ import annotations


def llm_shapes(scale: float = 1.0, layers: int = 24, width: int = 1024) -> list[tuple[int, ...]]:
    """About 400M parameters in 8 tensors per layer (qkv, out, up, down, two norms' weights and
    biases) of a d=1024 transformer with a 4x MLP, 2 embedding-like matrices of 32k rows;
    ``scale`` shrinks every matrix's row count (norms keep their size)."""
    rows = lambda n: max(1, int(n * scale))  # noqa: E731
    shapes = []
    for _ in range(layers):
        shapes += [(rows(3 * width), width), (rows(width), width), (rows(4 * width), width),
                   (rows(width), 4 * width), (width,), (width,), (width,), (width,)]
    return shapes + [(rows(32768), width), (rows(32768), width)]


def flat_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """One tensor of 400M x ``scale`` parameters (the total of the llm set at full size)."""
    return [(max(1, int(400_000_000 * scale)),)]


def fifty_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """The same total in 50 equal tensors."""
    return [(max(1, int(8_000_000 * scale)),)] * 50


SHAPE_SETS = {"llm": llm_shapes, "one-flat": flat_shapes, "fifty": fifty_shapes}
