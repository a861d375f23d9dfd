"""Text that ships with Python: the source of the standard library's top-level modules (code) and
the help topics of ``pydoc_data.topics`` (English prose)."""
from __future__ import annotations

import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["batches", "prose_bytes", "prose_text", "stdlib_bytes", "stdlib_text", "train_tune_test_split",
           "train_val_split", "window_sampler"]


def stdlib_text(max_bytes: int, skip: int = 0) -> bytes:
    """Up to ``max_bytes`` of the standard library's top-level ``*.py`` files, in name order,
    after the first ``skip`` bytes (so that two calls can take disjoint parts of it)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = bytearray()
    for f in files:
        data += f.read_bytes()
        if len(data) >= skip + max_bytes:
            break
    return bytes(data[skip:skip + max_bytes])


def prose_text(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of English prose: the help topics of ``pydoc_data.topics`` (the text
    ``help("with")`` prints, about 465 KB), in topic-name order, UTF-8."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode()[:max_bytes]


def _as_tokens(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def stdlib_bytes(max_bytes: int, skip: int = 0) -> torch.Tensor:
    """:func:`stdlib_text` as an int64 tensor of byte values (token ids)."""
    return _as_tokens(stdlib_text(max_bytes, skip))


def prose_bytes(max_bytes: int) -> torch.Tensor:
    """:func:`prose_text` as an int64 tensor of byte values (token ids)."""
    return _as_tokens(prose_text(max_bytes))


def train_val_split(data: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``train_fraction`` of ``data`` for training, the rest for validation."""
    split = int(train_fraction * data.numel())
    return data[:split], data[split:]


def train_tune_test_split(data: torch.Tensor, train_fraction: float = 0.8, tune_fraction: float = 0.1
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three disjoint, contiguous parts of ``data``: training, validation for choosing
    hyper-parameters (``tune_fraction``), and the rest held out for the reported losses; a
    window drawn from one part never reads a byte of another."""
    if not (0.0 < train_fraction and 0.0 < tune_fraction and train_fraction + tune_fraction < 1.0):
        raise ValueError(f"train_fraction and tune_fraction must be positive with a sum below 1, got "
                         f"{train_fraction!r} and {tune_fraction!r}")
    train_end = int(train_fraction * data.numel())
    tune_end = int((train_fraction + tune_fraction) * data.numel())
    return data[:train_end], data[train_end:tune_end], data[tune_end:]


def window_sampler(data: torch.Tensor, context: int
                   ) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """``draw(n, generator)``: ``n`` random windows of ``data``, as inputs ``[n, context]`` and the
    same windows shifted by one byte as targets (the form a data sampler draws candidates in)."""
    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, data.numel() - context - 1, (n,), generator=generator)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]
    return draw


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``batch`` random windows (see :func:`window_sampler`). The same
    ``seed`` gives the same batches."""
    g = torch.Generator().manual_seed(seed)
    draw = window_sampler(data, context)
    for _ in range(steps):
        yield draw(batch, g)
