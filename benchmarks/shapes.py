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
